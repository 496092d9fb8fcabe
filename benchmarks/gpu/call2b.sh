#!/usr/bin/env bash
# Device call 2b (one H200, right after 2a): the Llama-3.1-8B shape at 8,192 tokens of context (ours vs the Unsloth
# hand loop), and the pytest-benchmark step benchmarks whose JSON becomes the kept baselines.
set -u
source benchmarks/gpu/lib.sh
step build8b 150 python3 -c "from benchmarks.gpu import common; common.build_model('llama8b', '/tmp/models/llama8b', '.gpu/tok_llama8b')"
L=/tmp/models/llama8b; S8=.gpu/shards_llama8b_8192; R=.gpu/records.jsonl
step ours8b 200 python3 -m benchmarks.gpu.ours $L $S8 $RES --prefix ours8b --shape llama8b --seq-len 8192 \
  --steps 10 --warmup 3 --budget-s 150 --runs unsloth_auto_mb1,unsloth_gc_mb1
step loops8b 120 python3 -m benchmarks.gpu.loops $L $R $RES --shape llama8b --seq-len 8192 --steps 10 --warmup 3 \
  --variants rows1_gc
step build 80 python3 -c "from benchmarks.gpu import common; common.build_model('qwen1.5b', '/tmp/models/qwen1.5b', '.gpu/tok_qwen1.5b')"
export LORA_BENCH_MODEL_DIR=/tmp/models/qwen1.5b
step bench_unsloth 120 python3 -m pytest benchmarks/test_train.py -k unsloth -p no:cacheprovider --benchmark-enable \
  --benchmark-json $OUT/bench_h200_unsloth.json -q
step bench_peft 80 python3 -m pytest benchmarks/test_train.py -k peft -p no:cacheprovider --benchmark-enable \
  --benchmark-json $OUT/bench_h200_peft.json -q
finish
