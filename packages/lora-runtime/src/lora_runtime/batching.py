"""The batch plan: one `BatchPlan` (micro batch, accumulation, world size, which layers recompute) decided once per
run, from the memory budget, and taken as given by the data path, the loop and the backends.

Why a GPU wants bigger forward passes than training-hub's fixed micro batch of 2 (one H200, Qwen2.5-1.5B shape,
rows of 2048 tokens, benchmarks/RESULTS.md): 2 rows a pass is host-bound; 8 rows ran 3.5× faster. A pass takes the
longer of the host's time (about constant a pass: `HOST_PASS_TOKENS`) and the GPU's (its tokens, plus
`RECOMPUTE_COST` of them for recomputed layers). So on a GPU `micro_batch_size="auto"` and
`gradient_checkpointing="auto"` search every (rows, recomputed layers) that fits the budget (`max_memory_gib`,
default: the free memory) up to `Footprint.target_tokens` a pass (`TARGET_TOKENS`, `COMPILED_TARGET_TOKENS` on the
compiled path; `RECOMPUTING_TOKENS` where layers recompute): between
"recompute everything" and "recompute nothing" every count of layers is a step, and a pass just large enough to keep
the GPU the longer side with fewer layers recomputed beats a large pass that recomputes many. The plan scores each
by its estimated tokens/s and logs the winner with its arithmetic. On a CPU,
auto is training-hub's 2 rows and no recomputation (a larger pass only costs RAM there).

What it does to the optimizer step (rows per step = micro × accumulation × world):
- with `effective_batch_size` set, nothing: auto picks a divisor of effective_batch_size / world, and the
  accumulation makes up the rest, so the gradient of a step is the same sum over the same rows;
- without it (accumulation 1), a larger micro batch is a larger optimizer batch. Auto keeps at least
  `MIN_STEPS_PER_EPOCH` steps an epoch and never goes below 2; pass micro_batch_size=2 for training-hub's exact batch.
A resumed run without effective_batch_size takes the micro batch its checkpoint recorded (the data order depends on
it); with it, only micro × accumulation matters, so auto re-plans for the memory free now.

    >>> fp = Footprint(weights=3e9, layers=28, per_token_layer=6e4, per_token_recomputed=0, per_token_working=1e5,
    ...                host_pass_tokens=13_900)
    >>> plan_batch(fp, seq_len=2048, budget=139 * GIB, micro="auto", gc="auto", quota=None, rows_per_rank=900)[:2]
    (8, 0)
    >>> plan_batch(fp, seq_len=2048, budget=16 * GIB, micro="auto", gc="auto", quota=None, rows_per_rank=900)[:2]
    (7, 17)
    >>> plan_batch(fp, seq_len=2048, budget=139 * GIB, micro="auto", gc="auto", quota=12, rows_per_rank=900)[:2]
    (6, 0)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from lora_runtime.config import ConfigError, LoraSftConfig
from lora_runtime.offload import IN_FLIGHT

GIB = 1024**3
CONTEXT_BYTES = 1 * GIB  # CUDA context + cuBLAS/flash workspaces: outside torch's allocator statistics
FRAGMENTATION = 1.08  # allocator slack over the allocated peak the estimate predicts
OVERHEAD_BYTES = 0.5 * GIB  # LoRA weights, their gradients and AdamW state, loss chunks, kernels' scratch
TARGET_TOKENS = 16_384  # tokens a forward pass: past it the H200 measured +4% for 2× the memory
RECOMPUTING_TOKENS = 32_768  # ...but where layers recompute, a larger pass still amortises the step (+6% measured)
# A pass's host time (Unsloth's per-layer Python, kernel launches, the optimizer step), in tokens of GPU work it
# equals: the host runs ahead of the GPU, so a pass takes about the longer of the two (plus OVERLAP_LOSS of the
# shorter: each logged step waits for the GPU), and a smaller pass waits for the host. A recomputed layer runs its
# forward again on both: RECOMPUTE_COST more GPU time, HOST_RECOMPUTE_COST more host time (all layers). Fitted to one
# H200 (Qwen2.5-1.5B shape, rows of 2048, Unsloth; benchmarks/RESULTS.md, frontier), tokens/s measured (model):
#   rows  recomputed  measured  model        rows  recomputed  measured  model
#     2        0         15.8k    16.2k          6        4         47.2k    45.0k
#     8        0         53.8k    53.4k          6       15         41.8k    42.2k
#    16       20         44.8k    43.9k          7        8         46.9k    47.8k
#    16       24         42.8k    42.2k          7       17         41.1k    43.3k
#    16       28         40.8k    40.6k          8       26         40.2k    39.9k
#     5       24         33.5k    33.9k
# Under 16-24 GiB the fastest plans lie within 3% of each other (a flat frontier): the plan's pick is one of them.
HOST_PASS_TOKENS = 14_200
HOST_RECOMPUTE_COST = 0.16
RECOMPUTE_COST = 0.38  # all layers recomputed: 1.38× the GPU time of the pass
OVERLAP_LOSS = 0.1
MIN_STEPS_PER_EPOCH = 16
CPU_MICRO = 2  # training-hub's default
# After an out-of-memory error in a run's first step, a plan the run chose (micro_batch_size or
# gradient_checkpointing "auto") is made again with the failed plan's activations cut to this share, at most
# MAX_REPLANS times (`replan_after_oom`)
REPLAN_SHARE = 0.85
MAX_REPLANS = 3


@dataclass(frozen=True)
class BatchPlan:
    """What one run trains with: rows per pass and per step, and which layers recompute their activations.

    >>> p = BatchPlan(micro=4, accumulation=2, world_size=2, gradient_checkpointing=True, recomputed_layers=10)
    >>> p.effective, p.describe(), p.recomputation()
    (16, 'micro 4 × 2 processes × accumulation 2 = effective 16 rows/step', '10 layer(s)')
    """

    micro: int
    accumulation: int
    world_size: int
    gradient_checkpointing: bool
    recomputed_layers: int | None = None  # with checkpointing: how many decoder layers recompute (None: all)
    estimated_peak_bytes: float | None = None  # the memory plan's estimate of torch's allocated peak
    offloaded_layers: int = 0  # decoder layers after the recomputed ones whose activations wait in host memory
    estimated_fixed_bytes: float | None = None  # of the estimated peak, what no pass size changes (weights, ...)

    @property
    def effective(self) -> int:
        return self.micro * self.accumulation * self.world_size

    def describe(self) -> str:
        procs = f"{self.world_size} process{'es' if self.world_size > 1 else ''}"
        return f"micro {self.micro} × {procs} × accumulation {self.accumulation} = effective {self.effective} rows/step"

    def recomputation(self) -> str:
        if not self.gradient_checkpointing:
            return "off"
        return "every layer" if self.recomputed_layers is None else f"{self.recomputed_layers} layer(s)"

    def to_dict(self) -> dict[str, Any]:
        """The resolved numbers, as recorded in lora_sft_config.json (`resolved`) and in every checkpoint."""
        return {"micro_batch_size": self.micro, "gradient_accumulation_steps": self.accumulation,
                "effective_batch_size": self.effective, "world_size": self.world_size,
                "gradient_checkpointing": self.gradient_checkpointing, "recomputed_layers": self.recomputed_layers,
                "offloaded_layers": self.offloaded_layers, "estimated_peak_gib": None if self.estimated_peak_bytes is None
                else round(self.estimated_peak_bytes / GIB, 2)}


def fixed_plan(config: LoraSftConfig, world_size: int, micro: int | str | None = None, gc: bool | None = None,
               recomputed_layers: int | None = None, estimated_peak_bytes: float | None = None,
               offloaded_layers: int = 0) -> BatchPlan:
    """The plan for a concrete micro batch (the config's when `micro` is None): accumulation derived from
    effective_batch_size where set, and the whole batch arithmetic validated (ConfigError on a mismatch).

    >>> from lora_runtime.config import LoraSftConfig
    >>> fixed_plan(LoraSftConfig("m", "d", "o", effective_batch_size=8, micro_batch_size=2), 1).accumulation
    4
    """
    asked = config.micro_batch_size if micro is None else micro
    if not isinstance(asked, int):
        raise ValueError("micro_batch_size='auto' is decided when training starts (lora_runtime.batching.resolve)")
    dataclasses.replace(config, micro_batch_size=asked).validate(world_size=world_size)
    if config.effective_batch_size is None:
        accumulation = config.gradient_accumulation_steps
    else:
        accumulation = max(1, config.effective_batch_size // (asked * world_size))
    on = bool(config.gradient_checkpointing is True) if gc is None else gc
    return BatchPlan(asked, accumulation, world_size, on, recomputed_layers if on else None, estimated_peak_bytes,
                     offloaded_layers)


# ---------------------------------------------------------------------------------------------------- memory model
@dataclass(frozen=True)
class Footprint:
    """Bytes of one training process: weights + per token of a micro-batch, by how many layers recompute.

    A kept layer holds `per_token_layer` bytes a token until backward; a recomputed one `per_token_recomputed`
    (its input, or nothing when that is offloaded); while any layer recomputes, `per_token_working` more is live
    (the layer being recomputed and its gradient). `per_token_base` is what no checkpointing saves (logits; the
    working set of a layer that recomputes inside its own backward, selective_recompute="most").
    Where `offload_bandwidth` is set (activation_offload), a layer may instead keep its activations in host memory
    (lora_runtime.offload): none on the GPU but `offload.IN_FLIGHT` such layers, and the host link's time.
    """

    weights: float
    layers: int
    per_token_layer: float
    per_token_recomputed: float
    per_token_working: float
    per_token_base: float = 0.0
    host_pass_tokens: float = 0.0  # a pass's host time in tokens of this model's GPU work (see `step_cost`)
    extra: float = 0.0  # bytes live once whatever the pass's size (the chunked loss's logits of one chunk)
    overlap_loss: float = OVERLAP_LOSS  # the rest of this path's cost model (`step_cost`)
    recompute_cost: float = RECOMPUTE_COST
    host_recompute_cost: float = HOST_RECOMPUTE_COST
    target_tokens: int = TARGET_TOKENS  # micro_batch_size="auto" grows a pass without recomputation up to this
    token_cost: float = 1.0  # GPU time a token relative to this path's without in-layer recomputation
    offload_bandwidth: float = 0.0  # bytes/s to and from pinned host memory (0: no layer offloads)
    gpu_tokens_per_s: float = 0.0  # this path's GPU speed, to put the link's time in tokens of GPU work
    host_budget: float = 0.0  # bytes of pinned host memory the offloaded layers may take
    checkpoint_last: bool = False  # gradient_checkpointing="auto" checkpoints layers only where nothing fits without

    def step_cost(self, tokens: int, recomputed: int, offloaded: int = 0) -> float:
        link = 0.0
        if offloaded and self.offload_bandwidth:  # one way, in tokens of GPU time
            link = offloaded * self.per_token_layer * tokens / self.offload_bandwidth * self.gpu_tokens_per_s
        return step_cost(round(tokens * self.token_cost), recomputed, self.layers, self.host_pass_tokens,
                         overlap=self.overlap_loss, recompute=self.recompute_cost,
                         host_recompute=self.host_recompute_cost, link=link, offloaded=offloaded)

    def per_token(self, recomputed: int, offloaded: int = 0) -> float:
        kept = self.layers - recomputed - offloaded + min(offloaded, IN_FLIGHT)
        return (self.per_token_base + kept * self.per_token_layer + recomputed * self.per_token_recomputed
                + (self.per_token_working if recomputed else 0.0))

    def peak(self, tokens: int, recomputed: int | bool, offloaded: int = 0) -> float:
        """Estimated allocated peak (torch.cuda.max_memory_allocated) for a pass of `tokens`; True = every layer."""
        k = self.layers if recomputed is True else int(recomputed)
        return self.weights + OVERHEAD_BYTES + self.extra + tokens * self.per_token(k, offloaded)

    def need(self, tokens: int, recomputed: int | bool, offloaded: int = 0) -> float:
        """Device memory to reserve: the peak, allocator slack and the CUDA context."""
        return self.peak(tokens, recomputed, offloaded) * FRAGMENTATION + CONTEXT_BYTES

    def host_bytes(self, tokens: int, offloaded: int) -> float:
        """Pinned host memory the offloaded layers take, an upper bound: a layer may save less than it keeps, and
        torch's pinned-memory cache rounds each buffer up to a power of two (`PINNED_ROUNDING`)."""
        return offloaded * self.per_token_layer * tokens * PINNED_ROUNDING


def _dims(model_config: Any) -> tuple[int, int, int, int]:
    c = getattr(model_config, "text_config", None) or model_config
    return c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size


def layer_bytes_per_token(model_config: Any) -> float:
    """bf16 activations one decoder layer keeps per token for backward: the normed inputs of the attention and MLP
    projections, q/k/v and the attention output and statistics (~10 × hidden), the MLP's gate and up outputs and
    the SwiGLU product (~2.2 × intermediate with Unsloth's fused kernel), 2 bytes each."""
    h, i, _, _ = _dims(model_config)
    return (10 * h + 2.2 * i) * 2


def layer_params(model_config: Any, *, active: bool = False) -> int:
    """Weights of one decoder layer's projections: every expert of an MoE layer (resident), or with `active` only
    the experts a token goes through (its compute)."""
    c = getattr(model_config, "text_config", None) or model_config
    h, i, _, _ = _dims(model_config)
    heads = c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or h // heads
    experts = next((int(getattr(c, k)) for k in ("num_local_experts", "num_experts", "n_routed_experts")
                    if isinstance(getattr(c, k, None), int) and getattr(c, k) > 1), 1)
    if experts > 1:
        i = getattr(c, "moe_intermediate_size", None) or i
        experts = int(getattr(c, "num_experts_per_tok", None) or 1) if active else experts
    return 2 * h * heads * head_dim + 2 * h * kv * head_dim + 3 * h * i * experts


def weight_bytes(model_config: Any, four_bit: bool) -> float:
    _, _, n, vocab = _dims(model_config)
    c = getattr(model_config, "text_config", None) or model_config
    embed = vocab * c.hidden_size * (1 if getattr(c, "tie_word_embeddings", False) else 2)
    return n * layer_params(model_config) * (0.56 if four_bit else 2.0) + embed * 2.0


QWEN15_LAYER_PARAMS = 46_792_704  # layer_params of the Qwen2.5-1.5B shape, where HOST_PASS_TOKENS was measured


def host_pass_tokens(model_config: Any) -> float:
    """HOST_PASS_TOKENS for this model: the host's time a layer is about the same for any width, the GPU's time a
    token grows with the layer's weights, so a wider model needs fewer tokens to keep the GPU the longer side."""
    return HOST_PASS_TOKENS * QWEN15_LAYER_PARAMS / max(layer_params(model_config, active=True), 1)


UNSLOTH_LAYER_SCALE = 0.885  # Unsloth's fused kernels keep less than `layer_bytes_per_token` says (H200, measured)


def unsloth_footprint(model_config: Any, four_bit: bool) -> Footprint:
    """Unsloth: fused chunked cross-entropy (no full logits); a recomputed layer's input is offloaded to the host, and
    about 1.1 layers' activations are live while recomputing.

    Calibrated on an H200 (Qwen2.5-1.5B shape, rows of 2048, torch.cuda.max_memory_allocated against the estimate):
    8 rows, no recomputation 29.9 / 29.9 GiB; 8 rows, every layer 4.6 / 4.4; 16 rows, every layer 6.1 / 5.5;
    16 rows, 24 of 28 layers 11.6 / 13.0; 16 rows, 20 of 28 layers 19.1 / 20.6.
    """
    layer = layer_bytes_per_token(model_config) * UNSLOTH_LAYER_SCALE
    return Footprint(weight_bytes(model_config, four_bit), _dims(model_config)[2], per_token_layer=layer,
                     per_token_recomputed=0.0, per_token_working=1.1 * layer,
                     host_pass_tokens=host_pass_tokens(model_config))


LOGIT_BYTES_PER_VOCAB = 12  # full logits a token: bf16 logits, their fp32 copy and its gradient, per vocabulary entry


def peft_footprint(model_config: Any, four_bit: bool, fused_loss: bool = False) -> Footprint:
    """transformers + PEFT: full logits in bf16, their fp32 copy and gradient (~12 B × vocab a token) dominate
    (measured 32.4 GiB for 16k tokens of the 1.5B shape with checkpointing); a recomputed layer keeps its input.
    With liger's fused linear + cross-entropy (`fused_loss`) no logits are kept: measured on the same 16k tokens,
    6.9 GiB with checkpointing (estimate 6.8) and 44.8 GiB without (estimate 48.4)."""
    h, _, n, vocab = _dims(model_config)
    layer = layer_bytes_per_token(model_config)
    return Footprint(weight_bytes(model_config, four_bit), n, per_token_layer=1.5 * layer, per_token_recomputed=2 * h,
                     per_token_working=2 * layer, per_token_base=0.0 if fused_loss else LOGIT_BYTES_PER_VOCAB * vocab,
                     host_pass_tokens=host_pass_tokens(model_config))


COMPILED_LAYER_SCALE = 1.07  # compiled decoder layers keep a little more than `layer_bytes_per_token` (H200, measured)
# The compiled path's cost model (`step_cost`), fitted to one H200 (Qwen2.5-1.5B shape, rows of 2048; benchmarks/
# RESULTS.md): 2, 4 and 16 rows without recomputation ran 34.3k, 48.5k and 60.0k tokens/s (the model: 34.0k, 48.2k,
# 60.0k); 8 rows recomputing every layer 33.2k (33.2k). The host's share of a pass is smaller than Unsloth's (the
# layers run as compiled graphs) but overlaps the GPU less, and a recomputed layer reruns a whole compiled forward.
COMPILED_HOST_PASS_TOKENS = 5_860
COMPILED_OVERLAP_LOSS = 0.48
COMPILED_RECOMPUTE_COST = 0.62
COMPILED_HOST_RECOMPUTE_COST = 1.0
COMPILED_TARGET_TOKENS = 32_768  # 16 rows of 2048 ran 8% faster than 8 (the model's estimate)
# selective_recompute="pointwise": what a layer no longer keeps (SwiGLU's product and the two RMSNorm outputs; read
# back from the partitioner's saved tensors on a CPU by `python -m benchmarks.partitioner`, 512 tokens: 73.5 → 49.4
# kB a token for the Qwen2.5-1.5B shape, 139.6 → 94.6 kB for Llama-3.1-8B's, both exactly this count; benchmarks/
# RESULTS.md, partitioner), and what recomputing them costs: re-reading gate, up and the residual stream, about 3%
# of a token's GPU time (an estimate from bandwidth, not measured).
POINTWISE_TOKEN_COST = 1.03
# While a compiled layer recomputes under checkpointing, its activations and their gradients' temporaries are live:
# about 2 layers' worth (H100: 8 rows recomputing every layer peaked at 7.05 GiB; 9 rows with pointwise recompute ran
# out of memory above 7.6 GiB, where 1 layer's worth estimated 6.4).
COMPILED_WORKING_SCALE = 2.0
# selective_recompute="most" (compiled.LEVEL_BUDGETS): a layer's backward recomputes its projections, RoPE and
# pointwise work in one compiled graph; with its recomputed activations and their gradients it holds 1.86 layers'
# worth at once with LoRA B folded into gate and up (lora_runtime.fused_lora: no LoRA outputs as wide as the MLP among
# them): fitted with `most_bytes_per_token` to the peaks' growth a row without offload; no loss chunk beside it (the
# peak falls in a layer's backward, after the loss). Through lora_sft on one H100, measured peak against this
# estimate (every one above): Qwen2.5-1.5B shape without offload, 4, 8 and 16 rows 6.23 / 6.41, 9.31 / 9.44 and
# 15.48 / 15.51 GiB; 10 rows with 28 layers offloaded 6.3 / 6.39, 9 rows 5.97 / 6.09, 6 rows with 27 5.13 / 5.29;
# Llama-3.1-8B shape, 2 rows of 8,192 with 31 layers offloaded, 20.14 / 20.99, one row with 18 19.85 / 20.66. Before the
# fold the same runs peaked at 5.95 and 20.72 GiB, about 3 layers' worth (without the Trainer, 4 rows 6.78 GiB on an
# H100, 6 rows 8.59 on an H200; at budget 0, where a layer keeps 3 kB a token, 8 and 16 rows 7.87 and 12.59 GiB: 200
# kB a token beyond what the layers keep). Its GPU time a token against a pass without recomputation: on the H200,
# 6 rows ran 53.7k tokens/s, 4 rows without recomputation 61.7k (benchmarks/RESULTS.md, compiled-parts): 1.15, a
# lower bound (6 rows without recomputation would run a little faster than 4; both runs' loss turned NaN from their
# second step, which reads high alike).
MOST_WORKING_SCALE = 1.86
MOST_TOKEN_COST = 1.15


def pointwise_bytes_per_token(model_config: Any) -> float:
    """Bytes a token one layer stops keeping under selective_recompute="pointwise" (a lower bound)."""
    h, i, _, _ = _dims(model_config)
    return 2.0 * (i + 2 * h)


def most_bytes_per_token(model_config: Any) -> float:
    """Bytes a token one layer keeps under selective_recompute="most": its input and attention's output (bf16; what
    the partitioner keeps, `python -m benchmarks.partitioner`), and the MLP's normed input, which LoRA B folded into
    gate and up keeps (`lora_runtime.fused_lora`: its autograd Function saves x, out of the partitioner's reach).
    Through lora_sft on one H100 (Qwen2.5-1.5B shape, no layer offloaded), 4, 8 and 16 rows peaked at 6.23, 9.31 and
    15.48 GiB: 404 kB a token more a row, 82 kB more than with the first two alone (28 × 2 × 1536 = 86 kB)."""
    return 6.0 * _dims(model_config)[0]


def compiled_footprint(model_config: Any, fused_loss: bool = True, level: str = "off") -> Footprint:
    """The peft backend's compiled path (lora_runtime.compiled): no logits but one chunk of them (the chunked loss;
    without it, `fused_loss=False`, transformers' full logits as in `peft_footprint`), a recomputed layer keeps its
    input, `COMPILED_WORKING_SCALE` layers' activations live while recomputing (none beyond `per_token_base` under
    "most").

    Calibrated on an H200 (Qwen2.5-1.5B shape, rows of 2048, torch.cuda.max_memory_allocated against the estimate):
    2 rows 12.8 / 12.8 GiB, 4 rows 20.7 / 20.8, 16 rows 68.7 / 68.8, all without recomputation. With the chunked
    loss's Triton kernel (2 bytes a logit of a chunk, not 8), on an H100: 4 rows 19.6 / 19.7, 16 rows 68.7 / 67.8,
    4 rows with pointwise recompute and 4 layers offloaded 13.6 / 13.8, 8 rows recomputing every layer 7.05 / 7.3,
    4 rows with `level="most"` 6.78 / 6.7 and on an H200 6 rows 8.59 / 8.2 (both before LoRA B was folded: with
    `MOST_WORKING_SCALE` then at 3); with the fold, through lora_sft, 16 rows 15.48 / 15.51, 6 rows with 27 layers
    offloaded 5.13 / 5.29.
    `level` (selective_recompute): "pointwise", each layer recomputes its pointwise work (`pointwise_bytes_per_token`
    less kept, `POINTWISE_TOKEN_COST`); "most", it keeps `most_bytes_per_token` and its backward holds
    `MOST_WORKING_SCALE` layers' activations while it recomputes the rest (`MOST_TOKEN_COST`), with checkpointing
    too: a checkpointed layer's forward runs again keeping what it keeps anyway, then the same backward (an estimate,
    not measured). Checkpointing saves such a layer only its attention output (under 1% of a token's footprint) for
    a whole forward more, a gain within the cost model's error: the plan checkpoints only where nothing fits
    without (`checkpoint_last`).
    """
    from lora_runtime.chunked_loss import TRANSIENT_BYTES, chunk_tokens, kernel_usable

    h, _, n, vocab = _dims(model_config)
    layer = layer_bytes_per_token(model_config) * COMPILED_LAYER_SCALE
    kept = {"off": layer, "pointwise": layer - pointwise_bytes_per_token(model_config),
            "most": most_bytes_per_token(model_config)}[level]
    base = 0.0 if fused_loss else LOGIT_BYTES_PER_VOCAB * vocab
    if level == "most":
        base += MOST_WORKING_SCALE * layer
    loss_chunk = chunk_tokens(vocab) * vocab * TRANSIENT_BYTES[kernel_usable("cuda")] if fused_loss else 0.0
    if level == "most":  # its peak falls in a layer's backward, after the loss: the working set, not the loss chunk
        loss_chunk = 0.0
    # a checkpointed "most" layer's forward runs again keeping its 6h bytes a token, then the same backward: nothing
    # live beyond the working set `base` counts already
    working = 0.0 if level == "most" else COMPILED_WORKING_SCALE * layer
    return Footprint(weight_bytes(model_config, False), n, per_token_layer=kept, per_token_recomputed=2 * h,
                     per_token_working=working, extra=loss_chunk, per_token_base=base, checkpoint_last=level == "most",
                     host_pass_tokens=host_pass_tokens(model_config) * COMPILED_HOST_PASS_TOKENS / HOST_PASS_TOKENS,
                     overlap_loss=COMPILED_OVERLAP_LOSS, recompute_cost=COMPILED_RECOMPUTE_COST,
                     host_recompute_cost=COMPILED_HOST_RECOMPUTE_COST, target_tokens=COMPILED_TARGET_TOKENS,
                     token_cost={"off": 1.0, "pointwise": POINTWISE_TOKEN_COST, "most": MOST_TOKEN_COST}[level])


# activation_offload: the GPU speed a layer's copies must keep pace with (the compiled path's on one H200, 16 rows of
# the Qwen2.5-1.5B shape: benchmarks/RESULTS.md, compiled-parts; scaled by the layer's weights as `host_pass_tokens`
# is; read on a feed whose loss turned NaN, which reads high; lora_sft itself now runs 16 rows at 71k on an H200 and
# 64k on an H100, `frontier`). A slower GPU leaves the link more time than the plan assumes.
GPU_TOKENS_PER_S = 60_000
FORWARD_SHARE = 0.4  # of a LoRA step's GPU time (frozen weights: backward makes input gradients, no weight gradients)
PINNED_ROUNDING = 2.0  # torch's pinned-memory cache rounds a buffer up to the next power of two (at worst 2×)
# the host's extra work a pass with every layer offloaded, as a share of the compiled path's host time (about 0.12 s
# a pass on an H200): 19.6 µs of Python a saved tensor on a CPU and 11 tensors a Qwen2.5-1.5B layer at 8,192 tokens
# (benchmarks/RESULTS.md, offload-host), plus an estimated 25 µs of CUDA calls a tensor (a stream wait, a copy each
# way, an event): about 0.5 ms a layer, 28 layers
HOST_OFFLOAD_COST = 0.12


def offload_speed(model_config: Any) -> float:
    """`GPU_TOKENS_PER_S` for this model."""
    return GPU_TOKENS_PER_S * QWEN15_LAYER_PARAMS / max(layer_params(model_config, active=True), 1)


# ---------------------------------------------------------------------------------------------------- the search
class Choice(NamedTuple):
    micro: int
    recomputed: int  # decoder layers that recompute (0: checkpointing off)
    reason: str
    peak: float  # estimated allocated peak, bytes
    offloaded: int = 0  # decoder layers whose activations wait in host memory


def step_cost(tokens: int, recomputed: int, layers: int, host_tokens: float = HOST_PASS_TOKENS, *,
              overlap: float = OVERLAP_LOSS, recompute: float = RECOMPUTE_COST,
              host_recompute: float = HOST_RECOMPUTE_COST, link: float = 0.0, offloaded: int = 0) -> float:
    """A pass's time in units of one token's forward+backward without recomputation: the GPU's work or the host's
    (`host_tokens` a pass), whichever is longer, plus `overlap` of the shorter; recomputed layers add to both.
    `offloaded` layers (spread over the layers that do not recompute: lora_runtime.offload) copy `link` tokens' worth
    of time each way, out during the forward of those layers (`FORWARD_SHARE` of their GPU time) and back during
    their backward; the GPU waits for what does not fit.

    >>> [round(n * 2048 / step_cost(n * 2048, k, 28), 2) for n, k in ((2, 0), (4, 0), (8, 0), (8, 14), (16, 28))]
    [0.28, 0.55, 0.92, 0.78, 0.7]
    >>> [round(16384 / step_cost(16384, 0, 28, link=t, offloaded=14), 2) for t in (0, 6000, 12000)]
    [0.92, 0.92, 0.64]
    """
    share = recomputed / max(layers, 1)
    host = host_tokens * (1 + host_recompute * share + HOST_OFFLOAD_COST * offloaded / max(layers, 1))
    gpu = tokens * (1 + recompute * share)
    window = tokens * (1 - share)  # the GPU time of the layers the copies overlap
    gpu += max(0.0, link - FORWARD_SHARE * window) + max(0.0, link - (1 - FORWARD_SHARE) * window)
    return max(host, gpu) + overlap * min(host, gpu)


def plan_batch(footprint: Footprint, *, seq_len: int, budget: float, micro: int | str, gc: bool | str,
               quota: int | None, rows_per_rank: int, accumulation: int = 1, partial: bool = True) -> Choice:
    """The fastest (micro, recomputed layers) whose `need` fits `budget` bytes. `quota` = effective_batch_size /
    world when that is set (micro must divide it), else an epoch of `rows_per_rank` keeps `MIN_STEPS_PER_EPOCH`
    steps of micro × `accumulation` rows; gc True recomputes every layer, False none, "auto" any count (with
    `footprint.checkpoint_last`, a count above none only where nothing fits without; without `partial`, none or
    all: model splitting, where a count would checkpoint the first layers, all on the first GPU)."""
    if micro == "auto":
        cap = max(1, max(RECOMPUTING_TOKENS if gc is not False else 0, footprint.target_tokens) // seq_len)
        if quota is not None:
            rows = [m for m in range(min(cap, quota), 0, -1) if quota % m == 0]
            why_cap = f"a divisor of effective_batch_size/world = {quota}, up to {cap} rows = {cap * seq_len:,} tokens"
        else:
            cap = min(cap, max(CPU_MICRO, rows_per_rank // (MIN_STEPS_PER_EPOCH * accumulation)))
            rows = list(range(cap, 0, -1))
            why_cap = (f"up to {cap} rows ({cap * seq_len:,} tokens a pass, ≥ {MIN_STEPS_PER_EPOCH} steps an epoch "
                       f"of {rows_per_rank:,} rows{f' at accumulation {accumulation}' if accumulation > 1 else ''})")
    else:
        rows, why_cap = [int(micro)], ""
    n = footprint.layers
    counts = ([n if gc else 0] if gc != "auto" else list(range(n + 1)) if partial else [0, n])

    def offloads(k: int) -> range:  # any of the layers left after the recomputed ones
        return range(n - k + 1) if footprint.offload_bandwidth else range(1)

    def fastest(max_tokens: float, counts: list[int]) -> tuple[int, int, int] | None:
        fits = [(m, k, o) for m in rows if m * seq_len <= max_tokens for k in counts for o in offloads(k)
                if footprint.need(m * seq_len, k, o) <= budget
                and (o == 0 or footprint.host_bytes(m * seq_len, o) <= footprint.host_budget)]
        # fastest tokens/s; on a tie the larger pass, then the fewer recomputed layers, then the fewer offloaded
        def speed(mko: tuple[int, int, int]) -> float:
            return mko[0] * seq_len / footprint.step_cost(mko[0] * seq_len, mko[1], mko[2])

        return max(fits, key=lambda mko: (speed(mko), mko[0], -mko[1], -mko[2]), default=None)

    def search(counts: list[int]) -> tuple[int, int, int] | None:
        best = fastest(footprint.target_tokens if micro == "auto" else float("inf"), counts)
        if best is None or best[1] > 0 or best[2] > 0:  # recomputing or offloading anyway: a larger pass may pay
            best = fastest(float("inf"), counts) or best
        return best

    best = search([0]) if footprint.checkpoint_last and gc == "auto" else None
    best = best or search(counts)
    if best is not None:
        (m, k, o), tail = best, ""
    else:  # the least memory the options allow (host memory permitting the offloaded layers)
        m, tail = rows[-1], " (does not fit: may OOM)"
        k, o = min(((k, o) for k in counts for o in offloads(k)
                    if o == 0 or footprint.host_bytes(m * seq_len, o) <= footprint.host_budget),
                   key=lambda ko: (footprint.need(m * seq_len, *ko), -ko[0]))
    return Choice(m, k, _reason(footprint, m, k, o, seq_len, budget, micro, gc, why_cap) + tail,
                  footprint.peak(m * seq_len, k, o), o)


def _reason(fp: Footprint, m: int, k: int, o: int, seq_len: int, budget: float, micro: Any, gc: Any,
            why_cap: str) -> str:
    tokens = m * seq_len
    parts = [f"micro_batch_size {'auto → ' if micro == 'auto' else ''}{m}" + (f" ({why_cap})" if why_cap else ""),
             f"gradient checkpointing {'auto → ' if gc == 'auto' else ''}"
             + ("off" if k == 0 else "on" if k == fp.layers else f"{k} of {fp.layers} layers")]
    if fp.offload_bandwidth:
        moved = o * fp.per_token_layer * tokens
        parts.append(f"activation offload → {o} of {fp.layers} layers" + (
            f" ({moved / GIB:.1f} GiB each way a pass at {fp.offload_bandwidth / 1e9:.1f} GB/s measured, "
            f"{moved / fp.offload_bandwidth * 1e3:.0f} ms against ~{tokens / fp.gpu_tokens_per_s * 1e3:.0f} ms of "
            f"GPU work; pinned host memory up to {fp.host_bytes(tokens, o) / GIB:.1f} of "
            f"{fp.host_budget / GIB:.1f} GiB)" if o else ""))
    act = tokens * fp.per_token(k, o)
    peak = fp.peak(tokens, k, o)
    extra = f" + loss chunk {fp.extra / GIB:.1f} GiB" if fp.extra else ""
    numbers = (f"activations for {m} × {seq_len} tokens ≈ {act / GIB:.1f} GiB + weights {fp.weights / GIB:.1f} GiB + "
               f"{OVERHEAD_BYTES / GIB:.1f} GiB LoRA/optimizer{extra} = peak ≈ {peak / GIB:.1f} GiB; × {FRAGMENTATION} slack + "
               f"{CONTEXT_BYTES / GIB:.0f} GiB context = {fp.need(tokens, k, o) / GIB:.1f} GiB of {budget / GIB:.1f} GiB")
    return "; ".join(parts) + f": {numbers}"


# ---------------------------------------------------------------------------------------------------- resolve
# (bytes, words) the plan stays under while set: a run planned again after an out-of-memory error (`replan_after_oom`)
_LOWERED: ContextVar[tuple[float, str] | None] = ContextVar("lowered_budget", default=None)


@contextlib.contextmanager
def lowered_budget(limit: tuple[float, str] | None) -> Iterator[None]:
    """Every memory decision inside (the levers, the backend, the batch plan) reads at most `limit`'s bytes."""
    token = _LOWERED.set(limit)
    try:
        yield
    finally:
        _LOWERED.reset(token)


def replan_after_oom(config: LoraSftConfig, step: int | None, plan: BatchPlan | None, world_size: int,
                     replans: int, relaunch: bool = False) -> tuple[float, str] | None:
    """The budget to plan the run again for after an out-of-memory error in training step `step` of `plan`, or None
    where the error stands: only in step 1 (nothing logged or saved yet) of a single process, or under torchrun where
    a launcher starts every worker again (`relaunch`: the other ranks wait in a collective, so this process cannot
    plan again alone), only for a plan the run chose (micro_batch_size or gradient_checkpointing "auto") from a
    memory estimate, and at most `MAX_REPLANS` times. What the failed plan needed with its activations (all but the
    weights and the fixed overheads) cut to `REPLAN_SHARE`.

    >>> from lora_runtime.config import LoraSftConfig
    >>> failed = BatchPlan(16, 1, 1, False, estimated_peak_bytes=20 * GIB, estimated_fixed_bytes=4 * GIB)
    >>> bytes_, words = replan_after_oom(LoraSftConfig("m", "d", "o"), 1, failed, world_size=1, replans=0)
    >>> round(bytes_ / GIB, 2), words
    (20.01, 'the 22.6 GiB the plan that ran out of memory in step 1 needed, its 17.3 GiB of activations cut to 85%')
    >>> [replan_after_oom(LoraSftConfig("m", "d", "o"), step, failed, world, n) for step, world, n in
    ...  ((2, 1, 0), (1, 2, 0), (1, 1, MAX_REPLANS))]
    [None, None, None]
    """
    chosen = config.micro_batch_size == "auto" or config.gradient_checkpointing == "auto"
    if (step != 1 or plan is None or plan.estimated_peak_bytes is None or (world_size > 1 and not relaunch)
            or not chosen or replans >= MAX_REPLANS):
        return None
    fixed = min(plan.estimated_fixed_bytes or 0.0, plan.estimated_peak_bytes)
    need = plan.estimated_peak_bytes * FRAGMENTATION + CONTEXT_BYTES
    varying = (plan.estimated_peak_bytes - fixed) * FRAGMENTATION
    return (need - (1 - REPLAN_SHARE) * varying,
            f"the {need / GIB:.1f} GiB the plan that ran out of memory in step 1 needed, its {varying / GIB:.1f} GiB "
            f"of activations cut to {REPLAN_SHARE:.0%}")


def replan_note(micro: int, cause: str, limit: tuple[float, str], replans: int, action: str) -> str:
    """The line a re-plan is logged with, in one process (`lora_runtime.api.run`) or by the launcher.

    >>> replan_note(16, "CUDA out of memory", (20 * GIB, "why"), 1, "planning again for")
    'out of memory in training step 1 with micro_batch_size 16 (CUDA out of memory): planning again for 20.0 GiB, why (re-plan 1 of at most 3)'
    """
    return (f"out of memory in training step 1 with micro_batch_size {micro} ({cause}): {action} {limit[0] / GIB:.1f} "
            f"GiB, {limit[1]} (re-plan {replans} of at most {MAX_REPLANS})")


# Set by a launcher that starts every worker of a one-node torchrun run again when one ran out of memory in step 1
# (lora-cli train --gpus N): JSON {"limit": [bytes, words] or null, "failed": [[BatchPlan fields, cause], ...]}, the
# budget to plan under and the plans that ran out, as the failing rank asked for them in `RELAUNCH_REQUEST`
RELAUNCH_ENV = "LORA_RUNTIME_RELAUNCH"
RELAUNCH_REQUEST = ".oom-relaunch-rank{rank}.json"  # in the output dir; read and removed by the launcher


def relaunched() -> tuple[tuple[float, str] | None, list[tuple[BatchPlan, str]]] | None:
    """(limit, failed plans with their causes) this worker was started with by a launcher that starts the workers
    again after an out-of-memory error in step 1; None without such a launcher."""
    value = os.environ.get(RELAUNCH_ENV)
    if value is None:
        return None
    given = json.loads(value)
    limit = given.get("limit")
    return (None if limit is None else (float(limit[0]), str(limit[1])),
            [(BatchPlan(**fields), cause) for fields, cause in given.get("failed", [])])


def request_relaunch(output_dir: str | Path, rank: int, limit: tuple[float, str],
                     failed: list[tuple[BatchPlan, str]]) -> Path:
    """Ask the launcher to start every worker again under `limit` (written whole: a torn file is never read)."""
    path = Path(output_dir) / RELAUNCH_REQUEST.format(rank=rank)
    staging = path.with_name(path.name + ".tmp")
    staging.write_text(json.dumps({"limit": list(limit),
                                   "failed": [[dataclasses.asdict(plan), cause] for plan, cause in failed]}))
    staging.replace(path)
    return path


def take_relaunch_requests(output_dir: str | Path) -> tuple[str, list[int], dict] | None:
    """Launcher side: (the `RELAUNCH_ENV` value, every asking rank, the request) of the request with the lowest limit
    among those the workers left in `output_dir`, every request file removed; None where no worker asked."""
    found = []
    for path in Path(output_dir).glob(RELAUNCH_REQUEST.format(rank="*") + ".tmp"):
        path.unlink(missing_ok=True)  # a worker killed while writing its request
    for path in sorted(Path(output_dir).glob(RELAUNCH_REQUEST.format(rank="*"))):
        try:
            request = json.loads(path.read_text())
            int(request["failed"][-1][0]["micro"])  # what the launcher's log reads
            found.append((float(request["limit"][0]), int(path.stem.rpartition("rank")[2]), request))
        except (OSError, ValueError, TypeError, KeyError, IndexError):
            pass  # not a request this module wrote
        path.unlink(missing_ok=True)
    if not found:
        return None
    request = min(found, key=lambda found: found[0])[2]
    return json.dumps(request), sorted(rank for _, rank, _ in found), request


def memory_budget(config: LoraSftConfig, *, lowered: bool = True) -> tuple[float, str]:
    """(bytes, words): max_memory_gib where set (never above the memory free), else the free memory of this rank's
    GPU (of the fullest visible GPU with model splitting: see `per_gpu`); the minimum over ranks under torchrun. Less
    inside `lowered_budget` (unless `lowered=False`)."""
    import torch

    from lora_runtime.distributed import all_reduce_min, dist_env

    if config.enable_model_splitting:
        free = min(torch.cuda.mem_get_info(d)[0] for d in range(torch.cuda.device_count()))
    else:
        free = torch.cuda.mem_get_info(dist_env().local_rank)[0]
    budget = all_reduce_min(float(free))
    given = ((budget, "free") if config.max_memory_gib is None else
             (min(budget, config.max_memory_gib * GIB), f"max_memory_gib={config.max_memory_gib:g}"))
    return _within_lowered(given) if lowered else given


def _within_lowered(given: tuple[float, str]) -> tuple[float, str]:
    limit = _LOWERED.get()
    return limit if limit is not None and limit[0] < given[0] else given


def per_gpu(footprint: Footprint, config: LoraSftConfig, model_config: Any, world: int) -> Footprint:
    """What one GPU holds. FSDP: its shard of the weights (sharding.per_gpu_weight_bytes). Model splitting over n
    GPUs: 1/n of the weights and of the layers' activations, and the logits whole, on the last GPU.

    >>> fp = Footprint(weights=8e9, layers=32, per_token_layer=1e5, per_token_recomputed=0, per_token_working=2e5,
    ...                per_token_base=1e6)
    >>> four = per_gpu(fp, LoraSftConfig("m", "d", "o", enable_model_splitting=True), None, world=4)
    >>> four.weights, four.per_token(0) == 1e6 + 8 * 1e5
    (2000000000.0, True)
    """
    if config.sharding == "fsdp":
        from lora_runtime.sharding import per_gpu_weight_bytes

        return dataclasses.replace(footprint, weights=per_gpu_weight_bytes(model_config, world, config.load_in_4bit))
    if config.enable_model_splitting and world > 1:
        return dataclasses.replace(footprint, weights=footprint.weights / world, layers=-(-footprint.layers // world))
    return footprint


def resolve(config: LoraSftConfig, backend: Any, rows: int) -> BatchPlan:
    """The run's BatchPlan: micro_batch_size="auto" and gradient_checkpointing="auto" made concrete from the memory
    budget (on a GPU, where the backend can estimate its footprint), validated, and logged on rank 0.

    Explicit values are kept; a model config this module cannot size (no `intermediate_size`, ...) gets
    training-hub's 2 rows and the reason in the log.
    """
    from lora_runtime.distributed import dist_env, print0

    world = dist_env().world_size
    if config.effective_batch_size and config.effective_batch_size % world:  # lora_sft's validate refuses it first
        raise ConfigError([f"effective_batch_size={config.effective_batch_size} is not divisible by the {world} "
                           f"processes torchrun started: set it to a multiple of {world}"])
    quota = config.effective_batch_size // world if config.effective_batch_size else None
    micro = config.micro_batch_size
    if micro == "auto" and quota is None:  # with effective_batch_size the data order depends on micro × accum only
        recorded = checkpointed_micro(config)
        if recorded is not None:
            print0(f"micro_batch_size: auto → {recorded}, as recorded by the checkpoint this run resumes")
            micro = recorded
    gc = config.gradient_checkpointing
    import torch

    cuda = torch.cuda.is_available()
    if cuda and config.max_memory_gib is None:  # no hard cap, also where an earlier run in this process set one
        cap_process(config, None)
    if not cuda and config.max_memory_gib is not None:
        print0(f"max_memory_gib={config.max_memory_gib:g} is a budget of GPU memory; this run is on the CPU: ignored")
    by_memory = getattr(backend, "checkpointing_by_memory", None)
    if gc == "auto" and not (cuda and by_memory is not None and by_memory(config)):
        gc = cuda  # this backend's auto: on where CUDA memory is the limit, off on a CPU
    if micro != "auto" and gc != "auto" and config.max_memory_gib is None and config.activation_offload is not True:
        return fixed_plan(config, world, micro, bool(gc))
    why = "no CUDA GPU to size it by"
    if cuda and hasattr(backend, "footprint"):
        from transformers import AutoConfig

        model_config = AutoConfig.from_pretrained(config.model_path, trust_remote_code=config.trust_remote_code)
        given = memory_budget(config, lowered=False)
        budget, source = _within_lowered(given)
        gpus = torch.cuda.device_count() if config.enable_model_splitting else world
        footprint: Footprint | None = None
        try:
            footprint = per_gpu(backend.footprint(model_config, config), config, model_config, gpus)
        except AttributeError as e:  # a config without the fields the estimate reads (GPT-2 style names)
            why = f"cannot size {type(model_config).__name__} ({e})"
            if config.activation_offload is True:
                why += "; activation_offload needs that estimate: no layer is offloaded"
        # weights, LoRA and optimizer state: what no plan makes smaller (the estimate counts 8-bit weights as bf16)
        fixed = footprint.peak(0, 0) if footprint is not None else 0.0
        if config.max_memory_gib is not None:  # a hard cap too: this process cannot allocate past the budget given
            if not config.load_in_8bit and fixed > config.max_memory_gib * GIB:
                raise ConfigError([f"max_memory_gib={config.max_memory_gib:g} is below what the model holds on a GPU "
                                   f"before any activation: {fixed / GIB:.1f} GiB of weights, LoRA and optimizer "
                                   "state; raise it" + ("" if config.load_in_4bit else ", or pass load_in_4bit=True")])
            cap_process(config, given[0])
        if footprint is not None:
            choice = plan_batch(footprint, seq_len=config.max_seq_len, budget=budget, micro=micro, gc=gc, quota=quota,
                                rows_per_rank=max(1, rows // world), accumulation=config.gradient_accumulation_steps,
                                partial=not (config.enable_model_splitting and gpus > 1))
            print0(f"memory plan ({source}): {choice.reason}")
            recomputed = None if choice.recomputed == footprint.layers else choice.recomputed
            plan = fixed_plan(config, world, choice.micro, choice.recomputed > 0, recomputed, choice.peak,
                              choice.offloaded)
            return dataclasses.replace(plan, estimated_fixed_bytes=fixed)
    if micro == "auto":
        micro = max(m for m in range(1, CPU_MICRO + 1) if quota is None or quota % m == 0)
        print0(f"micro_batch_size: auto → {micro} (training-hub's default{' that divides the batch' if quota else ''}; "
               f"{why})")
    if gc == "auto":  # a backend that plans checkpointing by memory, without the estimate: every layer, as elsewhere
        print0(f"gradient checkpointing: auto → on for every layer ({why})")
    return fixed_plan(config, world, micro, gc is True or (gc == "auto" and cuda))


_CAPPED: set[int] = set()  # the GPUs whose allocator an earlier run in this process capped (`cap_process`)


def cap_process(config: LoraSftConfig, budget: float | None) -> None:
    """The hard cap of max_memory_gib: this process allocates at most `budget` bytes on each GPU it uses (every
    visible one with model splitting). None lifts the caps a run set (the caching allocator keeps its fraction for
    the life of the process; `api.run` lifts its own when it ends): a GPU no run capped keeps whatever fraction the
    user's own code gave it."""
    import torch

    from lora_runtime.distributed import dist_env

    if budget is None:
        for device in sorted(_CAPPED):
            torch.cuda.set_per_process_memory_fraction(1.0, device)
        _CAPPED.clear()
        return
    for device in range(torch.cuda.device_count()) if config.enable_model_splitting else [dist_env().local_rank]:
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget / torch.cuda.mem_get_info(device)[1]), device)
        _CAPPED.add(device)


def checkpointed_micro(config: LoraSftConfig) -> int | None:
    """The micro batch stored in the checkpoint a resume would start from (None for a fresh run)."""
    from lora_runtime import checkpoint

    found = checkpoint.resume_checkpoint(config)
    if found is None or not (found / checkpoint.CONFIG_NAME).is_file():
        return None
    saved = json.loads(Path(found / checkpoint.CONFIG_NAME).read_text())
    value = (saved.get("resolved") or {}).get("micro_batch_size", saved.get("micro_batch_size"))
    return value if isinstance(value, int) and not isinstance(value, bool) else None
