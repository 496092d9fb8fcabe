#!/usr/bin/env bash
# Device call 4d (1 H200): the final code after review fixes: the unsloth backend's GPU tests and the memory-plan
# tests, then the usage guide's call once more (micro auto) to confirm the plan and speed are unchanged.
set -u
DEADLINE=${DEADLINE:-300}
source benchmarks/gpu/lib.sh
step build 60 python3 -c "from benchmarks.gpu import common; common.build_model('qwen1.5b', '/tmp/models/qwen1.5b', '.gpu/tok_qwen1.5b')"
step unsloth_tests 130 python3 -m pytest tests/lora_runtime/test_backend_unsloth.py tests/lora_runtime/test_batching.py -q -x -p no:cacheprovider -rs
step ours_auto 90 python3 -m benchmarks.gpu.ours /tmp/models/qwen1.5b .gpu/shards_qwen1.5b_2048 $RES --runs unsloth_auto_mbauto --steps 16
grep -h "memory plan" $LOGS/ours_auto.log | head -2
finish
