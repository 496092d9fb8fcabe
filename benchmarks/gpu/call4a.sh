#!/usr/bin/env bash
# Device call 4a (4 H200s of one host): three independent tracks at once, one GPU set each, so a table's rows still
# come from one GPU of one run.
#   A (GPU 0): issue 5's same-run table: the usage guide's literal call (micro_batch_size="auto", checkpointing
#      auto) and the memory-saving / QLoRA settings of ours, beside training-hub and the Unsloth hand loop.
#   B (GPU 1): loss parity of the unsloth backend vs TRL+PEFT (separate processes), the unsloth backend's GPU tests,
#      the peft backend's pytest-benchmark baseline.
#   C (GPUs 2,3): `lora-cli train --gpus 1` vs `--gpus 2` on the unsloth backend with the same effective batch (16):
#      scaling and the 1-vs-2-GPU loss curves (falls back to peft, and says so, if unsloth fails under torchrun).
set -u
source benchmarks/gpu/lib.sh
nvidia-smi --query-gpu=index,name,memory.used,clocks.sm --format=csv,noheader
step build 100 python3 -c "from benchmarks.gpu import common; common.build_model('qwen1.5b', '/tmp/models/qwen1.5b', '.gpu/tok_qwen1.5b')"
M=/tmp/models/qwen1.5b; S=.gpu/shards_qwen1.5b_2048; R=.gpu/records.jsonl; P=/tmp/parity; cp -r .gpu/parity $P
(
  export CUDA_VISIBLE_DEVICES=0
  step ours_unsloth 230 python3 -m benchmarks.gpu.ours $M $S $RES --budget-s 200 \
    --runs unsloth_auto_mbauto,unsloth_auto_mb2,unsloth_gc_mb8,unsloth_gc_mb8_q4,unsloth_auto_mbauto_q4
  step th 110 python3 -m benchmarks.gpu.peers th $M $R $RES
  step loops_bf16 100 python3 -m benchmarks.gpu.loops $M $R $RES --variants rows8_gc --budget-s 80
) > /tmp/trackA.txt 2>&1 &
(
  export CUDA_VISIBLE_DEVICES=1
  step parity_ours 120 python3 -m benchmarks.gpu.parity side $P ours --backend unsloth --steps 100
  step parity_trl 120 python3 -m benchmarks.gpu.parity side $P trl --steps 100
  python3 -m benchmarks.gpu.parity compare $P $OUT/parity_gpu_unsloth.json 2>&1 | tail -2
  step unsloth_tests 150 python3 -m pytest tests/lora_runtime/test_backend_unsloth.py tests/lora_runtime/test_batching.py -q -x -p no:cacheprovider -rs
  step bench_peft 120 python3 -m pytest benchmarks/test_train.py -k peft --benchmark-enable -p no:cacheprovider \
    --benchmark-json $OUT/h200_peft.json -q
) > /tmp/trackB.txt 2>&1 &
(
  export CUDA_VISIBLE_DEVICES=2,3
  step scaling_ebs 330 python3 -m benchmarks.gpu.scaling $M $S $RES --gpus 1,2 --backend unsloth --fallback peft \
    --ebs 16 --micro 8 --steps 30
) > /tmp/trackC.txt 2>&1 &
wait
for t in A B C; do echo "--- track $t"; cat /tmp/track$t.txt; done
cp $P/losses_*.json $OUT/ 2>/dev/null
finish
