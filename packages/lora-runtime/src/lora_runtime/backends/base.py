"""The backend seam: how a model is loaded and gets LoRA adapters. What both backends do alike lives here too.

The training loop (`lora_runtime.loop`) only talks to this protocol; the peft backend (transformers + PEFT, CPU and
CUDA) and the unsloth backend (FastLanguageModel, CUDA) implement it, and inherit from `BackendBase` what does not
differ between them: saving the adapter, the merge, the bitsandbytes config, the batch-flattening hook and the
per-layer recomputation switch.

Contract for implementers:
- `load(config, plan)` returns `(model, tokenizer)`: a causal LM whose forward honours packed `position_ids` without
  an attention mask (samples restart at position 0 and must not attend across; see lora_runtime.collate), with
  `config.use_cache = False`, on the device it trains on; and the tokenizer saved next to the adapter.
- `add_lora(model, config, plan)` returns a `peft.PeftModel` with only LoRA parameters trainable, seeded by
  `config.seed`, recomputing activations exactly as `plan` says (`plan.gradient_checkpointing`, and only
  `plan.recomputed_layers` decoder layers where that is set); the loop never turns checkpointing on itself.
- `save_adapter(model, out_dir)` writes `adapter_model.safetensors` + `adapter_config.json`, loadable with
  `peft.PeftModel.from_pretrained(base, out_dir)`.
- `merge(adapter_dir, out_dir, config)` writes the merged full model (safetensors) + tokenizer to `out_dir`.
- for the memory plan on a GPU (lora_runtime.batching): `footprint(model_config, config)` → a `Footprint`, and
  `checkpointing_by_memory(config)`: True where gradient_checkpointing="auto" may recompute any number of layers
  (else auto is simply on with CUDA). Without `footprint`, micro_batch_size="auto" is 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from lora_runtime.collate import flatten_packed_batch

if TYPE_CHECKING:
    from lora_runtime.batching import BatchPlan, Footprint
    from lora_runtime.config import LoraSftConfig

# Unsloth's default LoRA targets (every attention and MLP projection); used when target_modules is None.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@runtime_checkable
class Backend(Protocol):
    name: str  # "peft" | "unsloth": recorded in TrainResult.backend and the logs
    def checkpointing_by_memory(self, config: LoraSftConfig) -> bool:
        """Whether gradient_checkpointing="auto" is planned from the memory budget (else: on with CUDA)."""
        ...


    def load(self, config: LoraSftConfig, plan: BatchPlan) -> tuple[Any, Any]:
        """Base model (frozen, use_cache=False) and its tokenizer, from `config.model_path`."""
        ...

    def add_lora(self, model: Any, config: LoraSftConfig, plan: BatchPlan) -> Any:
        """Wrap `model` in LoRA adapters (r, alpha, dropout, target_modules, rslora/dora, init, patterns)."""
        ...

    def footprint(self, model_config: Any, config: LoraSftConfig) -> Footprint:
        """GPU bytes of training this model: weights, and per token by how many layers recompute."""
        ...

    def save_adapter(self, model: Any, out_dir: str | Path) -> Path:
        """PEFT-format adapter files in `out_dir`; returns `out_dir`."""
        ...

    def merge(self, adapter_dir: str | Path, out_dir: str | Path, config: LoraSftConfig) -> Path:
        """Base (`config.model_path`) + adapter → merged model in safetensors at `out_dir`; returns `out_dir`."""
        ...


class BackendBase:
    """What the backends share."""

    name = "base"

    def checkpointing_by_memory(self, config: LoraSftConfig) -> bool:
        return False

    def save_adapter(self, model: Any, out_dir: str | Path) -> Path:
        # Base weights never train (no modules_to_save), so a LoRA on lm_head/embeddings needs no copy of them.
        model.save_pretrained(str(out_dir), safe_serialization=True, save_embedding_layers=False)
        return Path(out_dir)

    def merge(self, adapter_dir: str | Path, out_dir: str | Path, config: LoraSftConfig) -> Path:
        """PEFT merge into the original (bf16) base: also right for a QLoRA adapter, and no 4-bit round trip."""
        from lora_runtime.merge import merge_adapter

        return merge_adapter(adapter_dir, config.model_path, out_dir, trust_remote_code=config.trust_remote_code)


def quantization_config(config: LoraSftConfig, *, defaults_apply: bool = True) -> Any:
    """A BitsAndBytesConfig for load_in_4bit / load_in_8bit (None without either). With `defaults_apply=False`, None
    also when no bnb_4bit_* option is set (the backend's own 4-bit defaults are used then)."""
    if not (config.load_in_4bit or config.load_in_8bit):
        return None
    bnb = (config.bnb_4bit_quant_type, config.bnb_4bit_compute_dtype, config.bnb_4bit_use_double_quant)
    if not defaults_apply and all(v is None for v in bnb):
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


def flatten_hook(*, keep_seq_lengths: bool, flatten: bool = True, boundaries: bool = False,
                 graphs: bool = False) -> Any:
    """A forward pre-hook: packed rows [b, n] → one padding-free row [1, b·n] (lora_runtime.collate). Unsloth reads the
    boundaries from `packed_seq_lengths`; transformers' varlen path from the restarting `position_ids`; with
    `boundaries`, lora_runtime.attention from `cu_seq_lens_q`/`max_length_q` made here (the longest sample bounded by
    the row length: one value for every batch, so compiled layers need not recompile). With `flatten=False` the
    rows stay as they are (SDPA/eager derive block-diagonal masks per row) and the collator's `packed_seq_lengths`
    is only taken out of the call. With `graphs` (the compiled layers replay CUDA graphs) the boundaries are padded
    to a fixed count, at least the model's `graph_segments` (the most a pass of the run can have, where it is set:
    one shape, recorded once), and each forward is a new step of the graph trees (`compiled.before_replay`)."""

    def hook(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if args:  # positional input_ids: leave the call alone
            return None
        if boundaries:
            if graphs:
                from lora_runtime.compiled import before_replay

                before_replay(module)
            return args, _with_boundaries(kwargs, graphs, getattr(module, "graph_segments", 0))
        new = flatten_packed_batch(kwargs) if flatten else None
        if new is None:
            if "packed_seq_lengths" not in kwargs or keep_seq_lengths:
                return None
            new = dict(kwargs)
        if not keep_seq_lengths:
            new.pop("packed_seq_lengths", None)
        return args, new

    return hook


def _with_boundaries(kwargs: dict, graphs: bool = False, segments: int = 0) -> dict:
    import torch

    from lora_runtime import attention
    from lora_runtime.compiled import GRAPH_SAMPLES_PER_ROW

    ids = kwargs.get("input_ids")
    if ids is None or kwargs.get("attention_mask") is not None:
        raise ValueError("packed flash attention takes packed rows (input_ids with restarting position_ids) and no "
                         "attention mask")
    row = int(ids.shape[-1])
    new = flatten_packed_batch(kwargs) or dict(kwargs)
    lengths = new.pop("packed_seq_lengths", None)
    if lengths is None:  # one row without lengths: one sample
        lengths = torch.tensor([row], dtype=torch.int32)
    rows = ids.shape[0] if ids.dim() > 1 else 1
    slots = max(GRAPH_SAMPLES_PER_ROW * rows, 1 << (max(len(lengths), segments) - 1).bit_length()) if graphs else None
    new.update(attention.boundaries(lengths, ids.device, max_len=row, samples=slots))
    if not graphs:  # the number of samples changes from batch to batch: compiled layers take it as a dynamic size
        torch._dynamo.maybe_mark_dynamic(new["cu_seq_lens_q"], 0)
    return new


def decoder_layers(model: Any) -> list[Any]:
    """The text decoder's layers, in order: the `GradientCheckpointingLayer`s of the module list that holds them (a
    vision tower's blocks are such layers too), else every such layer."""
    import torch
    from transformers.modeling_layers import GradientCheckpointingLayer

    config = getattr(model, "config", None)
    wanted = getattr(getattr(config, "text_config", None) or config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if (isinstance(module, torch.nn.ModuleList) and len(module) and len(module) == (wanted or len(module))
                and "vision" not in name and "visual" not in name
                and all(isinstance(m, GradientCheckpointingLayer) for m in module)):
            return list(module)
    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def checkpoint_layers(model: Any) -> None:
    """Turn on transformers' per-layer checkpointing, the non-reentrant kind. Transformers also hooks the embeddings
    so that their output requires grad, which only the reentrant kind needs: where every decoder layer checkpoints
    as a `GradientCheckpointingLayer` (not a remote model's own checkpointing, which may be reentrant), the hook is
    removed, and backward no longer computes the gradient of the first layer's input, which nothing reads."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = decoder_layers(model)
    if layers and all(layer.gradient_checkpointing for layer in layers):
        model.disable_input_require_grads()


def limit_recomputation(model: Any, recomputed: int | None) -> int:
    """Keep checkpointing on only the first `recomputed` decoder layers that have it (None: leave all); returns how
    many layers recompute. Transformers' decoder layers (`GradientCheckpointingLayer`) read a per-layer flag.

    The later layers keep their activations: backward reaches them first, so their memory is freed first.
    """
    layers = [m for m in decoder_layers(model) if m.gradient_checkpointing]
    if recomputed is None:
        return len(layers)
    for layer in layers[recomputed:]:
        layer.gradient_checkpointing = False
    return min(recomputed, len(layers))
