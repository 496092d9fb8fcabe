#!/usr/bin/env bash
# Device call 1 (one H200): the peers baseline and our fast-path levers, one process per peer, in one command.
#   bash benchmarks/gpu/call1.sh      (on the device, from the repo root; $OUT gets results.json, table.md, logs.tgz)
set -u
source benchmarks/gpu/lib.sh  # env, deadline, step, finish
nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv | tee $LOGS/nvidia-smi.txt
step ceilings 60 python3 benchmarks/gpu/ceilings.py /tmp/ceilings.json
step build 120 python3 -c "from benchmarks.gpu import common; common.build_model('qwen1.5b', '/tmp/models/qwen1.5b', '.gpu/tok')"
M=/tmp/models/qwen1.5b; R=.gpu/records.jsonl
step loops_bf16 210 python3 -m benchmarks.gpu.loops $M $R $RES --budget-s 180
step th 110 python3 -m benchmarks.gpu.peers th $M $R $RES
step trl_peft 100 python3 -m benchmarks.gpu.peers trl_peft $M $R $RES
step unsloth_trl 110 python3 -m benchmarks.gpu.peers unsloth_trl $M $R $RES
step loops_q4 120 python3 -m benchmarks.gpu.loops $M $R $RES --4bit --variants rows8_gc,packed8_gc_varlen,packed8_nogc_varlen --budget-s 100
cp /tmp/ceilings.json $OUT/ 2>/dev/null
finish
