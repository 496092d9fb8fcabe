#!/usr/bin/env bash
# Device call 4e (2 H200s): the last changes on real GPUs. `lora-cli train --gpus 2` with the defaults (micro
# auto: the memory plan under torchrun, min free memory over the ranks) and an eval set (the token-weighted
# evaluate under DDP with the unsloth backend), then the unsloth GPU tests.
set -u
DEADLINE=${DEADLINE:-330}
source benchmarks/gpu/lib.sh
step build 60 python3 -c "from benchmarks.gpu import common; common.build_model('qwen1.5b', '/tmp/models/qwen1.5b', '.gpu/tok_qwen1.5b')"
S=.gpu/shards_qwen1.5b_2048
step ddp_auto_eval 150 python3 -m lora_cli train --model /tmp/models/qwen1.5b --shards $S --output /tmp/ddp --gpus 2 \
  --eval-data-path $S --eval-steps 5 --max-steps 10 --save-steps 100 --logging-steps 1
grep -h "backend:\|memory plan\|batch:\|eval_loss" $LOGS/ddp_auto_eval.log | head -8
step unsloth_tests 130 python3 -m pytest tests/lora_runtime/test_backend_unsloth.py -q -x -p no:cacheprovider -rs
echo "total $(( $(date +%s) - T0 ))s"
