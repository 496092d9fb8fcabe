#!/usr/bin/env bash
# One entry for a GPU machine without network, from the repo root:
#   bash benchmarks/gpu/run.sh SCENARIO [SCENARIO...] [--lanes N] [any option of python -m benchmarks.gpu]
# Needs the carried wheels in .whl/ (installed here by env.sh) and the inputs made on a CPU machine by
# `python -m benchmarks.gpu prepare .gpu` in .gpu/ (the device has no polars). Rows are appended to
# $OUT/results.jsonl (benchmarks/results.jsonl when OUT is unset); per-process logs go to $OUT/logs.tgz; the short
# table of this invocation's rows is printed last.
set -u
source benchmarks/gpu/env.sh
DEST=${OUT:-benchmarks}
nvidia-smi --query-gpu=index,name,memory.used,clocks.sm --format=csv,noheader
python3 -m benchmarks.gpu "$@" --out "$DEST/results.jsonl" --work /tmp/lora_bench
rc=$?
[ -n "${OUT:-}" ] && tar czf "$OUT/logs.tgz" -C /tmp/lora_bench logs
exit $rc
