#!/usr/bin/env bash
# Device call 1 (one H200): the peers baseline and our fast-path levers, one process per peer, in one command.
#   bash benchmarks/gpu/call1.sh      (on the device, from the repo root; $OUT gets results.json, table.md, logs.tgz)
set -u
T0=$(date +%s); DEADLINE=${DEADLINE:-565}
source benchmarks/gpu/env.sh
RES=/tmp/res; LOGS=/tmp/logs; mkdir -p $RES $LOGS /tmp/models
left() { echo $(( DEADLINE - ($(date +%s) - T0) )); }
step() {  # step NAME CAP_S CMD...  (skipped when under 45 s remain; capped at what remains)
  local name=$1 cap=$2; shift 2; local l; l=$(left)
  if [ "$l" -lt 45 ]; then echo "SKIP $name (only ${l}s left)"; return; fi
  [ "$cap" -gt "$l" ] && cap=$l
  echo "=== $name (cap ${cap}s, t=$(( $(date +%s) - T0 ))s)"
  timeout -k 5 "$cap" "$@" > $LOGS/$name.log 2>&1; echo "rc=$? $name"; grep -h "^RESULT\|^CEIL\|^loaded" $LOGS/$name.log
}
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
python3 -m benchmarks.gpu.report $RES $OUT/results.json | tee $OUT/table.md
tar czf $OUT/logs.tgz -C /tmp logs
echo "total $(( $(date +%s) - T0 ))s"
