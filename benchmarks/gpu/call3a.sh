#!/usr/bin/env bash
# Device call 3a (4 H200s of one host, or 2): `lora-cli train --gpus N` scaling for N = 1, 2[, 4] (unsloth backend,
# peft where unsloth fails under torchrun), then the Llama-3.1-8B shape at 8,192 context on one GPU, ours vs the
# Unsloth hand loop.
set -u
source benchmarks/gpu/lib.sh
NG=$(python3 -c "import torch; print(torch.cuda.device_count())"); echo "GPUs: $NG"
nvidia-smi topo -m 2>/dev/null | head -8
step build 100 python3 -c "from benchmarks.gpu import common; common.build_model('qwen1.5b', '/tmp/models/qwen1.5b', '.gpu/tok_qwen1.5b')"
M=/tmp/models/qwen1.5b; S=.gpu/shards_qwen1.5b_2048; R=.gpu/records.jsonl
G=1,2; [ "$NG" -ge 4 ] && G=1,2,4
step scaling 300 python3 -m benchmarks.gpu.scaling $M $S $RES --gpus $G
step build8b 120 python3 -c "from benchmarks.gpu import common; common.build_model('llama8b', '/tmp/models/llama8b', '.gpu/tok_llama8b')"
L=/tmp/models/llama8b; S8=.gpu/shards_llama8b_8192
step ours8b 150 python3 -m benchmarks.gpu.ours $L $S8 $RES --prefix ours8b --shape llama8b --seq-len 8192 \
  --steps 10 --warmup 3 --budget-s 110 --runs unsloth_auto_mb1,unsloth_gc_mb1
step loops8b 110 python3 -m benchmarks.gpu.loops $L $R $RES --shape llama8b --seq-len 8192 --steps 10 --warmup 3 \
  --variants rows1_gc
finish
