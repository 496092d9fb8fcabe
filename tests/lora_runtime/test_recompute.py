"""Partial recomputation (the batch plan's `recomputed_layers`): only that many decoder layers run their forward
twice (counted by a forward pre-hook: a post-hook may never fire in a recompute, which stops early), and the LoRA
gradients equal those of no recomputation exactly (fp32, CPU), as they do with every layer recomputed. Recomputation
computes no gradient for the first layer's input."""

from __future__ import annotations

import pytest
import torch
from _grads import lora_grads, lora_model, train_step


@pytest.mark.parametrize("recomputed", [1, 3, None])
@pytest.mark.skipif(torch.cuda.is_available(), reason="bitwise equality is a CPU property: on a GPU a recompute may run "
                    "other cuBLAS kernels (the GPU side is measured by the frontier benchmark)")
def test_partial_recomputation_gives_the_same_gradients_exactly(four_layer_llama, recomputed):
    plain, plain_calls, _ = lora_grads(four_layer_llama, gc=False, recomputed=None)
    grads, calls, _ = lora_grads(four_layer_llama, gc=True, recomputed=recomputed)
    assert plain_calls == [1, 1, 1, 1]
    expected = 4 if recomputed is None else recomputed
    assert calls == [2] * expected + [1] * (4 - expected)  # the first `recomputed` layers run twice, no others
    assert plain.keys() == grads.keys() and len(plain) == 4 * 7 * 2
    for name, g in plain.items():
        torch.testing.assert_close(grads[name], g, atol=0, rtol=0, msg=name)


@pytest.mark.parametrize("own_checkpointing", [False, True])
def test_recomputation_computes_no_gradient_for_the_first_layers_input(four_layer_llama, monkeypatch,
                                                                       own_checkpointing):
    """Non-reentrant checkpointing needs no input that requires grad: the embeddings' output goes without one, so
    backward computes no gradient of the first layer's input (nothing reads it), and every LoRA weight, the first
    layer's included, still gets a gradient. A model whose decoder layers are not transformers'
    `GradientCheckpointingLayer`s (a remote model's own checkpointing, which may be reentrant) keeps transformers'
    hook."""
    from lora_runtime.backends import base

    if own_checkpointing:
        monkeypatch.setattr(base, "decoder_layers", lambda _model: [])
    model = lora_model(four_layer_llama, gc=True)
    seen: list[bool] = []
    model.get_input_embeddings().register_forward_hook(lambda _m, _i, out: seen.append(out.requires_grad))
    lora = train_step(model)
    assert seen == [own_checkpointing]
    assert len(lora) == 4 * 7 * 2
    assert all(g is not None and bool(g.abs().sum() > 0) for g in lora.values())
