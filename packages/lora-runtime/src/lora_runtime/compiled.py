"""The compiled path of the peft backend (`kernels="compile"`): transformers + PEFT with the host's work per layer
taken out, for CUDA GPUs with FlashAttention-2 (compute capability 8.0+) and bf16.

Five parts, each plain PyTorch:
- every decoder layer is compiled on its own (`torch.compile`, one graph shared by all layers): Inductor fuses the
  RMSNorms, RoPE, SwiGLU and LoRA's scale-and-add, and a layer's forward and backward are each one call from Python;
- packed rows are flattened to one padding-free row and attend per sample through aten's FlashAttention-2 varlen
  kernel (`lora_runtime.attention`), the boundaries taken from the collator on the host;
- the loss is `lora_runtime.chunked_loss`: no [tokens, vocab] logits and no device-to-host sync in a step;
- the LoRA matmuls run in bf16 under autocast on fp32 adapter weights (PEFT would cast each activation to fp32
  first: fp32 matmuls without tensor cores, about a quarter of the GPU time of a step);
- LoRA's B product is folded into the base GEMM of the widening projections, gate and up (`lora_runtime.fused_lora`):
  no tokens × intermediate LoRA outputs written and read back (without the Trainer on one H100, 16 rows a pass ran
  64.0k tokens/s against 60.0k, 4 rows 59.2k against 55.9k; folding every projection, 62.0k). Where no
  `selective_recompute` level is on, LoRA's A product is folded into the base GEMM of the narrowing ones (down; k and
  v under grouped-query attention): on one H200 without the Trainer, 16 rows a pass ran 79.6k against 77.2k, 4 rows
  alike (62.6k, 62.8k). On lora_sft's own labels (a loss that trains), 16 rows a pass: B and A folded ran 69.6k
  against 64.4k with neither on one H200; on one H100 56.5k with neither, 61.2k with B in gate and up, 59.4k with B
  in every projection, 62.9k with B and A.

The other figures "without the Trainer" come from `benchmarks.gpu.compiled` on a feed whose loss turned NaN from its
second step: a GEMM over NaN draws less power, so on a power-capped card they read high, alike for the variants
compared (benchmarks/RESULTS.md, `compiled-parts`); they rank variants, the `frontier` rows below trained.

Measured on one H200 (Qwen2.5-1.5B shape, rows of 2048; benchmarks/RESULTS.md, scenarios `compiled-parts` and
`compiled`): without the Trainer, 2 rows a pass ran 34.3k tokens/s (16.5k without compilation). Through `lora_sft`
(`frontier`): on the whole card (16 rows a pass) 71.0k on one H200, 1.65× the Unsloth hand loop in the same run
(43.0k), 69.5k, 1.64× (42.3k), in another, and 63.5k on one H100, 1.70× (37.4k); on one H100 52.1k with
micro_batch_size=2 (with CUDA graphs, which `cuda_graphs="auto"` turns on for such small passes), 57.4k under 24 GiB
and 56.4k under 16 GiB.
Checkpointing whole layers costs this path more than Unsloth (8 rows, every layer recomputed: 33.2k on the H200), so
`backend="auto"` takes it where the memory budget fits a pass of `AUTO_MIN_TOKENS` without checkpointing, and
Unsloth below that (`prefers`). `selective_recompute` lowers the partitioner's activation memory budget
(`LEVEL_BUDGETS`): each layer recomputes part of its forward inside its own compiled backward. "pointwise": its
pointwise work, keeping about a third less, no matmul recomputed (read from the saved tensors on a CPU); "most": all
but attention, keeping about an eighth (on one H100 without the Trainer, 4 rows a pass ran 47.8k tokens/s at a
6.8 GiB peak, 8 rows checkpointing every layer 43.1k at 7.05 GiB). "auto" turns on the first of `choose_levers`'s
rungs with which a large pass fits. Under 8 GiB that is "most" with 28 of 28 layers' few saved tensors offloaded, 10
rows a pass: 50.4k tokens/s on an H100, 1.35× the Unsloth loop under the same cap in the same run (37.2k); the
Llama-3.1-8B shape at 8,192 tokens under 24 GiB, "most" with 31 of 32 layers offloaded, 2 rows: 12.8k, 1.35× (9.4k).
Compilation adds 10-30 s to the first steps; the layers
compile again for the first layer (its input needs no gradient), when the number of packed samples first changes
(then with a dynamic size), and when evaluation first runs.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

from lora_runtime.config import RECOMPUTE_LEVELS, LoraSftConfig

AUTO_MIN_TOKENS = 8_192  # micro_batch_size="auto": the smallest pass without recomputation worth leaving Unsloth for
# cuda_graphs="auto": the largest pass that replays CUDA graphs. Through lora_sft on one H200 (Qwen2.5-1.5B shape,
# benchmarks/RESULTS.md, `compiled`): 4,096 tokens a pass ran about 1.16× as fast with graphs as without, 32,768
# tokens about 0.97× (ratios of two runs of one process, each read by a meter since withdrawn there that read about
# 8/7 high on both); on one H100 (`cuda-graphs`) 8,192 tokens 1.04× (56.6k against 54.5k tokens/s, 0.14 GiB more at
# the peak), 16,384 1.00×. A larger model does more work a pass (the GPU sets the pace sooner): auto also keeps
# tokens × base parameters within what was measured
GRAPH_AUTO_MAX_TOKENS = 8_192
GRAPH_AUTO_MAX_PARAMETERS = 1.6e9


def eligible(config: LoraSftConfig, model_config: Any, *, auto: bool) -> tuple[bool, str]:
    """(can run, why not) on this host for this model (`model_config`: its config, None where unknown yet).
    `auto`: for kernels="auto", only where it was measured; else for kernels="compile"."""
    import sys

    import torch

    from lora_runtime import attention
    from lora_runtime.distributed import dist_env

    reasons = []
    usable, why = attention.available()
    if not usable:
        reasons.append(f"packed flash attention: {why}")
    elif not torch.cuda.is_bf16_supported():
        reasons.append("the GPU has no bf16")
    if config.load_in_4bit or config.load_in_8bit:
        reasons.append("bitsandbytes-quantized layers are not compiled here")
    if config.use_dora:
        reasons.append("DoRA is not compiled here")
    if config.sharding == "fsdp" or config.enable_model_splitting:
        reasons.append("sharding and model splitting run the plain path")
    if not config.bf16:
        reasons.append("bf16=False")
    if config.flash_attention is False:
        reasons.append("flash_attention=False asks for SDPA")
    if config.trust_remote_code:
        reasons.append("remote modeling code may not honour the packed attention (samples would see each other)")
    window = sliding_window(model_config)
    if window is not None and window < config.max_seq_len:
        reasons.append(f"the model attends within a sliding window of {window} tokens, shorter than "
                       f"max_seq_len={config.max_seq_len}")
    if auto:
        if not fused_loss(config, model_config):
            reasons.append(f"model type {getattr(model_config, 'model_type', None)!r} or an adapter on lm_head: "
                           "not measured without the chunked loss (kernels='compile' asks for it)")
        if dist_env().world_size > 1:
            reasons.append("several processes: not measured (kernels='compile' asks for it)")
        if config.kernels in ("liger", "none"):
            reasons.append(f"kernels={config.kernels!r}")
        if "unsloth" in sys.modules:
            reasons.append("Unsloth is imported in this process (its patches are on)")
    return not reasons, "; ".join(reasons)


def asked_for(config: LoraSftConfig) -> str:
    """The option that asks for the compiled path explicitly ("" where none does)."""
    if config.kernels == "compile":
        return "kernels='compile'"
    if config.selective_recompute in RECOMPUTE_LEVELS:
        return f"selective_recompute={config.selective_recompute!r}"
    if config.cuda_graphs is True:
        return "cuda_graphs=True"
    return ""


def recompute_level(config: LoraSftConfig) -> str:
    """The selective_recompute level the compiled layers run ("off" where none is set yet: "auto" before
    `choose_levers`)."""
    return config.selective_recompute if config.selective_recompute in RECOMPUTE_LEVELS else "off"


def fused_loss(config: LoraSftConfig, model_config: Any) -> bool:
    """Whether the chunked loss will run: a model whose logits are lm_head(hidden) alone, lm_head without an adapter
    (else transformers' loss builds the full logits, and the memory plan counts them)."""
    from lora_runtime import chunked_loss
    from lora_runtime.kernels import targets_lm_head

    return getattr(model_config, "model_type", None) in chunked_loss.MODEL_TYPES and not targets_lm_head(
        config.target_modules)


# transformers' defaults where config.json leaves them out (the config classes fill them in on loading)
WINDOW_DEFAULTS = {"mistral": 4096}
WINDOW_SWITCHED = ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe")  # a window that applies only with use_sliding_window


def sliding_window(model_config: Any) -> int | None:
    """The attention window the model's layers use (None: full attention), the same from a raw config.json as from
    transformers' config object: Qwen2/Qwen3 carry a window but switch it on with use_sliding_window (default off);
    Mistral's applies as set (default 4096)."""
    c = getattr(model_config, "text_config", None) or model_config
    model_type = getattr(c, "model_type", None) or getattr(model_config, "model_type", None)
    window = getattr(c, "sliding_window", WINDOW_DEFAULTS.get(str(model_type)))
    if model_type in WINDOW_SWITCHED and not getattr(c, "use_sliding_window", False):
        return None
    return window if isinstance(window, int) else None


def read_model_config(config: LoraSftConfig) -> Any:
    """config.json as attributes, read without importing transformers (Unsloth must be imported before it where the
    run goes to Unsloth); None where it cannot be read (loading the model will say why)."""
    from types import SimpleNamespace

    from lora_runtime.preflight import read_config_json

    raw = read_config_json(Path(config.model_path) / "config.json")
    if raw is None:
        return None
    text = raw.get("text_config")
    if isinstance(text, dict):
        raw = {**raw, "text_config": SimpleNamespace(**text)}
    return SimpleNamespace(**raw)


def prefers(config: LoraSftConfig) -> tuple[bool, str]:
    """Whether backend="auto" runs the compiled peft path, and why. kernels="compile", a selective_recompute level
    (that path's own) and cuda_graphs=True always, and so where `choose_levers` turns a level on;
    kernels="auto" on a CUDA GPU where it is eligible and the memory budget fits a pass of `AUTO_MIN_TOKENS` (or the
    micro batch given) without recomputation; gradient_checkpointing=True stays with Unsloth, whose recomputation is
    cheaper."""
    if config.backend != "auto":
        return False, ""
    config, levers = choose_levers(config)
    if levers:
        return True, levers
    if asked_for(config):
        return True, f"{asked_for(config)} runs on the compiled peft path"
    model_config, why = _auto_model_config(config)
    if model_config is None:
        return False, why and f"compiled path not taken: {why}"
    try:
        fits, words = _pass_fits(config, model_config)
    except AttributeError as e:
        return False, f"compiled path not taken: cannot size the model ({e})"
    return fits, f"compiled peft path: {words}" if fits else f"compiled path not taken: {words}"


def _auto_model_config(config: LoraSftConfig) -> tuple[Any, str]:
    """The model's config where kernels="auto" may take the compiled path (CUDA, eligible, checkpointing not forced),
    else None and why ("" where nothing needs saying)."""
    if config.kernels != "auto":
        return None, ""
    import torch

    if not torch.cuda.is_available():
        return None, ""
    model_config = read_model_config(config)
    if model_config is None:
        return None, "config.json unreadable here (a hub id is resolved later)"
    ok, why = eligible(config, model_config, auto=True)
    if not ok:
        return None, why
    if config.gradient_checkpointing is True:
        return None, "gradient_checkpointing=True (Unsloth recomputes layers faster)"
    return model_config, ""


def _pass_fits(config: LoraSftConfig, model_config: Any, offloaded: int | None = None) -> tuple[bool, str]:
    """Whether a pass of `AUTO_MIN_TOKENS` (or the micro batch given; at most a process's share of
    effective_batch_size) fits the memory budget on the compiled path without checkpointing a layer, with `config`'s
    selective recomputation and `offloaded` layers offloaded (default: every layer where activation_offload=True, the
    least the plan can keep), and the arithmetic in words."""
    from lora_runtime.batching import GIB, compiled_footprint, memory_budget
    from lora_runtime.distributed import dist_env

    level = recompute_level(config)
    footprint = compiled_footprint(model_config, fused_loss=True, level=level)
    if offloaded is None:
        offloaded = footprint.layers if config.activation_offload is True else 0
    offloaded = min(offloaded, footprint.layers)
    micro = config.micro_batch_size
    tokens = micro * config.max_seq_len if isinstance(micro, int) else max(AUTO_MIN_TOKENS, config.max_seq_len)
    if not isinstance(micro, int) and config.effective_batch_size:  # no pass larger than a process's share of it
        tokens = min(tokens, max(1, config.effective_batch_size // dist_env().world_size) * config.max_seq_len)
    budget, source = memory_budget(config)
    need = footprint.need(tokens, 0, offloaded)
    how = ("every layer offloaded" if offloaded == footprint.layers else
           f"{offloaded} layers offloaded" if offloaded else "")
    how = ", ".join(w for w in (LEVEL_WORDS.get(level, ""), how) if w)
    return need <= budget, (f"{tokens:,} tokens a pass without checkpointing{f' ({how})' if how else ''} need "
                            f"{need / GIB:.1f} GiB of {budget / GIB:.1f} ({source})")


# selective_recompute/activation_offload="auto": at most this many layers offloaded for the pass to fit with pointwise
# recomputation. Measured on one H200 (benchmarks/RESULTS.md, offload and compiled-parts), Qwen2.5-1.5B shape under 16
# GiB: pointwise recomputation with 6 of 28 layers offloaded ran about 1.09× as fast as Unsloth recomputing 17 layers
# (the plan without them), offload alone about 0.86× (not chosen by auto), in the same run (ratios of readings since
# withdrawn there, each about 8/7 high; on one H100 pointwise with 4 offloaded ran 1.41× the Unsloth hand loop under the
# same cap, `frontier`); 6 layers offloaded at 8,192 tokens a pass cost 10% of a step, 3 nothing, 10 at 16,384 tokens
# 37%. Under "most" a layer keeps about an eighth as much, so offloading every layer costs the link little: no limit
# there.
AUTO_MAX_OFFLOADED = 6


def choose_levers(config: LoraSftConfig) -> tuple[LoraSftConfig, str]:
    """selective_recompute="auto" and activation_offload="auto" made concrete, and the reason where they are on.

    On only where backend="auto" would otherwise leave the compiled path for Unsloth because a pass of
    `AUTO_MIN_TOKENS` does not fit without recomputation, or where activation_offload=True is asked for (offload
    alone ran slower than with either level: a level comes with it, and the plan may then offload no layer). The
    first that makes the pass fit, lightest first: pointwise recomputation; pointwise plus at most
    `AUTO_MAX_OFFLOADED` offloaded layers; "most" (the layers recompute all but attention in their backward) with
    offload, the plan weighing how many layers to offload, none included (without where offload is refused); and where
    offload is asked for (activation_offload=True), pointwise with every layer offloaded, the least memory of all
    ("most" holds more at its backward) and the slowest (each layer's copies outlast its work). An option given keeps
    its value: activation_offload=True with selective_recompute="auto" climbs the rungs with offload, False never
    offloads; "most" asked for comes with offload for the plan to weigh where that is "auto" (with backend="auto" and
    the other conditions below, as every lever here). Everywhere else both are off: offload alone is never chosen."""
    sr, ao = config.selective_recompute, config.activation_offload
    if sr != "auto" and ao != "auto":
        return config, ""
    base = dataclasses.replace(config, selective_recompute="off" if sr == "auto" else sr,
                               activation_offload=False if ao == "auto" else ao)
    if sr == "off":
        return base, ""
    # (level, offload, most offloaded layers for the pass to fit: None = every layer). Under "most" offload goes to the
    # plan even where a pass fits without: offloaded layers let a larger pass fit, and `batching.plan_batch` weighs the
    # two. On one H100 under 8 GiB (Qwen2.5-1.5B shape, through lora_sft, `frontier`, one run), 10 rows with all 28
    # layers offloaded ran 50.4k tokens/s, 4 rows without offload (activation_offload=False) 46.4k.
    ladder = [("pointwise", False, 0), ("pointwise", True, AUTO_MAX_OFFLOADED), ("most", True, None),
              ("most", False, 0)] + ([("pointwise", True, None)] if ao is True else [])
    candidates = [(level, offload, most) for level, offload, most in ladder
                  if (sr == "auto" or level == sr) and (ao == "auto" or offload == ao)]
    if (config.backend != "auto" or config.lora_dropout > 0 or config.cuda_graphs is True
            or config.sharding == "fsdp" or config.enable_model_splitting):
        return base, ""
    model_config, _ = _auto_model_config(base)
    if model_config is None:
        return base, ""
    try:
        weigh_offload = base.selective_recompute == "most" and ao == "auto"
        if ao is not True and not weigh_offload and _pass_fits(base, model_config)[0]:
            return base, ""  # the compiled path fits as it is
        for level, offload, most in candidates:
            chosen = dataclasses.replace(base, selective_recompute=level, activation_offload=offload)
            fits, words = _pass_fits(chosen, model_config, most)
            weighed = level == "most" and offload and ao == "auto"
            if fits and weighed:  # the arithmetic of the pass that needs no offload, where there is one
                fits_without, without = _pass_fits(chosen, model_config, 0)
                words = without if fits_without else words
            if fits:
                on = [f"selective_recompute={level!r}{' (auto)' if sr == 'auto' else ''}"]
                if offload:
                    on.append("activation_offload=True (auto: the plan weighs how many layers, none included)"
                              if weighed else f"activation_offload=True{' (auto)' if ao == 'auto' else ''}")
                return chosen, f"compiled peft path with {' and '.join(on)}: {words}"
    except AttributeError:  # a config that cannot be sized: prefers says so
        return base, ""
    return base, ""


def prepare(model: Any, targets: Any) -> str:
    """Before LoRA: the chunked loss where the model's logits are lm_head(hidden) alone and lm_head gets no adapter
    (LoRA `targets`). Returns the log line."""
    from lora_runtime import chunked_loss
    from lora_runtime.kernels import FUSED_FLAG, targets_lm_head

    ok, why = chunked_loss.applicable(model)
    if targets_lm_head(targets):
        ok, why = False, "lm_head is a LoRA target"
    if ok:
        chunked_loss.apply(model)
        setattr(model, FUSED_FLAG, True)
    loss = "chunked loss (no logits, no sync)" if ok else f"transformers' loss ({why})"
    return f"kernels: compiled path: layers compiled one by one, packed flash varlen attention, {loss}, bf16 LoRA matmuls"


# selective_recompute's levels: the partitioner keeps at most this share of what it would keep by default,
# recomputing the cheapest ops first. "pointwise": a matmul is recomputed only below 0.65 for the Qwen2.5-1.5B shape
# and 0.62 for Llama-3.1-8B's at 512 tokens (read from its saved tensors on a CPU: benchmarks/RESULTS.md,
# partitioner; `batching.pointwise_bytes_per_token` counts what 0.7 saves). "most": at 0.05 a layer keeps its input and
# attention's output (and LoRA's rank-sized products; the folded gate/up keep their input besides:
# `batching.most_bytes_per_token`), recomputing the projections;
# at 0 it keeps only its input and recomputes attention too
LEVEL_BUDGETS = {"pointwise": 0.7, "most": 0.05}
LEVEL_WORDS = {"pointwise": "pointwise work recomputed", "most": "all but attention recomputed"}


def graphs(config: LoraSftConfig, plan: Any, parameters: int | None = None) -> tuple[bool, str]:
    """Whether the compiled layers replay CUDA graphs (`cuda_graphs`), and the log's words. A graph replays one fixed
    forward and backward of a layer: not where a checkpointed layer recomputes (its whole forward runs again inside
    backward, outside the graph) or a layer offloads (its saved tensors would stay in the graphs' memory pool), nor in
    several processes. cuda_graphs=True where one of those holds raises, naming it. A selective_recompute level
    replays (its recomputation is part of the layer's compiled backward) where asked for: through lora_sft on one H100
    under 16 GiB (Qwen2.5-1.5B shape, 3 rows with pointwise recompute, 40 steps) graphs ran 34.1k tokens/s against
    54.0k without, every few steps one that took twice as long, so auto leaves them off with a level. "auto"
    turns them on only for a pass of at most `GRAPH_AUTO_MAX_TOKENS` tokens through a model of `parameters` (the
    base's, where known) at most that many tokens' worth of `GRAPH_AUTO_MAX_PARAMETERS` (where the host, not the
    GPU, sets the pace), with none of those, no level, no dropout and no evaluation (both unmeasured under graphs)."""
    from lora_runtime.distributed import dist_env

    if config.cuda_graphs is False:
        return False, "CUDA graphs off (cuda_graphs=False)"
    clash = []
    if plan.gradient_checkpointing and plan.recomputed_layers != 0:
        clash.append(f"the plan recomputes {plan.recomputation()}")
    if plan.offloaded_layers:
        clash.append(f"the plan offloads {plan.offloaded_layers} layer(s)")
    if dist_env().world_size > 1:  # DDP hands gradients over in buckets of its own
        clash.append("several processes (DDP's gradient buckets are not replayed)")
    if config.cuda_graphs == "auto":
        tokens = plan.micro * config.max_seq_len
        if tokens > GRAPH_AUTO_MAX_TOKENS:
            clash.append(f"a pass of {tokens:,} tokens keeps the GPU busy (auto replays passes of up to "
                         f"{GRAPH_AUTO_MAX_TOKENS:,})")
        elif parameters and tokens * parameters > GRAPH_AUTO_MAX_TOKENS * GRAPH_AUTO_MAX_PARAMETERS:
            clash.append(f"a pass of {tokens:,} tokens through {parameters / 1e9:.1f}B parameters keeps the GPU busy "
                         f"(auto replays up to {GRAPH_AUTO_MAX_TOKENS:,} tokens' worth of "
                         f"{GRAPH_AUTO_MAX_PARAMETERS / 1e9:.1f}B)")
        if config.selective_recompute in RECOMPUTE_LEVELS:
            clash.append(f"selective_recompute={config.selective_recompute!r}, measured slower with them")
        if config.lora_dropout > 0:
            clash.append(f"lora_dropout={config.lora_dropout}")
        if config.eval_data_path or config.eval_split_ratio:
            clash.append("evaluation")
        if clash:
            return False, f"CUDA graphs off (auto: {'; '.join(clash)})"
        return True, f"auto: a pass of {tokens:,} tokens, host-bound without them"
    if clash:  # the config refuses these up front; a plan or launch that still has one is refused here
        raise RuntimeError(f"cuda_graphs=True cannot run: {'; '.join(clash)}; pass cuda_graphs='auto'")
    return True, "cuda_graphs=True"


def before_replay(model: Any) -> None:
    """Before each forward of a model whose layers replay CUDA graphs: a new step of the graph trees (the outputs of
    the last one are done with, and their memory is reused), and every trainable parameter given a stable `.grad`
    where it has none. Autograd would otherwise take a layer's gradient from the graphs' memory pool as `.grad`
    itself, and the next pass of a gradient accumulation would overwrite it; accumulated into a buffer of its own
    it stays. The buffers are made once and zeroed where the trainer set `.grad` to None."""
    import torch

    if torch.is_grad_enabled() and model.training:
        buffers = model.__dict__.get("_lora_grad_buffers")
        if buffers is None:
            buffers = [(p, torch.zeros_like(p)) for p in model.parameters() if p.requires_grad]
            model.__dict__["_lora_grad_buffers"] = buffers
        unset = [(p, b) for p, b in buffers if p.grad is None]
        if unset:
            torch._foreach_zero_([b for _, b in unset])
            for p, b in unset:
                p.grad = b
    torch.compiler.cudagraph_mark_step_begin()


def release(model: Any) -> None:
    """After training with CUDA graphs: the gradient buffers and the graph trees' memory pool go (a second run in the
    same process records its own graphs)."""
    if model.__dict__.pop("_lora_grad_buffers", None) is not None:
        import torch._dynamo
        from torch._inductor.cudagraph_trees import reset_cudagraph_trees

        torch._dynamo.reset()  # the compiled layers bound to the graph trees (a graph outlives no tree)
        reset_cudagraph_trees()  # the trees themselves (older torch resets them only through mode="reduce-overhead")


# under CUDA graphs a pass's sample boundaries are padded with empty samples to the next power of two of the most a
# pass of the run can have (`PackedShardDataset.most_segments`), at least rows × this many: one shape, recorded once
# (FlashAttention's varlen backward sizes a buffer by the slot count). Padded to each pass's own count instead, a
# pass of 2 rows recorded a second shape at step 27 of 31, and that step took 5 s instead of 0.08 s
GRAPH_SAMPLES_PER_ROW = 8


def finish(model: Any, selective_recompute: str = "off", cuda_graphs: bool = False) -> str:
    """After LoRA and checkpointing are set: LoRA inputs stay bf16 (autocast runs the matmuls on the fp32 adapters),
    LoRA B is folded into the base GEMM of the widening projections (`fused_lora`; without a level, LoRA A into
    that of the narrowing ones) and every decoder layer is compiled; with a `selective_recompute` level by
    `recompute_backend` (the partitioner's activation memory budget for these layers' graphs only); with
    `cuda_graphs`, in Inductor's reduce-overhead mode (CUDA graph trees: each layer's kernels launched as one graph).
    Returns the log's words."""
    import torch._dynamo
    from transformers.modeling_layers import GradientCheckpointingLayer

    from lora_runtime import fused_lora

    for module in model.modules():
        if hasattr(module, "lora_A"):
            module.cast_input_dtype_enabled = False
    # LoRA A folded too only where no level is on: a folded projection keeps its input out of the partitioner's reach
    folded = fused_lora.apply(model, fold_a=selective_recompute not in LEVEL_BUDGETS)
    folded_a = sum(model.get_submodule(name).lora_fold == "a" for name in folded)
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    # every layer shares one compiled code object; its variants (first layer without input gradient, training and
    # evaluation, recomputed or not, a pass of another shape) must stay under the limit or layers fall back to eager
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), 32))
    words = f"{len(layers)} decoder layers compiled"
    if len(folded) > folded_a:
        words += f", LoRA B folded into the GEMM of {len(folded) - folded_a} widening projections"
    if folded_a:
        words += f", LoRA A into the GEMM of {folded_a} narrowing ones"
    options: dict[str, Any] = {}
    if selective_recompute in LEVEL_BUDGETS:
        grouped_query_flop_counts()  # the budget's solver counts each op's flops
        options["backend"] = recompute_backend(selective_recompute, cuda_graphs)
        words += (f", {LEVEL_WORDS[selective_recompute]} in their backward (activation memory budget "
                  f"{LEVEL_BUDGETS[selective_recompute]})")
    elif cuda_graphs:
        options["mode"] = "reduce-overhead"
    if cuda_graphs:
        words += ", each replaying CUDA graphs"
    for layer in layers:
        layer.compile(**options)
    return words


INNER_COMPILER = "inductor"  # what `recompute_backend` compiles with (the CPU tests: "aot_eager")


@functools.cache
def _budget_backend(budget: float, inner: str, cuda_graphs: bool = False) -> Any:
    def backend(graph: Any, example_inputs: Any) -> Any:
        import torch._dynamo
        import torch._functorch.config

        with torch._functorch.config.patch(activation_memory_budget=budget):  # read while AOTAutograd partitions
            if cuda_graphs:  # what mode="reduce-overhead" hands Inductor, for the backward compiled later too
                from torch._inductor.compile_fx import compile_fx

                return compile_fx(graph, example_inputs, config_patches={"triton.cudagraphs": True})
            return torch._dynamo.lookup_backend(inner)(graph, example_inputs)

    return backend


def recompute_backend(level: str, cuda_graphs: bool = False) -> Any:
    """A torch.compile backend: `INNER_COMPILER` with the partitioner's activation memory budget at the `level`'s
    (`LEVEL_BUDGETS`) while it compiles, so the setting is these layers' alone (not the process's) and Dynamo never
    serves one run's layers compiled with another setting (its cache checks the backend). One object per setting:
    compiled layers are reused across runs with the same one. With `cuda_graphs`, Inductor whatever
    `INNER_COMPILER` is, its layers replaying CUDA graph trees as in mode="reduce-overhead"."""
    return _budget_backend(LEVEL_BUDGETS[level], INNER_COMPILER, cuda_graphs)


def grouped_query_flop_counts() -> None:
    """torch.utils.flop_counter's attention formulas for grouped-query attention (fewer key/value heads than query
    heads), where this torch asserts equal counts (later versions broadcast the key/value heads, as done here); the
    partitioner's memory budget counts flops with them."""
    from torch.utils import flop_counter

    try:
        flop_counter.sdpa_flop_count((1, 4, 2, 8), (1, 2, 2, 8), (1, 2, 2, 8))
        return
    except AssertionError:
        pass
    forward, backward = flop_counter.sdpa_flop_count, flop_counter.sdpa_backward_flop_count

    def heads(shape: Any, like: Any) -> tuple:
        return (shape[0], like[1], *shape[2:])

    flop_counter.sdpa_flop_count = lambda q, k, v: forward(q, heads(k, q), heads(v, q))
    flop_counter.sdpa_backward_flop_count = lambda g, q, k, v: backward(g, q, heads(k, q), heads(v, q))
