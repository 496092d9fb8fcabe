"""Partial recomputation (the batch plan's `recomputed_layers`): only that many decoder layers run their forward
twice (counted by a forward pre-hook: a post-hook may never fire in a recompute, which stops early), and the LoRA
gradients equal those of no recomputation exactly (fp32, CPU), as they do with every layer recomputed."""

from __future__ import annotations

from pathlib import Path

import _tiny
import pytest
import torch
from lora_runtime.backends.peft import PeftBackend
from lora_runtime.batching import fixed_plan
from lora_runtime.collate import collate_packed
from lora_runtime.config import LoraSftConfig


@pytest.fixture(scope="module")
def four_layer_llama(tmp_path_factory, llama3_tokenizer_dir) -> Path:
    return _tiny.build_model(tmp_path_factory.mktemp("llama4"), arch="llama", tokenizer_dir=llama3_tokenizer_dir,
                             num_layers=4)


def _batch() -> dict:
    gen = torch.Generator().manual_seed(0)
    rows = []
    for lengths in ((20, 30, 14), (40, 24)):
        ids = torch.randint(10, 900, (64,), generator=gen).tolist()
        rows.append({"input_ids": ids, "loss_mask": [1] * 64, "seq_lens": list(lengths)})
    batch = collate_packed(rows)
    batch.pop("num_tokens", None)
    return batch


def _grads_and_calls(model_dir: Path, gc: bool, recomputed: int | None) -> tuple[dict, list[int]]:
    cfg = LoraSftConfig(str(model_dir), "unused", "unused", lora_r=4, init_lora_weights="gaussian", seed=1,
                        bf16=False, micro_batch_size=2)
    plan = fixed_plan(cfg, 1, gc=gc, recomputed_layers=recomputed)
    backend = PeftBackend()
    model, _ = backend.load(cfg, plan)
    model = backend.add_lora(model, cfg, plan)
    with torch.no_grad():  # B starts at zero: give it values so every LoRA weight gets a gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.linspace(-0.1, 0.1, p.numel()).view_as(p))
    layers = model.base_model.model.model.layers
    calls = [0] * len(layers)
    for i, layer in enumerate(layers):
        layer.register_forward_pre_hook(lambda *_a, i=i: calls.__setitem__(i, calls[i] + 1))
    model.train()
    model(**{k: v.to(model.device) if hasattr(v, "to") else v for k, v in _batch().items()}).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, calls


@pytest.mark.parametrize("recomputed", [1, 3, None])
@pytest.mark.skipif(torch.cuda.is_available(), reason="bitwise equality is a CPU property: on a GPU a recompute may run "
                    "other cuBLAS kernels (the GPU side is measured by the frontier benchmark)")
def test_partial_recomputation_gives_the_same_gradients_exactly(four_layer_llama, recomputed):
    plain, plain_calls = _grads_and_calls(four_layer_llama, gc=False, recomputed=None)
    grads, calls = _grads_and_calls(four_layer_llama, gc=True, recomputed=recomputed)
    assert plain_calls == [1, 1, 1, 1]
    expected = 4 if recomputed is None else recomputed
    assert calls == [2] * expected + [1] * (4 - expected)  # the first `recomputed` layers run twice, no others
    assert plain.keys() == grads.keys() and len(plain) == 4 * 7 * 2
    for name, g in plain.items():
        torch.testing.assert_close(grads[name], g, atol=0, rtol=0, msg=name)
