"""Resume and a dead rank under `lora-cli train --gpus N` (torchrun, NCCL), constant LR so the schedule is no confound:

    python -m benchmarks.gpu.resume MODEL SHARDS OUT [--gpus 2] [--backend unsloth]

1. resume: 10 steps with a checkpoint at 10, the same command to 20, against an uninterrupted 20-step run: the losses
   after step 10 must match;
2. a dead rank: rank 1 SIGKILLs itself after step 5 (LORA_CLI_FAULT_SIGKILL_RANK, checkpoints every 3): the launcher
   must exit non-zero in bounded time naming rank 1, then the same command resumes from checkpoint-3 and finishes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.gpu import common


def _train(cmd: list[str], log: Path, env: dict | None = None, timeout: float = 150) -> tuple[int, float]:
    t0 = time.perf_counter()
    with log.open("w") as f:
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    return rc, time.perf_counter() - t0


def _losses(out: Path) -> list[float]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [r["loss"] for r in map(json.loads, path.read_text().splitlines()) if "loss" in r]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("shards")
    ap.add_argument("out")
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--backend", default="unsloth")
    ap.add_argument("--work", default="/tmp/resume_bench")
    a = ap.parse_args()
    work, logs = Path(a.work), Path(a.work) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    base = [sys.executable, "-m", "lora_cli", "train", "--model", a.model, "--shards", a.shards, "--gpus", str(a.gpus),
            "--backend", a.backend, "--micro-batch-size", "8", "--lr-scheduler", "constant", "--warmup-steps", "0",
            "--logging-steps", "1"]
    res: dict = {"shape": "qwen1.5b", "gpus": a.gpus, "backend": a.backend}
    _train([*base, "--output", str(work / "resume"), "--save-steps", "10", "--max-steps", "10"], logs / "resume_a.log")
    _train([*base, "--output", str(work / "resume"), "--save-steps", "10", "--max-steps", "20"], logs / "resume_b.log")
    _train([*base, "--output", str(work / "straight"), "--save-steps", "100", "--max-steps", "20"], logs / "straight.log")
    resumed, straight = _losses(work / "resume"), _losses(work / "straight")
    if len(resumed) >= 20 and len(straight) >= 20:
        res["resume_max_abs_gap_after_10"] = max(abs(x - y) for x, y in zip(resumed[10:], straight[10:], strict=False))
    res.update(resumed_losses=resumed, straight_losses=straight)
    env = dict(os.environ, LORA_CLI_FAULT_SIGKILL_RANK="1:5")
    fault = [*base, "--output", str(work / "fault"), "--save-steps", "3", "--max-steps", "10"]
    rc, secs = _train(fault, logs / "fault.log", env=env)
    log = (logs / "fault.log").read_text(errors="replace")
    res.update(fault_rc=rc, fault_exit_s=secs,
               fault_names_rank_1=bool(re.search(r"rank\s*:\s*1 \(local_rank\s*:\s*1\)", log)),
               fault_sigkill="Signal 9 (SIGKILL)" in log, fault_says_rerun="a worker failed" in log)
    rc2, _ = _train(fault, logs / "fault_resume.log")
    again = (logs / "fault_resume.log").read_text(errors="replace")
    res.update(fault_resume_rc=rc2, fault_resumed_from=next((x.strip() for x in again.splitlines()
                                                             if "resuming from" in x), None),
               fault_resume_steps=len(_losses(work / "fault")))
    ok = (res.get("resume_max_abs_gap_after_10", 1) < 0.01 and rc != 0 and res["fault_names_rank_1"]
          and rc2 == 0 and res["fault_resumed_from"])
    if not ok:
        res["error"] = "a check failed: see the fields (logs in " + str(logs) + ")"
    common.write_result(a.out, f"resume_dead_rank_{a.gpus}gpu", res)


if __name__ == "__main__":
    main()
