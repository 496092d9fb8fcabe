"""transformers + PEFT backend: runs on CPU and CUDA; the tests' backend.

Packed samples must not attend to each other. The collator sends `position_ids` that restart per sample and no
attention mask; with `use_cache=False`, transformers 5 derives from them a block-diagonal causal mask for SDPA/eager
(`masking_utils.find_packed_sequence_indices`), and `cu_seq_lens` for FlashAttention-2 varlen, but the latter only
for a batch of ONE row: with flash_attention_2 a forward pre-hook flattens [micro, n] rows to [1, micro·n]
(`flatten_for_varlen`). `test_packed_row_loss_equals_samples_alone` checks the SDPA/eager paths on the CPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lora_runtime.backends.base import DEFAULT_TARGETS, wants_gradient_checkpointing
from lora_runtime.collate import flatten_packed_batch
from lora_runtime.config import LoraSftConfig
from lora_runtime.distributed import dist_env, print0


def attn_implementation(config: LoraSftConfig) -> str:
    """flash_attention_2 when asked (or available on CUDA with flash_attention=None), else sdpa."""
    import importlib.util

    import torch

    has_fa = torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None
    if config.flash_attention is True:
        if not has_fa:
            raise RuntimeError("flash_attention=True needs CUDA and the flash-attn package; install it, or pass "
                               "flash_attention=None (SDPA with block-diagonal masks)")
        return "flash_attention_2"
    return "flash_attention_2" if has_fa and config.flash_attention is None else "sdpa"


def quantization_config(config: LoraSftConfig) -> Any:
    if not (config.load_in_4bit or config.load_in_8bit):
        return None
    import torch
    from transformers import BitsAndBytesConfig

    if not torch.cuda.is_available():
        raise RuntimeError("load_in_4bit/load_in_8bit need a CUDA GPU (bitsandbytes kernels); drop them on a CPU")
    if config.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=config.bnb_4bit_quant_type or "nf4",
        bnb_4bit_compute_dtype=getattr(torch, config.bnb_4bit_compute_dtype or "bfloat16"),
        bnb_4bit_use_double_quant=True if config.bnb_4bit_use_double_quant is None else config.bnb_4bit_use_double_quant)


class PeftBackend:
    name = "peft"

    def footprint(self, model_config: Any, four_bit: bool) -> Any:
        from lora_runtime.batching import peft_footprint

        return peft_footprint(model_config, four_bit)

    def checkpointing_mode(self, config: LoraSftConfig) -> bool:
        return wants_gradient_checkpointing(config)  # auto: on with CUDA (SDPA activations are large)

    def load(self, config: LoraSftConfig) -> tuple[Any, Any]:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        cuda = torch.cuda.is_available()
        tokenizer = AutoTokenizer.from_pretrained(config.model_path, trust_remote_code=config.trust_remote_code)
        device_map: Any = None
        if config.enable_model_splitting:
            device_map = "balanced"
        elif cuda and config.sharding != "fsdp":  # fsdp: loaded on the CPU, fully_shard moves each GPU its shards
            device_map = {"": dist_env().local_rank}
        attn = attn_implementation(config)
        dtype = torch.bfloat16 if cuda and config.bf16 and torch.cuda.is_bf16_supported() else torch.float32
        model = AutoModelForCausalLM.from_pretrained(
            config.model_path, dtype=dtype, attn_implementation=attn, device_map=device_map,
            quantization_config=quantization_config(config), trust_remote_code=config.trust_remote_code)
        model.config.use_cache = False  # a KV cache disables transformers' packed-sequence mask
        print0(f"model: {type(model).__name__} from {config.model_path}, weights {dtype}, attention {attn}")
        return model, tokenizer

    def add_lora(self, model: Any, config: LoraSftConfig) -> Any:
        import torch
        from peft import LoftQConfig, LoraConfig, get_peft_model, prepare_model_for_kbit_training

        gc = wants_gradient_checkpointing(config)
        if config.load_in_4bit or config.load_in_8bit:
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gc)
        torch.manual_seed(config.seed)
        lora = LoraConfig(
            r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout, bias="none",
            target_modules=_targets(model, config.target_modules), task_type="CAUSAL_LM",
            use_rslora=config.use_rslora, use_dora=config.use_dora, init_lora_weights=config.init_lora_weights,
            rank_pattern=dict(config.rank_pattern or {}), alpha_pattern=dict(config.alpha_pattern or {}),
            loftq_config=LoftQConfig(**config.loftq_config) if config.loftq_config else {})
        model = get_peft_model(model, lora)
        if getattr(model.config, "_attn_implementation", None) == "flash_attention_2":
            model.register_forward_pre_hook(flatten_for_varlen, with_kwargs=True)
            print0("attention: flash_attention_2 varlen; each micro-batch is flattened to one padding-free row")
        if gc:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        trainable, total = model.get_nb_trainable_parameters()
        print0(f"LoRA r={config.lora_r} alpha={config.lora_alpha} on {sorted(lora.target_modules)}: "
               f"{trainable:,} trainable of {total:,} parameters; gradient checkpointing {'on' if gc else 'off'}")
        return model

    def save_adapter(self, model: Any, out_dir: str | Path) -> Path:
        # Base weights never train (no modules_to_save), so a LoRA on lm_head/embeddings needs no copy of them.
        model.save_pretrained(out_dir, safe_serialization=True, save_embedding_layers=False)
        return Path(out_dir)

    def merge(self, adapter_dir: str | Path, out_dir: str | Path, config: LoraSftConfig) -> Path:
        from lora_runtime.merge import merge_adapter

        return merge_adapter(adapter_dir, config.model_path, out_dir, trust_remote_code=config.trust_remote_code)


def _targets(model: Any, requested: tuple[str, ...] | str | None) -> Any:
    """`requested` as given; None → the Unsloth default projections present in `model` (else 'all-linear')."""
    if requested is not None:
        return list(requested) if isinstance(requested, tuple) else requested
    import torch

    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    present = [t for t in DEFAULT_TARGETS if t in names]
    return present or "all-linear"


def flatten_for_varlen(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Forward pre-hook: packed rows [b, n] → one row [1, b·n] with the same restarting `position_ids` and labels."""
    new = None if args else flatten_packed_batch(kwargs)
    if new is None:
        return None
    new.pop("packed_seq_lengths")  # Unsloth's kwarg; transformers reads the boundaries from position_ids
    return args, new
