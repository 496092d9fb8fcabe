#!/usr/bin/env bash
# Device call 2a (one H200): our lora_sft (unsloth backend: auto / forced checkpointing, bf16 / QLoRA, the usage
# guide's default micro batch) beside training-hub and the Unsloth hand loop in the same run, the peft backend, the
# kernel-time profile of our fast path, and the unsloth backend's GPU tests.
set -u
source benchmarks/gpu/lib.sh
nvidia-smi --query-gpu=name,memory.used,clocks.sm,temperature.gpu --format=csv,noheader
step build 100 python3 -c "from benchmarks.gpu import common; common.build_model('qwen1.5b', '/tmp/models/qwen1.5b', '.gpu/tok_qwen1.5b')"
M=/tmp/models/qwen1.5b; S=.gpu/shards_qwen1.5b_2048; R=.gpu/records.jsonl
step ours_unsloth 230 python3 -m benchmarks.gpu.ours $M $S $RES --budget-s 190 \
  --runs unsloth_auto_mb8,unsloth_gc_mb8,unsloth_auto_mb8_q4,unsloth_gc_mb8_q4,unsloth_auto_mb2
step th 100 python3 -m benchmarks.gpu.peers th $M $R $RES
step loops_bf16 130 python3 -m benchmarks.gpu.loops $M $R $RES --variants rows8_gc,packed16_nogc_varlen \
  --profile $OUT/profile_qwen.json --budget-s 100
step unsloth_tests 150 python3 -m pytest tests/lora_runtime/test_backend_unsloth.py -q -x -p no:cacheprovider -rs
step ours_peft 90 python3 -m benchmarks.gpu.ours $M $S $RES --runs peft_auto_mb8 --steps 12 --warmup 3
finish
