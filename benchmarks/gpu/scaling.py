"""Data-parallel scaling of `lora-cli train --gpus N` on one machine (issue 6): the same model, shards and per-GPU
micro batch on 1, 2, ... GPUs, one after another; steady tokens/s (all ranks' real tokens) from metrics.jsonl.

    python -m benchmarks.gpu.scaling MODEL SHARDS OUT --gpus 1,2,4 [--backend unsloth] [--fallback peft] [--ebs 16]

If the backend fails under torchrun, the same N is retried with --fallback and the result says so. With --ebs (the
effective batch size, rows per optimizer step over all GPUs), every N trains the same rows in each optimizer step
(1 GPU accumulates what N GPUs do at once), so the loss curves must agree: each result carries its per-step losses
and, for N > 1, the largest gap to the 1-GPU curve.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.gpu import common


def run(model: str, shards: str, gpus: int, backend: str, steps: int, micro: int, log: Path,
        ebs: int | None = None, extra: tuple[str, ...] = (), timeout: float = 300) -> dict:
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "lora_cli", "train", "--model", model, "--shards", shards, "--output", out,
               "--gpus", str(gpus), "--backend", backend, "--micro-batch-size", str(micro), "--max-steps",
               str(steps), "--save-steps", "1000000", "--logging-steps", "1", "--lora-r", "16", "--lora-alpha", "32"]
        if ebs:
            cmd += ["--effective-batch-size", str(ebs)]
        cmd += list(extra)
        t0 = time.perf_counter()
        with open(log, "w") as f:
            try:
                rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
            except subprocess.TimeoutExpired:
                rc = 124
        wall = time.perf_counter() - t0
        rows = []
        metrics = Path(out) / "metrics.jsonl"
        if metrics.exists():
            rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
    steady = [r["tokens_per_s"] for r in rows if r.get("step", 0) > 5 and "tokens_per_s" in r]
    res = {"gpus": gpus, "backend": backend, "rc": rc, "wall_s": wall, "steps_logged": len(rows),
           "command": " ".join(cmd), "losses": [r["loss"] for r in rows if "loss" in r]}
    if steady:
        steady.sort()
        res["tokens_per_s"] = steady[len(steady) // 2]
        res["tokens_per_s_per_gpu"] = res["tokens_per_s"] / gpus
        res["peak_memory_gib_rank0"] = max(r.get("peak_memory_bytes", 0) for r in rows) / 1024**3
        res["loss_last"] = rows[-1].get("loss")
    else:
        res["error"] = f"rc={rc}, no steady metrics (see log {log.name})"
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("shards")
    ap.add_argument("out")
    ap.add_argument("--gpus", default="1,2")
    ap.add_argument("--backend", default="unsloth")
    ap.add_argument("--fallback", default="peft")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--logs", default="/tmp/logs")
    ap.add_argument("--ebs", type=int, default=None, help="effective batch size (same for every N)")
    a = ap.parse_args()
    base = None
    for n in [int(x) for x in a.gpus.split(",")]:
        res = run(a.model, a.shards, n, a.backend, a.steps, a.micro, Path(a.logs) / f"scaling_{a.backend}_{n}.log",
                  a.ebs)
        if "error" in res and a.fallback and a.fallback != a.backend:
            failed = res
            res = run(a.model, a.shards, n, a.fallback, a.steps, a.micro, Path(a.logs) / f"scaling_{a.fallback}_{n}.log",
                      a.ebs)
            res["note"] = f"{a.backend} failed under torchrun ({failed['error']}); fell back to {a.fallback}"
        if n == 1 and "tokens_per_s" in res:
            base = res
        if base and "tokens_per_s" in res and base["backend"] == res["backend"]:
            res["scaling_efficiency"] = res["tokens_per_s"] / (n * base["tokens_per_s"])
        if a.ebs and base and n > 1 and base["backend"] == res["backend"] and res["losses"]:
            pairs = list(zip(base["losses"], res["losses"], strict=False))
            res["loss_max_abs_gap_vs_1gpu"] = max(abs(x - y) for x, y in pairs)
            res["loss_max_rel_gap_vs_1gpu"] = max(abs(x - y) / abs(x) for x, y in pairs)
            print(f"RESULT loss curve {n} GPUs vs 1: max gap {res['loss_max_abs_gap_vs_1gpu']:.4f} "
                  f"({100 * res['loss_max_rel_gap_vs_1gpu']:.2f}%) over {len(pairs)} steps")
        common.write_result(a.out, f"scaling_{res['backend']}_{n}gpu{'_ebs' if a.ebs else ''}",
                            {"shape": "qwen1.5b", "ebs": a.ebs, **res})
        print(f"RESULT scaling {res['backend']} {n} GPU(s): {res.get('tokens_per_s', 0):,.0f} tok/s "
              f"eff {res.get('scaling_efficiency', '-')} {res.get('error', '')}")


if __name__ == "__main__":
    main()
