"""The LoRA gradients of one forward and backward on the peft backend's model, for a batch plan: shared by the tests
that compare a memory-saving plan (recomputed layers, offloaded layers) with keeping everything, exactly in fp32."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lora_runtime.backends.peft import PeftBackend
from lora_runtime.batching import fixed_plan
from lora_runtime.collate import collate_packed
from lora_runtime.config import LoraSftConfig


def packed_batch() -> dict:
    """Two packed rows of 64 tokens (samples of 20+30+14 and 40+24), loss on every token."""
    gen = torch.Generator().manual_seed(0)
    rows = []
    for lengths in ((20, 30, 14), (40, 24)):
        ids = torch.randint(10, 900, (64,), generator=gen).tolist()
        rows.append({"input_ids": ids, "loss_mask": [1] * 64, "seq_lens": list(lengths)})
    batch = collate_packed(rows)
    batch.pop("num_tokens", None)
    return batch


def lora_model(model_dir: Path, *, gc: bool, recomputed: int | None = None, offloaded: int = 0) -> Any:
    """The peft backend's model with LoRA r=4 for a fixed plan, LoRA B given values (it starts at zero) so that every
    LoRA weight gets a gradient."""
    cfg = LoraSftConfig(str(model_dir), "unused", "unused", lora_r=4, init_lora_weights="gaussian", seed=1,
                        bf16=False, micro_batch_size=2)
    plan = fixed_plan(cfg, 1, gc=gc, recomputed_layers=recomputed, offloaded_layers=offloaded)
    backend = PeftBackend()
    model, _ = backend.load(cfg, plan)
    model = backend.add_lora(model, cfg, plan)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.linspace(-0.1, 0.1, p.numel()).view_as(p))
    return model


def train_step(model: Any) -> dict:
    """One forward and backward of `packed_batch` in train mode; the LoRA gradients by name (None: none came)."""
    model.train()
    model(**{k: v.to(model.device) if hasattr(v, "to") else v for k, v in packed_batch().items()}).loss.backward()
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def lora_grads(model_dir: Path, *, gc: bool, recomputed: int | None, offloaded: int = 0) -> tuple[dict, list[int], Any]:
    """(LoRA gradients by name, forward calls per decoder layer, the model's activation offload or None)."""
    model = lora_model(model_dir, gc=gc, recomputed=recomputed, offloaded=offloaded)
    layers = model.base_model.model.model.layers
    calls = [0] * len(layers)
    for i, layer in enumerate(layers):
        layer.register_forward_pre_hook(lambda *_a, i=i: calls.__setitem__(i, calls[i] + 1))
    return train_step(model), calls, getattr(model, "activation_offload", None)
