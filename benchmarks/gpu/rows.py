"""The results file: one JSON object a line, one line a measured run (ours or a peer), appended. A row is changed
afterwards only to correct a figure, keeping the value it replaced and a note on why (`config.note`).

Every row carries what is needed to trust and reproduce it: the scenario, the card, the package versions, the
command, the date, and the figures (tokens/s, peak GiB, start-up s, warm-up/compile s). Rows of one invocation share
a `run_id`, so ours and the peers measured beside it are read together.
"""

from __future__ import annotations

import datetime as _dt
import json
import shutil
import subprocess
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "results.jsonl"
REQUIRED = ("scenario", "name", "role", "run_id", "date", "card", "versions", "command", "shape", "budget_gib",
            "tokens_per_s", "peak_gib", "startup_s", "warmup_s", "feed", "config", "error")


def now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def _gpus(field: str, cpu: bool) -> list[str] | None:
    """nvidia-smi's answer for `field`, one line a GPU: [] on a CPU or without nvidia-smi, None where it failed. The
    orchestrator never opens a CUDA context: it would cost GPU memory."""
    if cpu or not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return [line.strip() for line in out.splitlines() if line.strip()]


def card(cpu: bool = False) -> str:
    """'NVIDIA H200 x1' from nvidia-smi."""
    names = _gpus("name", cpu)
    if names is None:
        return "unknown GPU"
    return f"{names[0]} x{len(names)}" if names else "cpu"


def card_gib(cpu: bool = False) -> float:
    """The first card's memory in GiB from nvidia-smi (0 on a CPU, or where nvidia-smi does not answer)."""
    total = _gpus("memory.total", cpu)
    try:
        return float(total[0]) / 1024 if total else 0.0
    except ValueError:  # "[N/A]"
        return 0.0


def make_row(scenario: str, name: str, role: str, payload: dict, **fields) -> dict:
    """A row from a harness result `payload` (common.write_result's JSON) plus the scenario's own `fields`."""
    row = {k: None for k in REQUIRED}
    row.update(scenario=scenario, name=name, role=role, date=payload.get("date"), card=payload.get("card"),
               versions=payload.get("versions"), shape=payload.get("shape"), seq_len=payload.get("seq_len"),
               budget_gib=payload.get("budget_gib", payload.get("max_memory_gib")),
               tokens_per_s=payload.get("tokens_per_s"),
               peak_gib=payload.get("peak_alloc_gib", payload.get("peak_memory_gib_rank0")),
               warmup_s=payload.get("warmup_s"), error=payload.get("error"))
    # a run whose loss went NaN is not training and its speed is not comparable (common.first_nonfinite)
    row.update({k: payload[k] for k in ("loss_first", "loss_last", "loss_nonfinite_step") if k in payload})
    row.update(fields)
    return row


def append(rows: list[dict], path: str | Path = RESULTS) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, default=str, sort_keys=False) + "\n")


def read(path: str | Path = RESULTS) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def best_peer(rows: list[dict], budget_gib: float | None) -> dict | None:
    """The fastest peer row that fits `budget_gib` (None: the whole card): measured without error, under a cap no
    larger than the budget, and with its peak within it.

    >>> peers = [{"role": "peer", "tokens_per_s": 40.0, "budget_gib": 16, "peak_gib": 9.0, "error": None},
    ...          {"role": "peer", "tokens_per_s": 30.0, "budget_gib": 8, "peak_gib": 6.0, "error": None}]
    >>> best_peer(peers, 8)["tokens_per_s"], best_peer(peers, 24)["tokens_per_s"], best_peer(peers, 4)
    (30.0, 40.0, None)
    """
    def fits(r: dict) -> bool:
        if r.get("role") != "peer" or r.get("error") or not r.get("tokens_per_s"):
            return False
        if budget_gib is None:
            return True
        cap = r.get("budget_gib")
        return cap is not None and cap <= budget_gib and (r.get("peak_gib") or 0) <= budget_gib

    fitting = [r for r in rows if fits(r)]
    return max(fitting, key=lambda r: r["tokens_per_s"]) if fitting else None


def add_ratios(rows: list[dict]) -> list[dict]:
    """Give every 'ours' row `vs_best_peer` (its tokens/s ÷ the fastest peer fitting its budget) and `best_peer`."""
    for r in rows:
        if r.get("role") != "ours":
            continue
        same = [p for p in rows if p.get("shape") == r.get("shape") and p.get("seq_len") == r.get("seq_len")]
        peer = best_peer(same, r.get("budget_gib"))
        r["best_peer"] = peer["name"] if peer else None
        r["vs_best_peer"] = (r["tokens_per_s"] / peer["tokens_per_s"]
                             if peer and r.get("tokens_per_s") and not r.get("error") else None)
    return rows
