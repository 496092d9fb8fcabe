"""Unsloth backend (CUDA): FastLanguageModel loading, Unsloth's LoRA kernels and fused chunked cross-entropy,
plus three things of ours that make the packed path fast and correct:

1. Padding-free packed rows. The loop sends rows [micro, seq_len] with `position_ids` that restart per sample and
   no attention mask. Unsloth detects packing only for a single row, so a forward pre-hook flattens the batch to
   [1, micro × seq_len] and passes `packed_seq_lengths` (pad tails are their own segments)::

       rows      [A A A B B B B p] [C C C C C D D D]  position_ids [0 1 2 0 1 2 3 0] [0 1 2 3 4 0 1 2]
       → one row [A A A B B B B p C C C C C D D D]  packed_seq_lengths [3, 4, 1, 5, 3]

   Attention then runs per sample (varlen), never across samples; labels and the token count are unchanged.
2. GQA varlen flash attention on torch builds whose `varlen_attn` lacks `enable_gqa` (torch 2.11): there Unsloth
   falls back to one SDPA launch per run of equal-length samples, 2.6× slower on real length spreads (measured on
   an H200, benchmarks/gpu/NOTES.md). We route it to aten's flash varlen kernel, which takes GQA natively.
3. Gradient checkpointing "auto" decided from the memory actually free: recomputation is a third of the FLOPs, so
   when the no-recompute activations of one micro-batch fit, it is off (×1.39 tokens/s measured), else Unsloth's
   offloaded checkpointing. The decision and its numbers are logged.

Under torchrun, unsloth_zoo's patched `Trainer.get_batch_samples` all-gathers the batch's token count over NCCL;
counted from CPU batches it failed on 2 H200s ("Tensors must be CUDA and dense"), so PackedTrainer moves each batch
to the GPU before that count (`PackedTrainer.get_batch_samples`).

`import unsloth` happens in `load` only: it patches transformers and TRL process-wide, and a peft run never
reaches this module's code.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

from lora_runtime.backends.base import DEFAULT_TARGETS
from lora_runtime.batching import GIB, Footprint, plan_batch, unsloth_footprint  # noqa: F401  (GIB: the doctest)
from lora_runtime.collate import flatten_packed_batch
from lora_runtime.config import LoraSftConfig
from lora_runtime.distributed import dist_env, print0


def choose_gradient_checkpointing(config: LoraSftConfig, model_config: Any, free_bytes: int) -> tuple[bool, str]:
    """(on?, reason) for a concrete micro batch. True/False are obeyed; "auto" is off when weights + one
    micro-batch's activations fit (`lora_runtime.batching`, which also sizes micro_batch_size="auto").

    >>> from types import SimpleNamespace as NS
    >>> qwen = NS(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
    ...           num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True)
    >>> cfg = LoraSftConfig("m", "d", "o", micro_batch_size=8)
    >>> choose_gradient_checkpointing(cfg, qwen, 139 * GIB)[0], choose_gradient_checkpointing(cfg, qwen, 24 * GIB)[0]
    (False, True)
    """
    if config.gradient_checkpointing != "auto":
        on = bool(config.gradient_checkpointing)
        return on, f"gradient_checkpointing={on} requested"
    micro = config.batch_plan(dist_env().world_size)[0]
    _, on, why = plan_batch(unsloth_footprint(model_config, config.load_in_4bit), seq_len=config.max_seq_len,
                            free=free_bytes, micro=micro, gc="auto", quota=None, rows_per_rank=micro)
    return on, why


def _flatten_hook(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    if args:  # positional input_ids: leave the call alone (the loop passes keywords)
        return None
    new = flatten_packed_batch(kwargs)
    return None if new is None else (args, new)


def patch_gqa_varlen() -> str:
    """Route Unsloth's packed attention to aten's flash varlen kernel where torch's varlen_attn lacks GQA."""
    import torch

    ad = sys.modules.get("unsloth.utils.attention_dispatch") or importlib.import_module(
        "unsloth.utils.attention_dispatch")
    if getattr(ad, "_TORCH_VARLEN_ATTN", None) is not None:
        return "torch varlen_attn (GQA) used by Unsloth as is"
    if not (hasattr(torch.ops.aten, "_flash_attention_forward") and hasattr(ad, "_LeanFlashVarlen")
            and torch.backends.cuda.is_flash_attention_available()):
        return "no flash varlen kernel: Unsloth's per-sample SDPA"

    def varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
        left, right = tuple(window_size)
        return ad._LeanFlashVarlen.apply(q, k, v, cu_q, max_q, (left, right) == (-1, 0), scale, left, right)

    ad._TORCH_VARLEN_ATTN = varlen
    ad._LEAN_VARLEN = True
    ad._varlen_can_use_cudnn = lambda *a, **k: False
    return f"torch {torch.__version__}: varlen_attn lacks enable_gqa, packed attention → aten flash varlen (GQA)"


class UnslothBackend:
    name = "unsloth"

    def __init__(self) -> None:
        self.gradient_checkpointing: bool | None = None

    def footprint(self, model_config: Any, four_bit: bool) -> Footprint:
        return unsloth_footprint(model_config, four_bit)

    def checkpointing_mode(self, config: LoraSftConfig) -> bool | str:
        return config.gradient_checkpointing  # "auto" is decided by memory

    def load(self, config: LoraSftConfig) -> tuple[Any, Any]:
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("the unsloth backend needs a CUDA GPU; use backend='peft' on a CPU")
        import unsloth  # noqa: F401  (first: patches transformers/TRL in this process)
        from transformers import AutoConfig
        from unsloth import FastLanguageModel

        print0(f"attention: {patch_gqa_varlen()}")
        model_config = AutoConfig.from_pretrained(config.model_path, trust_remote_code=config.trust_remote_code)
        if config.gradient_checkpointing == "auto":  # lora_sft resolves it with the micro batch (batching.resolve)
            free, _ = torch.cuda.mem_get_info()
            self.gradient_checkpointing, why = choose_gradient_checkpointing(config, model_config, free)
            print0(f"gradient checkpointing: {why}")
        else:
            self.gradient_checkpointing = bool(config.gradient_checkpointing)
        model, tokenizer = FastLanguageModel.from_pretrained(
            model_name=config.model_path, max_seq_length=config.max_seq_len, dtype=self._dtype(config),
            load_in_4bit=config.load_in_4bit, load_in_8bit=config.load_in_8bit,
            use_gradient_checkpointing="unsloth" if self.gradient_checkpointing else False,
            trust_remote_code=config.trust_remote_code, device_map=self._device_map(config),
            **self._quantization(config))
        model.config.use_cache = False
        print0(f"model: {type(model).__name__} from {config.model_path} via Unsloth "
               f"({'4-bit' if config.load_in_4bit else '8-bit' if config.load_in_8bit else 'bf16'} base)")
        return model, tokenizer

    def add_lora(self, model: Any, config: LoraSftConfig) -> Any:
        from unsloth import FastLanguageModel

        targets = config.target_modules or DEFAULT_TARGETS
        extra: dict[str, Any] = {}
        if config.use_dora:
            extra["use_dora"] = True
        if config.rank_pattern:
            extra["rank_pattern"] = dict(config.rank_pattern)
        if config.alpha_pattern:
            extra["alpha_pattern"] = dict(config.alpha_pattern)
        model = FastLanguageModel.get_peft_model(
            model, r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout, bias="none",
            target_modules=list(targets) if isinstance(targets, tuple | list) else targets,
            use_gradient_checkpointing="unsloth" if self.gradient_checkpointing else False,
            random_state=config.seed, use_rslora=config.use_rslora, init_lora_weights=config.init_lora_weights,
            loftq_config=dict(config.loftq_config or {}), **extra)
        model.register_forward_pre_hook(_flatten_hook, with_kwargs=True)
        trainable, total = model.get_nb_trainable_parameters()
        print0(f"LoRA r={config.lora_r} alpha={config.lora_alpha} on {sorted(targets)}: {trainable:,} trainable of "
               f"{total:,}; packed rows flattened to one padding-free row per micro-batch")
        return model

    def save_adapter(self, model: Any, out_dir: str | Path) -> Path:
        model.save_pretrained(str(out_dir), safe_serialization=True, save_embedding_layers=False)
        return Path(out_dir)

    def merge(self, adapter_dir: str | Path, out_dir: str | Path, config: LoraSftConfig) -> Path:
        """PEFT merge into the original (bf16) base: also right for a QLoRA adapter, and no 4-bit round trip."""
        from lora_runtime.merge import merge_adapter

        return merge_adapter(adapter_dir, config.model_path, out_dir, trust_remote_code=config.trust_remote_code)

    @staticmethod
    def _dtype(config: LoraSftConfig) -> Any:
        import torch

        if config.bf16 and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16 if config.fp16 or config.bf16 else torch.float32

    @staticmethod
    def _device_map(config: LoraSftConfig) -> Any:
        if config.enable_model_splitting:
            return "balanced"
        return {"": dist_env().local_rank}

    @staticmethod
    def _quantization(config: LoraSftConfig) -> dict[str, Any]:
        """An explicit BitsAndBytesConfig only when a bnb_4bit_* option is set (else Unsloth's own defaults)."""
        if not config.load_in_4bit or all(v is None for v in (config.bnb_4bit_quant_type, config.bnb_4bit_compute_dtype,
                                                               config.bnb_4bit_use_double_quant)):
            return {}
        import torch
        from transformers import BitsAndBytesConfig

        return {"quantization_config": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=config.bnb_4bit_quant_type or "nf4",
            bnb_4bit_compute_dtype=getattr(torch, config.bnb_4bit_compute_dtype or "bfloat16"),
            bnb_4bit_use_double_quant=True if config.bnb_4bit_use_double_quant is None
            else config.bnb_4bit_use_double_quant)}
