#!/usr/bin/env bash
# Device call 4b (4 H200s of one host): issue 6's model splitting, a 70B-shaped model (random bf16 weights, 141 GB:
# more than one H200 holds with training state) trained with enable_model_splitting over the 4 GPUs; beside it on
# GPU 3 (a 4-layer model, ~1 GB), the loss parity of the unsloth backend vs TRL+PEFT (TRL 1.15: no lm_head LoRA);
# then `lora-cli train --gpus 1` vs `--gpus 4` on the unsloth backend, same effective batch (32), loss curves compared.
set -u
source benchmarks/gpu/lib.sh
df -h /dev/shm /tmp | tail -2
P=/tmp/parity; cp -r .gpu/parity $P
(
  export CUDA_VISIBLE_DEVICES=3
  step parity_ours 120 python3 -m benchmarks.gpu.parity side $P ours --backend unsloth --steps 100 --no-lm-head
  step parity_trl 120 python3 -m benchmarks.gpu.parity side $P trl --steps 100 --no-lm-head
  python3 -m benchmarks.gpu.parity compare $P $OUT/parity_gpu_unsloth.json 2>&1 | tail -2
) > /tmp/trackP.txt 2>&1 &
step split70b 330 python3 -m benchmarks.gpu.split $RES --tok .gpu/tok_llama8b --shards .gpu/shards_llama8b_8192 \
  --steps 8 --budget-s 315
rm -rf /dev/shm/llama70b /tmp/models/llama70b
wait
echo "--- parity track"; cat /tmp/trackP.txt; cp $P/losses_*.json $OUT/ 2>/dev/null
step build 60 python3 -c "from benchmarks.gpu import common; common.build_model('qwen1.5b', '/tmp/models/qwen1.5b', '.gpu/tok_qwen1.5b')"
step scaling4 200 python3 -m benchmarks.gpu.scaling /tmp/models/qwen1.5b .gpu/shards_qwen1.5b_2048 $RES --gpus 1,4 \
  --backend unsloth --fallback peft --ebs 32 --micro 8 --steps 20
finish
