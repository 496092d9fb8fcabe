#!/usr/bin/env bash
# Device call 3b (right after 3a, same machine): the pytest-benchmark step baselines (unsloth bf16 / 4-bit) and the
# TF32 lever (our lora_sft with and without TF32 for the fp32 LoRA weight-gradient matmuls, same process).
set -u
DEADLINE=${DEADLINE:-280}
source benchmarks/gpu/lib.sh
step build 100 python3 -c "from benchmarks.gpu import common; common.build_model('qwen1.5b', '/tmp/models/qwen1.5b', '.gpu/tok_qwen1.5b')"
M=/tmp/models/qwen1.5b; S=.gpu/shards_qwen1.5b_2048
step tf32 110 python3 -m benchmarks.gpu.ours $M $S $RES --steps 14 --warmup 4 --runs unsloth_auto_mb8,unsloth_auto_mb8_notf32
export LORA_BENCH_MODEL_DIR=$M
step bench_unsloth 120 python3 -m pytest benchmarks/test_train.py -k unsloth -p no:cacheprovider --benchmark-enable \
  --benchmark-json $OUT/bench_h200_unsloth.json -q
finish
