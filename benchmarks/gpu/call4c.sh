#!/usr/bin/env bash
# Device call 4c (2 H200s): issue 6's reliability under torchrun on real GPUs with the unsloth backend (NCCL):
#  1. resume: 10 steps with a checkpoint at 10, the same command to 20, against an uninterrupted 20-step run
#     (constant LR so the schedule is not a confound): the losses after step 10 must match;
#  2. a dead rank: rank 1 SIGKILLs itself after step 5 (checkpoints every 3): the launcher must exit non-zero in
#     bounded time naming rank 1, then the same command resumes from checkpoint-3 and finishes.
set -u
source benchmarks/gpu/lib.sh
step build 60 python3 -c "from benchmarks.gpu import common; common.build_model('qwen1.5b', '/tmp/models/qwen1.5b', '.gpu/tok_qwen1.5b')"
T="python3 -m lora_cli train --model /tmp/models/qwen1.5b --shards .gpu/shards_qwen1.5b_2048 --gpus 2 --backend unsloth --micro-batch-size 8 --lr-scheduler constant --warmup-steps 0 --logging-steps 1"
step resume_a 100 $T --output /tmp/resume --save-steps 10 --max-steps 10
step resume_b 100 $T --output /tmp/resume --save-steps 10 --max-steps 20
step straight 100 $T --output /tmp/straight --save-steps 100 --max-steps 20
S=$(date +%s)
step fault 150 env LORA_CLI_FAULT_SIGKILL_RANK=1:5 $T --output /tmp/fault --save-steps 3 --max-steps 10
echo "fault run took $(( $(date +%s) - S ))s"
step fault_resume 120 $T --output /tmp/fault --save-steps 3 --max-steps 10
python3 - <<'PY' | tee $OUT/reliability_gpu.txt
import json, re
def losses(d): return [json.loads(l)["loss"] for l in open(f"{d}/metrics.jsonl") if '"loss"' in l]
def steps(d): return [json.loads(l)["step"] for l in open(f"{d}/metrics.jsonl") if '"loss"' in l]
a, b = losses("/tmp/resume"), losses("/tmp/straight")
gap = max(abs(x - y) for x, y in zip(a[10:], b[10:]))
print("RESULT resume on 2 GPUs (unsloth): steps", steps("/tmp/resume"), "max |loss gap| after step 10 vs straight:", gap)
print("resumed ", [round(x, 4) for x in a]); print("straight", [round(x, 4) for x in b])
log = open("/tmp/logs/fault.log").read()
print("RESULT fault: names rank 1:", bool(re.search(r"rank\s*:\s*1 \(local_rank\s*:\s*1\)", log)),
      "SIGKILL:", "Signal 9 (SIGKILL)" in log, "| a worker failed:", "a worker failed" in log)
rl = open("/tmp/logs/fault_resume.log").read()
print("RESULT fault resume:", [l.strip() for l in rl.splitlines() if "resuming from" in l][:1],
      "steps logged", steps("/tmp/fault")[-3:])
PY
tar czf $OUT/logs.tgz -C /tmp logs; echo "total $(( $(date +%s) - T0 ))s"
