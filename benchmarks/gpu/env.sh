# Sourced by run.sh on the device: the carried wheels (.whl/) installed into /tmp/site, our packages as source,
# offline and NCCL-safe settings.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD:$PWD/packages/lora-data/src:$PWD/packages/lora-runtime/src:$PWD/packages/lora-cli/src
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 \
  NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 \
  TOKENIZERS_PARALLELISM=false WANDB_DISABLED=true HF_HOME=/tmp/hf
