"""transformers + PEFT backend: runs on CPU and CUDA; the tests' backend.

Packed samples must not attend to each other. The collator sends `position_ids` that restart per sample and no
attention mask; with `use_cache=False`, transformers 5 derives from them a block-diagonal causal mask for SDPA/eager
(`masking_utils.find_packed_sequence_indices`), and `cu_seq_lens` for FlashAttention-2 varlen, but the latter only
for a batch of ONE row: with flash_attention_2 a forward pre-hook flattens [micro, n] rows to [1, micro·n]
(`backends.base.flatten_hook`). `test_packed_row_loss_equals_samples_alone` checks the SDPA/eager paths on the CPU.

On CUDA the compiled path (`lora_runtime.compiled`, kernels="compile", or "auto" where eligible) replaces all of this
with its own attention over flattened rows (`lora_runtime.attention`), compiled layers and a chunked loss; otherwise
liger-kernel's fused kernels apply where installed (`lora_runtime.kernels`).
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from typing import Any

from lora_runtime import attention, compiled, kernels, offload
from lora_runtime.backends.base import (
    DEFAULT_TARGETS,
    BackendBase,
    checkpoint_layers,
    flatten_hook,
    limit_recomputation,
    quantization_config,
)
from lora_runtime.batching import BatchPlan, Footprint, compiled_footprint, peft_footprint
from lora_runtime.config import ConfigError, LoraSftConfig
from lora_runtime.distributed import all_reduce_min, dist_env, print0


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


class PeftBackend(BackendBase):
    name = "peft"
    def checkpointing_by_memory(self, config: LoraSftConfig) -> bool:
        """With a loss that keeps no logits (the compiled path's, liger's) the footprint is measured on both sides
        (liger, no recomputation: 44.8 GiB for 16k tokens of the Qwen2.5-1.5B shape, estimated 48.4), so the budget
        decides; without one auto is simply on with CUDA, unless layers may offload (the plan weighs the two)."""
        return config.activation_offload is True or self.compiled(config) or self.fused_loss(config)

    def footprint(self, model_config: Any, config: LoraSftConfig) -> Footprint:
        if self.compiled(config):
            footprint = compiled_footprint(model_config, fused_loss=compiled.fused_loss(config, model_config),
                                           level=compiled.recompute_level(config))
        else:
            footprint = peft_footprint(model_config, config.load_in_4bit, fused_loss=self.fused_loss(config))
        if config.activation_offload is not True:
            return footprint
        from lora_runtime.batching import offload_speed
        from lora_runtime.offload import host_link_bandwidth, host_memory_budget

        env = dist_env()
        # every rank plans alike (the batch arithmetic must agree): the slowest link, the least host memory
        return dataclasses.replace(footprint, gpu_tokens_per_s=offload_speed(model_config),
                                   offload_bandwidth=all_reduce_min(host_link_bandwidth(env.local_rank)),
                                   host_budget=all_reduce_min(host_memory_budget(env.local_world_size)))

    @staticmethod
    def compiled(config: LoraSftConfig) -> bool:
        """Whether the compiled path runs (lora_runtime.compiled): kernels="compile" or a selective_recompute level
        (asked for), or kernels="auto" where eligible on CUDA. Asked for where it cannot run raises,
        naming why."""
        import torch

        if config.kernels not in ("auto", "compile") or not torch.cuda.is_available():
            return False
        asked = compiled.asked_for(config)
        ok, why = compiled.eligible(config, _model_config(config.model_path, config.trust_remote_code),
                                    auto=not asked)
        if not ok and asked:
            raise RuntimeError(f"{asked} cannot run here: {why}")
        return ok

    @staticmethod
    def fused_loss(config: LoraSftConfig) -> bool:
        """Whether liger's fused linear + cross-entropy will run (no [tokens, vocab] logits in memory)."""
        import torch

        if (not torch.cuda.is_available() or config.kernels in ("none", "compile") or not kernels.liger_installed()
                or kernels.targets_lm_head(config.target_modules)):
            return False
        model_type = _model_type(config.model_path, config.trust_remote_code)
        if model_type is None:
            return False
        try:
            return kernels.choose(config, PeftBackend.name, model_type, cuda=True)[0]
        except RuntimeError:  # kernels="liger" that cannot run: load() says so
            return False

    def load(self, config: LoraSftConfig, plan: BatchPlan) -> tuple[Any, Any]:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        cuda = torch.cuda.is_available()
        tokenizer = AutoTokenizer.from_pretrained(config.model_path, trust_remote_code=config.trust_remote_code)
        device_map: Any = None
        if config.enable_model_splitting:
            device_map = "balanced"
        elif cuda and config.sharding != "fsdp":  # fsdp: loaded on the CPU, fully_shard moves each GPU its shards
            device_map = {"": dist_env().local_rank}
        fast = self.compiled(config)
        attn = attention.register() if fast else attn_implementation(config)
        dtype = torch.bfloat16 if cuda and config.bf16 and torch.cuda.is_bf16_supported() else torch.float32
        model = AutoModelForCausalLM.from_pretrained(
            config.model_path, dtype=dtype, attn_implementation=attn, device_map=device_map,
            quantization_config=quantization_config(config), trust_remote_code=config.trust_remote_code)
        model.config.use_cache = False  # a KV cache disables transformers' packed-sequence mask
        print0(f"model: {type(model).__name__} from {config.model_path}, weights {dtype}, attention {attn}")
        if fast:
            print0(compiled.prepare(model, config.target_modules))
            return model, tokenizer
        use_liger, why = kernels.choose(config, self.name, getattr(model.config, "model_type", None), cuda)
        print0(kernels.apply_liger(model, config.target_modules) if use_liger else f"kernels: {why}")
        return model, tokenizer

    def add_lora(self, model: Any, config: LoraSftConfig, plan: BatchPlan) -> Any:
        import torch
        from peft import LoftQConfig, LoraConfig, get_peft_model, prepare_model_for_kbit_training

        gc = plan.gradient_checkpointing
        if config.load_in_4bit or config.load_in_8bit:
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)  # on below, if at all
        torch.manual_seed(config.seed)
        if "unsloth" in sys.modules and kernels.targets_lm_head(config.target_modules):
            raise ConfigError(["`target_modules` puts a LoRA on lm_head, but Unsloth is imported in this process (an "
                               "earlier run on the unsloth backend, or an import): the models it patched compute the "
                               "loss from lm_head's base weight, so that LoRA would not train. Run in a fresh process"])
        targets = _targets(model, config.target_modules)
        options: dict[str, Any] = dict(  # PEFT annotates alpha as int and init as a Literal; it takes ours as given
            r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout, bias="none",
            target_modules=targets, task_type="CAUSAL_LM",
            use_rslora=config.use_rslora, use_dora=config.use_dora, init_lora_weights=config.init_lora_weights,
            rank_pattern=dict(config.rank_pattern or {}), alpha_pattern=dict(config.alpha_pattern or {}),
            loftq_config=LoftQConfig(**config.loftq_config) if config.loftq_config else {})
        lora = LoraConfig(**options)
        model = get_peft_model(model, lora)
        fast = getattr(model.config, "_attn_implementation", None) == attention.ATTENTION
        varlen = getattr(model.config, "_attn_implementation", None) == "flash_attention_2"
        trainable, total = model.get_nb_trainable_parameters()
        graphs, graph_words = compiled.graphs(config, plan, total - trainable) if fast else (False, "")
        model.cuda_graphs = graphs  # what the run decided, recorded with the resolved plan (loop.finish)
        model.register_forward_pre_hook(
            flatten_hook(keep_seq_lengths=False, flatten=varlen, boundaries=fast, graphs=graphs), with_kwargs=True)
        if varlen:
            print0("attention: flash_attention_2 varlen; each micro-batch is flattened to one padding-free row")
        recomputing = "off"
        if gc:
            checkpoint_layers(model)
            recomputing = f"on for {limit_recomputation(model, plan.recomputed_layers)} layer(s)"
        if fast:
            recomputing += f"; {compiled.finish(model, config.selective_recompute, graphs)} ({graph_words})"
        if plan.offloaded_layers:  # after compiling: the copies run around each compiled layer, not inside it
            first = (plan.recomputed_layers or 0) if gc else 0
            offloading = offload.attach(model, first, plan.offloaded_layers)
            recomputing += (f"; activations of layers {offloading.indices if offloading else []} offloaded to pinned "
                            "host memory")
        print0(f"LoRA r={config.lora_r} alpha={config.lora_alpha} on {targets if isinstance(targets, str) else sorted(targets)}: "
               f"{trainable:,} trainable of {total:,} parameters; gradient checkpointing {recomputing}")
        return model


@functools.lru_cache(maxsize=8)
def _model_config(model_path: str, trust_remote_code: bool) -> Any:
    """The model's config, read once for the plan's several questions (None: unreadable; loading the model will say
    what is wrong with it)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return None


def _model_type(model_path: str, trust_remote_code: bool) -> str | None:
    return getattr(_model_config(model_path, trust_remote_code), "model_type", None)


def _targets(model: Any, requested: tuple[str, ...] | str | None) -> Any:
    """`requested` as given; None → the Unsloth default projections present in `model` (else 'all-linear')."""
    if requested is not None:
        return list(requested) if isinstance(requested, tuple) else requested
    import torch

    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    present = [t for t in DEFAULT_TARGETS if t in names]
    return present or "all-linear"
