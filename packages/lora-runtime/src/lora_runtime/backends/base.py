"""The backend seam: how a model is loaded, gets LoRA adapters, is saved and merged.

The training loop (`lora_runtime.loop`) only talks to this protocol; the peft backend (transformers + PEFT, CPU and
CUDA) and the unsloth backend (FastLanguageModel, CUDA) implement it.

Contract for implementers:
- `load(config)` returns `(model, tokenizer)`: a causal LM whose forward honours packed `position_ids` without an
  attention mask (samples restart at position 0 and must not attend across; see lora_runtime.collate), with
  `config.use_cache = False`, on the device it trains on; and the tokenizer saved next to the adapter.
- `add_lora(model, config)` returns a `peft.PeftModel` with only LoRA parameters trainable, seeded by `config.seed`,
  and gradient checkpointing set up as `config.gradient_checkpointing` asks (the loop never turns it on itself).
- `save_adapter(model, out_dir)` writes `adapter_model.safetensors` + `adapter_config.json`, loadable with
  `peft.PeftModel.from_pretrained(base, out_dir)`.
- `merge(adapter_dir, out_dir, config)` writes the merged full model (safetensors) + tokenizer to `out_dir`.
- optional, for `micro_batch_size="auto"` on a GPU (lora_runtime.batching): `footprint(model_config, four_bit)`
  → a `Footprint` (bytes: weights, per token with and without checkpointing), and `checkpointing_mode(config)` →
  True / False, or "auto" where the backend lets the memory plan decide. Without them auto is 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from lora_runtime.config import LoraSftConfig


@runtime_checkable
class Backend(Protocol):
    name: str  # "peft" | "unsloth": recorded in TrainResult.backend and the logs

    def load(self, config: LoraSftConfig) -> tuple[Any, Any]:
        """Base model (frozen, use_cache=False) and its tokenizer, from `config.model_path`."""
        ...

    def add_lora(self, model: Any, config: LoraSftConfig) -> Any:
        """Wrap `model` in LoRA adapters (r, alpha, dropout, target_modules, rslora/dora, init, patterns)."""
        ...

    def save_adapter(self, model: Any, out_dir: str | Path) -> Path:
        """PEFT-format adapter files in `out_dir`; returns `out_dir`."""
        ...

    def merge(self, adapter_dir: str | Path, out_dir: str | Path, config: LoraSftConfig) -> Path:
        """Base (`config.model_path`) + adapter → merged model in safetensors at `out_dir`; returns `out_dir`."""
        ...


# Unsloth's default LoRA targets (every attention and MLP projection); used when target_modules is None.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def wants_gradient_checkpointing(config: LoraSftConfig) -> bool:
    """`auto`: on where CUDA memory is the limit, off on a CPU (where it only costs time)."""
    if config.gradient_checkpointing == "auto":
        import torch

        return torch.cuda.is_available()
    return bool(config.gradient_checkpointing)
