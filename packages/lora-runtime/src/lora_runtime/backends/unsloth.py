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
   an H200, benchmarks/RESULTS.md). We route it to aten's flash varlen kernel, which takes GQA natively.
3. Recomputation as the batch plan decided it (lora_runtime.batching: from the memory budget, possibly only some
   layers): Unsloth's offloaded checkpointing on `plan.recomputed_layers` layers, none when the activations fit
   (×1.39 tokens/s measured without recomputation).

Under torchrun, unsloth_zoo's patched `Trainer.get_batch_samples` all-gathers the batch's token count over NCCL;
counted from CPU batches it failed on 2 H200s ("Tensors must be CUDA and dense"), so PackedTrainer moves each batch
to the GPU before that count (`PackedTrainer.get_batch_samples`).

`import unsloth` happens in `load` only (or earlier through `import_unsloth`, the one place that imports it): it
patches transformers process-wide, and a peft run never reaches this module's code.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

from lora_runtime.backends.base import (
    DEFAULT_TARGETS,
    BackendBase,
    flatten_hook,
    quantization_config,
)
from lora_runtime.batching import BatchPlan, Footprint, unsloth_footprint
from lora_runtime.config import LoraSftConfig
from lora_runtime.distributed import dist_env, print0

TRL_PATCHES_ENV = "LORA_SFT_UNSLOTH_TRL_PATCHES"


def import_unsloth(name: str = "unsloth") -> None:
    """`import unsloth`, without its rewriting of TRL's trainers (SFT, DPO, GRPO, ... regenerated from source), which
    took 12 s of every run's start-up on an H200 host (py-spy, benchmarks/gpu/profile.py) for classes this runtime
    never uses: the loop is transformers' Trainer.

    Unsloth skips that rewriting under UNSLOTH_ALLOW_CPU=1. On a CUDA host the variable changes nothing else at import
    (every other use of it is guarded by `not torch.cuda.is_available()`), so it is set for the import only, and
    not on ROCm (where Unsloth would call the device "cuda"), nor where the user set it, nor with
    LORA_SFT_UNSLOTH_TRL_PATCHES=1 (for scripts that train with TRL's trainers in the same process).
    """
    if name in sys.modules:
        return
    import torch

    skip = (os.environ.get(TRL_PATCHES_ENV) != "1" and "UNSLOTH_ALLOW_CPU" not in os.environ
            and torch.cuda.is_available() and getattr(torch.version, "hip", None) is None)
    if skip:
        os.environ["UNSLOTH_ALLOW_CPU"] = "1"
    try:
        importlib.import_module(name)
    finally:
        if skip:
            del os.environ["UNSLOTH_ALLOW_CPU"]


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

    setattr(ad, "_TORCH_VARLEN_ATTN", varlen)  # noqa: B010  (unsloth's private module globals)
    setattr(ad, "_LEAN_VARLEN", True)  # noqa: B010
    setattr(ad, "_varlen_can_use_cudnn", lambda *a, **k: False)  # noqa: B010
    return f"torch {torch.__version__}: varlen_attn lacks enable_gqa, packed attention → aten flash varlen (GQA)"


class UnslothBackend(BackendBase):
    name = "unsloth"
    def checkpointing_by_memory(self, config: LoraSftConfig) -> bool:
        return True

    def footprint(self, model_config: Any, config: LoraSftConfig) -> Footprint:
        return unsloth_footprint(model_config, config.load_in_4bit)

    def load(self, config: LoraSftConfig, plan: BatchPlan) -> tuple[Any, Any]:
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("the unsloth backend needs a CUDA GPU; use backend='peft' on a CPU")
        import_unsloth()  # first: patches transformers in this process
        from unsloth import FastLanguageModel

        print0(f"attention: {patch_gqa_varlen()}")
        print0("kernels: Unsloth's own (fused chunked cross-entropy, RMSNorm, SwiGLU, RoPE, LoRA MLP/QKV)")
        quantization = quantization_config(config, defaults_apply=False)  # else Unsloth's own 4-bit defaults
        model, tokenizer = FastLanguageModel.from_pretrained(
            model_name=config.model_path, max_seq_length=config.max_seq_len, dtype=self._dtype(config),
            load_in_4bit=config.load_in_4bit, load_in_8bit=config.load_in_8bit,
            use_gradient_checkpointing="unsloth" if plan.gradient_checkpointing else False,
            trust_remote_code=config.trust_remote_code, device_map=self._device_map(config),
            **({"quantization_config": quantization} if quantization is not None else {}))
        model.config.use_cache = False
        print0(f"model: {type(model).__name__} from {config.model_path} via Unsloth "
               f"({'4-bit' if config.load_in_4bit else '8-bit' if config.load_in_8bit else 'bf16'} base)")
        return model, tokenizer

    def add_lora(self, model: Any, config: LoraSftConfig, plan: BatchPlan) -> Any:
        from unsloth import FastLanguageModel

        targets = config.target_modules or DEFAULT_TARGETS
        extra: dict[str, Any] = {}
        if config.use_dora:
            extra["use_dora"] = True
        if config.rank_pattern:
            extra["rank_pattern"] = dict(config.rank_pattern)
        if config.alpha_pattern:
            extra["alpha_pattern"] = dict(config.alpha_pattern)
        layers = (getattr(model.config, "text_config", None) or model.config).num_hidden_layers
        if plan.gradient_checkpointing and plan.recomputed_layers is not None:
            # Unsloth's own partial checkpointing: these many layers (evenly spaced, ending at the last) keep their
            # activations; its per-layer switch survives the re-arming that a plain per-layer flag would not
            extra["checkpoint_skip_layers"] = layers - plan.recomputed_layers
        model = FastLanguageModel.get_peft_model(
            model, r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout, bias="none",
            target_modules=list(targets) if isinstance(targets, tuple | list) else targets,
            use_gradient_checkpointing="unsloth" if plan.gradient_checkpointing else False,
            random_state=config.seed, use_rslora=config.use_rslora, init_lora_weights=config.init_lora_weights,
            loftq_config=dict(config.loftq_config or {}), **extra)
        model.register_forward_pre_hook(flatten_hook(keep_seq_lengths=True), with_kwargs=True)
        recomputing = "off" if not plan.gradient_checkpointing else (
            f"on for {plan.recomputed_layers if plan.recomputed_layers is not None else layers} of {layers} layers")
        trainable, total = model.get_nb_trainable_parameters()
        print0(f"LoRA r={config.lora_r} alpha={config.lora_alpha} on {sorted(targets)}: {trainable:,} trainable of "
               f"{total:,}; packed rows flattened to one padding-free row per micro-batch; gradient checkpointing "
               f"{recomputing}")
        return model

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
