"""Fused kernels for the transformers + PEFT backend: liger-kernel's RoPE, RMSNorm, SwiGLU and fused linear +
cross-entropy (the loss is computed chunk by chunk from the last hidden states, so the [tokens, vocab] logits, their
fp32 copy and their gradient, about 12 bytes × vocab a token, are never materialised).

`kernels="auto"` on the peft backend first takes the compiled path where it is eligible (lora_runtime.compiled: its
own attention, loss and compiled layers, no liger), else liger where it is known to help and to be right, and says in
the log why it did or did not:

- the unsloth backend has its own fused cross-entropy, RMSNorm, SwiGLU and RoPE (liger on top broke its loss and its
  LoRA MLP kernel): never liger there;
- on a CPU there are no Triton kernels; without the liger-kernel package, nothing to apply;
- under FSDP2 sharding and with model splitting (not measured there) and for model types liger does not patch: the
  plain path.

`kernels="liger"` asks for it (refused at validation where it cannot run); `"none"` keeps the plain path. With
`lm_head` among the LoRA targets the fused loss is left out (it reads lm_head's base weight, not its adapter); the
other kernels still apply. liger patches a model type's module, not only this model: its RoPE function and its
RMSNorm and MLP classes, so every model of that type built later in the process uses liger's kernels too. The fused
loss skips the logits in training mode only; evaluation asks for it (`fused_loss_applied`).
tests/lora_runtime/test_kernels_gpu.py checks the loss and LoRA gradients against the plain path.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from lora_runtime.config import LoraSftConfig

PARTS = ("rope", "rms_norm", "swiglu", "fused_linear_cross_entropy")


def liger_installed() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def choose(config: LoraSftConfig, backend: str, model_type: str | None, cuda: bool) -> tuple[bool, str]:
    """(use liger, why) for this run. Only an explicit kernels="liger" can raise (where validation let it through)."""
    if config.kernels == "none":
        return False, "kernels='none': the plain transformers path"
    reasons = []
    if backend != "peft":
        reasons.append(f"the {backend} backend runs its own fused kernels")
    if not cuda:
        reasons.append("liger's Triton kernels need CUDA")
    if not liger_installed():
        reasons.append("the liger-kernel package is not installed (pip install liger-kernel)")
    if cuda and model_type is not None and liger_installed():
        try:
            if model_type not in _apply_fns():
                reasons.append(f"liger has no kernels for model type {model_type!r}")
        except ImportError as e:  # liger installed beside a Triton it cannot import
            reasons.append(f"liger-kernel does not import ({e})")
    if config.kernels == "auto" and config.sharding == "fsdp":
        reasons.append("sharding='fsdp' runs the plain path (liger is not measured under FSDP2); kernels='liger' "
                       "asks for it")
    if config.kernels == "auto" and config.enable_model_splitting:
        reasons.append("enable_model_splitting runs the plain path (liger is not measured across split devices); "
                       "kernels='liger' asks for it")
    if reasons and config.kernels == "liger":
        raise RuntimeError(f"kernels='liger' cannot run here: {'; '.join(reasons)}")
    if reasons:
        return False, f"kernels='auto' → plain path: {'; '.join(reasons)}"
    return True, f"kernels={config.kernels!r} → liger-kernel"


FUSED_FLAG = "lora_sft_fused_loss"  # set on the base model where liger's fused loss replaced its forward


def apply_liger(model: Any, targets: Any) -> str:
    """Patch `model` (a transformers model, before LoRA is added) in place; returns the log line."""
    import inspect

    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    parts = {p: True for p in PARTS}
    skipped = ""
    if targets_lm_head(targets):
        parts["fused_linear_cross_entropy"] = False
        skipped = " (fused linear cross-entropy left out: lm_head is a LoRA target)"
    _apply_liger_kernel_to_instance(model=model, cross_entropy=False, **parts)
    accepted = inspect.signature(_apply_fns()[model.config.model_type]).parameters
    applied = [p for p, on in parts.items() if on and p in accepted]  # liger drops what a model type lacks
    setattr(model, FUSED_FLAG, "fused_linear_cross_entropy" in applied)
    return f"kernels: liger {', '.join(applied)}{skipped}"


def fused_loss_applied(model: Any) -> bool:
    """Whether `model` (a PeftModel or the model under it) computes its loss with liger's fused kernel."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return bool(getattr(base, FUSED_FLAG, False))


# the whole module names a causal LM's output layer and embeddings have (PEFT matches a regex target against them)
MODULE_NAMES = {"lm_head": ("lm_head", "language_model.lm_head"),
                "embed_tokens": ("model.embed_tokens", "model.language_model.embed_tokens", "embed_tokens",
                                 "language_model.model.embed_tokens")}


def targets_lm_head(targets: Any, name: str = "lm_head") -> bool:
    r"""Whether LoRA `targets` reach the output layer (or the module `name`, e.g. "embed_tokens"): a name list naming
    it, or a regex that matches its whole module name, as PEFT matches it; "all-linear" never includes the output
    layer or the embeddings.

    >>> targets_lm_head(r".*(q_proj|lm_head)"), targets_lm_head(r"^(?!.*lm_head).*_proj$")
    (True, False)
    >>> targets_lm_head(r"model\.embed_.*|.*q_proj", "embed_tokens"), targets_lm_head(["q_proj", "lm_head"])
    (True, True)
    """
    import re

    if isinstance(targets, str):
        if targets == "all-linear":
            return False
        try:
            return any(re.fullmatch(targets, full) for full in MODULE_NAMES.get(name, (name,)))
        except re.error:  # PEFT would fail on it too
            return name in targets
    return any(t == name or str(t).endswith(f".{name}") for t in targets or ())


def embedding_targets(targets: Any) -> list[str]:
    """Which of lm_head and embed_tokens LoRA `targets` reach."""
    return [name for name in ("lm_head", "embed_tokens") if targets_lm_head(targets, name)]


def _apply_fns() -> dict[str, Any]:
    """liger's patch function of each model type it supports."""
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    return MODEL_TYPE_TO_APPLY_LIGER_FN
