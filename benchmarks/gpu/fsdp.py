"""A Llama-3.1-70B-shaped model at 8k context on N GPUs: `lora-cli train --sharding fsdp --gpus N` against
`enable_model_splitting=True` (accelerate's sequential device map, one process) as the peer, on the same weights:

    python -m benchmarks.gpu.fsdp OUT --tok DATA/tok_llama8b --shards DATA/shards_llama8b_8192 [--gpus 4] [--steps 8]

1. the random bf16 checkpoint (141 GB) is written once with split.py (`--no-train --keep-weights`);
2. FSDP: micro 1 per GPU, gradient checkpointing on, tokens/s (all ranks) and rank 0's peak from metrics.jsonl;
3. the peer: split.py on the same weights (`--reuse-weights`); then the weights are deleted.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.gpu import common, scaling


def _gpus() -> int:
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout
    return max(1, sum(1 for line in out.splitlines() if line.startswith("GPU ")))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--tok", required=True)
    ap.add_argument("--shards", required=True)
    ap.add_argument("--shape", default="llama70b")
    ap.add_argument("--gpus", type=int, default=None, help="default: every visible GPU")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--backend", default="peft")
    ap.add_argument("--weights-dir", default=None)
    ap.add_argument("--budget-s", type=float, default=1500)
    a = ap.parse_args()
    t0 = time.perf_counter()
    gpus = a.gpus or _gpus()
    weights = Path(a.weights_dir or f"/dev/shm/{a.shape}")
    split = [sys.executable, "-m", "benchmarks.gpu.split", a.out, "--tok", a.tok, "--shards", a.shards,
             "--shape", a.shape, "--backend", a.backend, "--weights-dir", str(weights), "--steps", str(a.steps)]
    subprocess.run([*split, "--no-train", "--keep-weights"], check=False)
    left = a.budget_s - (time.perf_counter() - t0)
    try:
        if not (weights / "config.json").exists():
            res = {"error": f"no checkpoint in {weights} (see split_{a.shape}.json)"}
        else:
            res = scaling.run(str(weights), a.shards, gpus, a.backend, a.steps, 1, Path(a.out) / "fsdp.log",
                              extra=("--sharding", "fsdp", "--gradient-checkpointing", "true"),
                              timeout=max(60, left / 2))
        common.write_result(a.out, f"fsdp_{a.shape}_{gpus}gpu", {"shape": a.shape, "seq_len": 8192, **res})
        left = a.budget_s - (time.perf_counter() - t0)
        subprocess.run([*split, "--reuse-weights", "--budget-s", str(max(60, left - 30))], check=False)
    finally:
        shutil.rmtree(weights, ignore_errors=True)


if __name__ == "__main__":
    main()
