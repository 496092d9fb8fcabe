"""`micro_batch_size="auto"` and `gradient_checkpointing="auto"`, decided from the memory actually free.

Why a GPU wants bigger forward passes than training-hub's fixed micro batch of 2 (one H200, Qwen2.5-1.5B shape,
rows of 2048 tokens, benchmarks/gpu/NOTES.md): 2 rows a pass ran 21.2k tokens/s, host-bound (~190 ms of Python and
kernel launches a step for ~75 ms of GPU work); 8 rows ran 53.5k and 16 rows 55.6k. So on a GPU "auto" takes the
largest micro batch of up to `TARGET_TOKENS` tokens a pass that fits, without recomputation when that fits too
(recomputation is a third of the FLOPs). On a CPU, auto is training-hub's 2: a larger pass only costs RAM there.

What it does to the optimizer step (rows per step = micro × accumulation × world):
- with `effective_batch_size` set, nothing: auto picks a divisor of effective_batch_size / world, and the
  accumulation makes up the rest, so the gradient of a step is the same sum over the same rows;
- without it (accumulation 1), a larger micro batch is a larger optimizer batch. Auto keeps at least
  `MIN_STEPS_PER_EPOCH` steps an epoch and never goes below 2; pass micro_batch_size=2 for training-hub's exact batch.
A resumed run without effective_batch_size takes the micro batch its checkpoint recorded (the data order depends on
it); with it, only micro × accumulation matters, so auto re-plans for the memory free now.

    >>> fp = Footprint(weights=3e9, per_token_off=2.3e6, per_token_on=1.6e5)
    >>> plan_batch(fp, seq_len=2048, free=139 * GIB, micro="auto", gc="auto", quota=None, rows_per_rank=900)[:2]
    (8, False)
    >>> plan_batch(fp, seq_len=2048, free=24 * GIB, micro="auto", gc="auto", quota=None, rows_per_rank=900)[:2]
    (8, True)
    >>> plan_batch(fp, seq_len=2048, free=139 * GIB, micro="auto", gc="auto", quota=12, rows_per_rank=900)[:2]
    (6, False)
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GIB = 1024**3
HEADROOM_BYTES = 6 * GIB  # CUDA context, allocator fragmentation, optimizer state, CE chunks
ACT_MARGIN = 1.15  # over the estimates below, which matched measured H200 runs to ~4-15%
TARGET_TOKENS = 16_384  # tokens a forward pass: past it the H200 measured +4% for 2× the memory
MIN_STEPS_PER_EPOCH = 16
CPU_MICRO = 2  # training-hub's default


@dataclass(frozen=True)
class Footprint:
    """GPU bytes of one training process: fixed (weights) + per token of a micro-batch, with and without checkpointing."""

    weights: float
    per_token_off: float
    per_token_on: float

    def need(self, tokens: int, gc: bool) -> float:
        return self.weights + HEADROOM_BYTES + tokens * (self.per_token_on if gc else self.per_token_off)


def _dims(model_config: Any) -> tuple[int, int, int, int]:
    c = getattr(model_config, "text_config", None) or model_config
    return c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size


def layer_bytes_per_token(model_config: Any) -> float:
    """bf16 activations one decoder layer keeps per token for backward (Unsloth's kernels).

    Calibrated on an H200: Qwen2.5-1.5B shape, 16,384 tokens a step, no recomputation, peak 34.1 GiB with 3.3 GiB of
    weights → 2.0 MB/token for 28 layers, against 28 × (10 × 1536 + 2.2 × 8960) × 2 B = 1.96 MB/token here.
    """
    h, i, _, _ = _dims(model_config)
    return (10 * h + 2.2 * i) * 2


def weight_bytes(model_config: Any, four_bit: bool) -> float:
    c = getattr(model_config, "text_config", None) or model_config
    h, i, n, vocab = _dims(model_config)
    heads = c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or h // heads
    experts = next((int(getattr(c, k)) for k in ("num_local_experts", "num_experts", "n_routed_experts")
                    if isinstance(getattr(c, k, None), int) and getattr(c, k) > 1), 1)  # MoE: every expert is resident
    mlp = 3 * h * (getattr(c, "moe_intermediate_size", None) or i if experts > 1 else i) * experts
    layers = n * (2 * h * heads * head_dim + 2 * h * kv * head_dim + mlp)
    embed = vocab * h * (1 if getattr(c, "tie_word_embeddings", False) else 2)
    return layers * (0.56 if four_bit else 2.0) + embed * 2.0


def unsloth_footprint(model_config: Any, four_bit: bool) -> Footprint:
    """Unsloth: fused chunked cross-entropy (no full logits); with checkpointing, offloaded layer inputs, so about
    two layers' activations live at once (measured: 1.7 GiB over the weights for 16k tokens of the 1.5B shape)."""
    layer = layer_bytes_per_token(model_config)
    n = _dims(model_config)[2]
    return Footprint(weight_bytes(model_config, four_bit), n * layer * ACT_MARGIN, 2 * layer * ACT_MARGIN)


def peft_footprint(model_config: Any, four_bit: bool) -> Footprint:
    """transformers + PEFT: full logits in bf16, their fp32 copy and gradient (~12 B × vocab a token) dominate
    (measured 32.4 GiB for 16k tokens of the 1.5B shape with checkpointing, where this says 35 GiB)."""
    h, _, n, vocab = _dims(model_config)
    layer, logits = layer_bytes_per_token(model_config), 12 * vocab
    return Footprint(weight_bytes(model_config, four_bit), 1.5 * n * layer + logits, n * h * 2 + 2 * layer + logits)


def plan_batch(footprint: Footprint, *, seq_len: int, free: float, micro: int | str, gc: bool | str,
               quota: int | None, rows_per_rank: int) -> tuple[int, bool, str]:
    """(micro, gradient checkpointing on?, reason). `quota` = effective_batch_size / world when that is set."""
    if micro == "auto":
        cap = max(1, TARGET_TOKENS // seq_len)
        if quota is not None:
            candidates = [m for m in range(min(cap, quota), 0, -1) if quota % m == 0]
            why_cap = f"a divisor of effective_batch_size/world = {quota}, up to {cap} rows = {TARGET_TOKENS:,} tokens"
        else:
            cap = min(cap, max(CPU_MICRO, rows_per_rank // MIN_STEPS_PER_EPOCH))
            candidates = list(range(cap, 0, -1))
            why_cap = (f"up to {cap} rows ({TARGET_TOKENS:,} tokens a pass, ≥ {MIN_STEPS_PER_EPOCH} steps an epoch "
                       f"of {rows_per_rank:,} rows)")
    else:
        candidates, why_cap = [int(micro)], ""
    modes = [False, True] if gc == "auto" else [bool(gc)]
    for m in candidates:
        for on in modes:
            need = footprint.need(m * seq_len, on)
            if need <= free:
                return m, on, _reason(footprint, m, seq_len, on, need, free, micro, gc, why_cap)
    m, on = candidates[-1], modes[-1]
    need = footprint.need(m * seq_len, on)
    return m, on, _reason(footprint, m, seq_len, on, need, free, micro, gc, why_cap) + " (does not fit: may OOM)"


def _reason(fp: Footprint, m: int, seq_len: int, on: bool, need: float, free: float, micro: Any, gc: Any,
            why_cap: str) -> str:
    parts = [f"micro_batch_size {'auto → ' if micro == 'auto' else ''}{m}"
             + (f" ({why_cap})" if why_cap else ""),
             f"gradient checkpointing {'auto → ' if gc == 'auto' else ''}{'on' if on else 'off'}"]
    act = need - fp.weights - HEADROOM_BYTES
    numbers = (f"activations for {m} × {seq_len} tokens ≈ {act / GIB:.1f} GiB + weights {fp.weights / GIB:.1f} GiB + "
               f"{HEADROOM_BYTES / GIB:.0f} GiB headroom = {need / GIB:.1f} GiB vs {free / GIB:.1f} GiB free")
    return "; ".join(parts) + f": {numbers}"


def free_gpu_bytes(config: Any) -> float:
    """Free memory this rank's GPU (all visible GPUs with model splitting), min over ranks under torchrun."""
    import torch

    from lora_runtime.distributed import all_reduce_min, dist_env

    if config.enable_model_splitting:
        free = sum(torch.cuda.mem_get_info(d)[0] for d in range(torch.cuda.device_count()))
    else:
        free = torch.cuda.mem_get_info(dist_env().local_rank)[0]
    return all_reduce_min(float(free))


def resolve(config: Any, backend: Any, rows: int) -> Any:
    """The config with micro_batch_size="auto" made concrete (and, where the backend decides it by memory, i.e.
    unsloth on CUDA, gradient_checkpointing="auto" too), validated again and logged on rank 0.

    Explicit values come back as given; a model config this module cannot size (no `intermediate_size`, ...) falls
    back to training-hub's 2 with the reason logged.
    """
    from lora_runtime.distributed import dist_env, print0

    world = dist_env().world_size
    quota = config.effective_batch_size // world if config.effective_batch_size else None
    micro = config.micro_batch_size
    if micro == "auto" and quota is None:  # with effective_batch_size the data order depends on micro × accum only
        recorded = checkpointed_micro(config)
        if recorded is not None:
            print0(f"micro_batch_size: auto → {recorded}, as recorded by the checkpoint this run resumes")
            micro = recorded
    gc = backend.checkpointing_mode(config) if hasattr(backend, "checkpointing_mode") else config.gradient_checkpointing
    if micro != "auto" and gc != "auto":
        return dataclasses.replace(config, micro_batch_size=micro).validate(world_size=world)
    import torch

    if torch.cuda.is_available() and hasattr(backend, "footprint"):
        from transformers import AutoConfig

        model_config = AutoConfig.from_pretrained(config.model_path, trust_remote_code=config.trust_remote_code)
        try:
            footprint = backend.footprint(model_config, config.load_in_4bit)
        except AttributeError as e:  # a config without the fields the estimate reads (GPT-2 style names)
            why = f"cannot size {type(model_config).__name__} ({e})"
        else:
            m, on, plan = plan_batch(footprint, seq_len=config.max_seq_len, free=free_gpu_bytes(config), micro=micro,
                                     gc=gc, quota=quota, rows_per_rank=max(1, rows // world))
            print0(f"memory plan: {plan}")
            return dataclasses.replace(config, micro_batch_size=m, gradient_checkpointing=on).validate(world_size=world)
    else:
        why = "no CUDA GPU to size it by"
    if micro == "auto":
        micro = max(m for m in range(1, CPU_MICRO + 1) if quota is None or quota % m == 0)
        print0(f"micro_batch_size: auto → {micro} (training-hub's default{' that divides the batch' if quota else ''}; "
               f"{why})")
    return dataclasses.replace(config, micro_batch_size=micro).validate(world_size=world)


def checkpointed_micro(config: Any) -> int | None:
    """The micro batch stored in the checkpoint a resume would start from (None for a fresh run)."""
    from lora_runtime import checkpoint

    found = checkpoint.resume_point(config.ckpt_output_dir, resume=config.resume)
    if found is None or not (found / "lora_sft_config.json").is_file():
        return None
    value = json.loads(Path(found / "lora_sft_config.json").read_text()).get("micro_batch_size")
    return value if isinstance(value, int) and not isinstance(value, bool) else None
