#!/usr/bin/env bash
# Issue 7, for when `status` lists nvidia-h200-x8 (not run yet: no 8-GPU machine was lent on 2026-11-28).
# run(kind="nvidia-h200-x8", carry=[".whl", ".gpu"], timeout_s=600, command="bash benchmarks/gpu/call_x8.sh 2>&1")
# (fill .whl with `bash /work/shared/gpu/fetch_wheels.sh .whl` and .gpu with make_data + make_shards first)
#  1. Qwen2.5-1.5B shape: `lora-cli train --gpus N` for N = 1 and 8, micro 8 per GPU, unsloth backend (it ran under
#     torchrun on 2 and 4 H200s at 0.94/0.93; peft if it fails), the same effective batch (64) for both N so the loss
#     curves compare too; scaling efficiency = tok/s(8) / (8 × tok/s(1)).
#  2. Llama-3.1-8B shape at 8,192 context, micro 1 per GPU, 1 and 8 GPUs.
#  3. Resume on 8 GPUs: constant LR, 10 steps with a checkpoint at 10, then the same output dir to 20 steps; its
#     metrics.jsonl must match an uninterrupted 20-step run's losses (printed side by side at the end).
set -u
source benchmarks/gpu/lib.sh
step build 100 python3 -c "from benchmarks.gpu import common; common.build_model('qwen1.5b', '/tmp/models/qwen1.5b', '.gpu/tok_qwen1.5b')"
M=/tmp/models/qwen1.5b; S=.gpu/shards_qwen1.5b_2048
step scaling 240 python3 -m benchmarks.gpu.scaling $M $S $RES --gpus 1,8 --backend unsloth --fallback peft --ebs 64 --steps 20
step build8b 120 python3 -c "from benchmarks.gpu import common; common.build_model('llama8b', '/tmp/models/llama8b', '.gpu/tok_llama8b')"
step scaling8b 200 python3 -m benchmarks.gpu.scaling /tmp/models/llama8b .gpu/shards_llama8b_8192 $RES --gpus 1,8 \
  --backend unsloth --fallback peft --micro 1 --steps 12
T="python3 -m lora_cli train --model $M --shards $S --gpus 8 --backend unsloth --micro-batch-size 8 --lr-scheduler constant --warmup-steps 0 --save-steps 10 --logging-steps 1"
step resume_a 120 $T --output /tmp/resume --max-steps 10
step resume_b 120 $T --output /tmp/resume --max-steps 20
step straight 150 $T --output /tmp/straight --max-steps 20
python3 - <<'PY'
import json
def losses(d): return [json.loads(l)["loss"] for l in open(f"{d}/metrics.jsonl") if '"loss"' in l]
a, b = losses("/tmp/resume"), losses("/tmp/straight")
print("RESUME resumed vs straight:", list(zip(a, b)), "max abs diff", max(abs(x - y) for x, y in zip(a, b)))
PY
finish
