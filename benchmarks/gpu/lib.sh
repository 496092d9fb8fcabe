# Sourced by the call scripts on the device: wheels + environment (env.sh), a deadline, and `step`, which runs one
# measurement process with a time cap, logs it to $LOGS/NAME.log and echoes its RESULT lines.
source benchmarks/gpu/env.sh
T0=$(date +%s); DEADLINE=${DEADLINE:-565}
RES=/tmp/res; LOGS=/tmp/logs; mkdir -p $RES $LOGS /tmp/models
left() { echo $(( DEADLINE - ($(date +%s) - T0) )); }
step() {  # step NAME CAP_S CMD...  (skipped when under 45 s remain; capped at what remains)
  local name=$1 cap=$2; shift 2; local l; l=$(left)
  if [ "$l" -lt 45 ]; then echo "SKIP $name (only ${l}s left)"; return; fi
  [ "$cap" -gt "$l" ] && cap=$l
  echo "=== $name (cap ${cap}s, t=$(( $(date +%s) - T0 ))s)"
  timeout -k 5 "$cap" "$@" > $LOGS/$name.log 2>&1; echo "rc=$? $name"
  grep -h "^RESULT\|^CEIL\|^loaded\|^PROFILE\|passed\|failed\|error" $LOGS/$name.log | grep -v "^  " | tail -12
}
finish() {  # results.json + table.md + logs.tgz into $OUT
  python3 -m benchmarks.gpu.report $RES $OUT/results.json | tee $OUT/table.md
  tar czf $OUT/logs.tgz -C /tmp logs
  echo "total $(( $(date +%s) - T0 ))s"
}
