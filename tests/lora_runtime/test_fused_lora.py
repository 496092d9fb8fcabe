"""lora_runtime.fused_lora: LoRA's B product (and, with `fold_a`, its A product) folded into the base GEMM gives
PEFT's losses and gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from lora_runtime import fused_lora
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _model(dtype: torch.dtype = torch.float32, **lora: object):
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128)
    model = get_peft_model(LlamaForCausalLM(config).to(dtype),
                           LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, **lora))
    with torch.no_grad():  # B starts at zero: give it values so every LoRA weight gets a gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
    return model


def _grads(model, steps: int = 2) -> list[dict]:
    """LoRA gradients of `steps` passes, a step of SGD between them (the fused forward must read updated weights)."""
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(2))
    out = []
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        out.append({"loss": loss.detach(), **{n: p.grad.clone() for n, p in model.named_parameters()
                                               if p.requires_grad}})
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p -= 0.5 * p.grad
    return out


def _assert_close(got: list[dict], want: list[dict], tol: float) -> None:
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys()
        for name in w:
            scale = w[name].abs().max().item() or 1.0
            assert (g[name] - w[name]).abs().max().item() <= tol * scale, name


@pytest.fixture
def folds(monkeypatch) -> list:
    """Names the folded GEMMs run, "b" or "a" a call (traced, under torch.compile): a fallback to PEFT's forward
    names none."""
    calls: list = []

    def spy(fold: str, function):
        def run(*args, **kwargs):
            calls.append(fold)
            return function(*args, **kwargs)
        return run

    monkeypatch.setattr(fused_lora, "folded_linear", spy("b", fused_lora.folded_linear))
    monkeypatch.setattr(fused_lora, "folded_a_linear", spy("a", fused_lora.folded_a_linear))
    return calls


@pytest.mark.parametrize("fold_a", [False, True])
@pytest.mark.parametrize("compiled", [False, True])
def test_folded_lora_trains_like_peft_in_fp32(compiled, fold_a, folds):
    """The widening projections (gate, up) take the folded GEMM, with `fold_a` the narrowing ones (k and v of
    grouped-query attention, down) LoRA A's; losses and every LoRA gradient of two passes match PEFT's to fp32
    rounding, eager and with each layer traced by Dynamo (aot_eager: the joint graph Inductor gets)."""
    plain = _model()
    folded = copy.deepcopy(plain)
    names = fused_lora.apply(folded, fold_a=fold_a)
    got = {n.split("layers.")[1]: folded.get_submodule(n).lora_fold for n in names}
    a = {f"{i}.{name}": "a" for i in (0, 1) for name in ("self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj")}
    assert got == {f"{i}.mlp.{name}": "b" for i in (0, 1) for name in ("gate_proj", "up_proj")} | (a if fold_a else {})
    if compiled:
        torch._dynamo.reset()
        for layer in folded.base_model.model.model.layers:
            layer.compile(backend="aot_eager", fullgraph=True)
    _assert_close(_grads(folded), _grads(plain), 1e-5)
    # traced once per layer variant, or every call of 2 passes
    assert folds.count("b") >= (2 if compiled else 2 * 4)
    assert folds.count("a") >= ((3 if compiled else 2 * 6) if fold_a else 0)
    assert fold_a or "a" not in folds
    assert all(p.grad is None for p in folded.parameters() if not p.requires_grad)


def test_every_projection_can_be_folded_and_a_frozen_weight_gets_no_gradient(folds):
    plain = _model()
    folded = copy.deepcopy(plain)
    assert len(fused_lora.apply(folded, min_widening=0.0)) == 2 * len(TARGETS)
    _assert_close(_grads(folded), _grads(plain), 1e-5)
    assert len(folds) == 2 * 2 * len(TARGETS)  # 2 passes, every projection of 2 layers
    assert all(p.grad is None for p in folded.parameters() if not p.requires_grad)


def _mixed(**lora: object):
    """What the compiled path trains: bf16 base weights, fp32 adapters."""
    model = _model(dtype=torch.bfloat16, **lora)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
    return model


def _as_compiled():
    """(PEFT's model, a copy folded) as lora_runtime.compiled runs them: PEFT's cast of the LoRA input to the fp32
    adapter turned off (bf16 autocast casts)."""
    plain = _mixed()
    for module in plain.modules():
        if hasattr(module, "lora_A"):
            module.cast_input_dtype_enabled = False
    folded = copy.deepcopy(plain)
    fused_lora.apply(folded)
    return plain, folded


@pytest.mark.parametrize("fold_a", [False, True])
def test_folded_lora_under_bf16_autocast_stays_within_bf16_of_peft(fold_a, folds):
    """As lora_runtime.compiled runs it: bf16 autocast with PEFT's cast of the LoRA input to fp32 turned off."""
    plain, _ = _as_compiled()
    folded = copy.deepcopy(plain)
    fused_lora.apply(folded, fold_a=fold_a)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = _grads(folded, steps=1), _grads(plain, steps=1)
    assert abs(got[0]["loss"].item() - want[0]["loss"].item()) < 0.02
    assert all(g.dtype == torch.float32 for n, g in got[0].items() if "lora_" in n)
    _assert_close(got, want, 0.05)
    assert folds.count("b") == 4 and folds.count("a") == (6 if fold_a else 0)


def test_without_autocast_the_lora_input_is_cast_as_peft_casts_it():
    """PEFT's default: no autocast, the bf16 input cast to the fp32 adapter for the LoRA branch."""
    plain = _mixed()
    folded = copy.deepcopy(plain)
    fused_lora.apply(folded)
    got, want = _grads(folded, steps=1), _grads(plain, steps=1)
    assert got[0]["loss"].dtype == want[0]["loss"].dtype
    _assert_close(got, want, 0.05)


def _saved_bytes(model) -> int:
    """Bytes the decoder layers, compiled by Inductor as the compiled path compiles them, keep for backward (the
    storages their saved tensors hold, each counted once, but for the parameters' own, which cost nothing more).
    Inductor's own graph passes are what could share one joined weight between the forward and backward graphs:
    AOTAutograd's partitioner alone does not show it."""
    torch._dynamo.reset()
    for layer in model.base_model.model.model.layers:
        layer.compile(fullgraph=True)
    saved: dict = {}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(2))
    def keep(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    hooks = torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t)
    with torch.autocast("cpu", dtype=torch.bfloat16), hooks:
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return sum(saved.values())


@pytest.mark.parametrize("fold_a", [False, True])
def test_compiled_layers_keep_no_more_for_backward_than_under_pefts_forward(fold_a):
    """No joined [W, B] or [W, s A] (nor anything else) outlives the forward: the memory plan's per-token counts
    stay true."""
    plain, _ = _as_compiled()
    folded = copy.deepcopy(plain)
    assert any(folded.get_submodule(n).lora_fold == "a" for n in fused_lora.apply(folded, fold_a=fold_a)) == fold_a
    assert _saved_bytes(folded) <= _saved_bytes(plain)


def test_dropout_a_lora_bias_and_other_adapters_run_pefts_own_forward(folds):
    """LoRA dropout (applied to LoRA's input alone) leaves a module unfolded; a LoRA bias keeps PEFT's forward at
    the call; disabled adapters give the base model's output, merged ones the merged model's."""
    x = torch.randn(3, 64)
    assert fused_lora.apply(_model(lora_dropout=0.5)) == []
    with pytest.warns(Warning, match="lora_bias=True"):  # PEFT's: a base layer without a bias cannot merge it
        model = _model(lora_bias=True)
    assert fused_lora.apply(model)  # qualifies by shape ...
    model.train()
    gate = model.base_model.model.model.layers[0].mlp.gate_proj
    torch.testing.assert_close(gate(x), type(gate).forward(gate, x))  # ... and still runs PEFT's forward
    assert folds == []

    model = _model()
    fused_lora.apply(model)
    gate = model.base_model.model.model.layers[0].mlp.gate_proj
    with model.disable_adapter():
        torch.testing.assert_close(gate(x), gate.base_layer(x))
    assert folds == []
    before = gate(x)
    assert len(folds) == 1
    gate.merge()
    torch.testing.assert_close(gate(x), before, atol=1e-5, rtol=1e-5)
    assert len(folds) == 1


def test_only_plain_lora_linears_over_plain_unhooked_linears_qualify():
    """The folded forward reads the base weight and skips the base layer's forward: a subclass of either (quantized
    or wrapped layers), a hooked base layer, or another tuner's layer keeps PEFT's forward."""
    from peft import AdaLoraConfig
    from peft.tuners.lora.layer import Linear

    config = LlamaConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128)
    adalora = get_peft_model(LlamaForCausalLM(config), AdaLoraConfig(r=8, target_modules=TARGETS, total_step=10))
    assert fused_lora.apply(adalora) == []

    class Wrapped(torch.nn.Linear):
        pass

    class OtherLora(Linear):
        pass

    model = _model()
    mlp = model.base_model.model.model.layers[0].mlp
    assert fused_lora.qualifies(mlp.gate_proj) and fused_lora.qualifies(mlp.up_proj)
    mlp.gate_proj.base_layer.__class__ = Wrapped
    mlp.up_proj.__class__ = OtherLora
    handle = model.base_model.model.model.layers[1].mlp.gate_proj.base_layer.register_forward_hook(lambda *a: None)
    assert [n.split("layers.")[1] for n in fused_lora.apply(model)] == ["1.mlp.up_proj"]
    handle.remove()
