"""kernels="auto" | "liger" | "none": which runs where, and why (the log line); refusals at validation. The kernels'
numbers against the plain path: test_kernels_gpu.py (CUDA + liger-kernel)."""

from __future__ import annotations

import pytest
from lora_runtime import ConfigError, LoraSftConfig
from lora_runtime import kernels as k


def cfg(**kw) -> LoraSftConfig:
    return LoraSftConfig("m", "d", "o", **kw)


@pytest.fixture
def liger_here(monkeypatch):
    monkeypatch.setattr(k, "liger_installed", lambda: True)
    monkeypatch.setattr(k, "_apply_fns", lambda: {"llama": None, "qwen2": None})


def test_auto_takes_liger_on_cuda_with_peft(liger_here):
    assert k.choose(cfg(), "peft", "qwen2", cuda=True) == (True, "kernels='auto' → liger-kernel")


@pytest.mark.parametrize(("kw", "backend", "model_type", "cuda", "why"), [
    ({}, "unsloth", "qwen2", True, "the unsloth backend runs its own fused kernels"),
    ({}, "peft", "qwen2", False, "liger's Triton kernels need CUDA"),
    ({}, "peft", "gpt_neox", True, "liger has no kernels for model type 'gpt_neox'"),
    ({"sharding": "fsdp"}, "peft", "qwen2", True, "liger is not measured under FSDP2"),
    ({"enable_model_splitting": True}, "peft", "qwen2", True, "not measured across split devices"),
])
def test_auto_falls_back_to_the_plain_path_and_says_why(liger_here, kw, backend, model_type, cuda, why):
    use, reason = k.choose(cfg(**kw), backend, model_type, cuda)
    assert not use and reason.startswith("kernels='auto' → plain path: ") and why in reason


def test_auto_without_the_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(k, "liger_installed", lambda: False)
    use, reason = k.choose(cfg(), "peft", "qwen2", cuda=True)
    assert not use and "pip install liger-kernel" in reason


def test_none_is_the_plain_path_everywhere(liger_here):
    assert k.choose(cfg(kernels="none"), "peft", "qwen2", cuda=True)[0] is False


def test_an_explicit_liger_that_cannot_run_raises_with_every_reason(liger_here):
    with pytest.raises(RuntimeError, match=r"runs its own fused kernels.*no kernels for model type 'gpt_neox'"):
        k.choose(cfg(kernels="liger"), "unsloth", "gpt_neox", cuda=True)


def test_a_liger_that_does_not_import_is_the_plain_path_with_the_reason(monkeypatch):
    monkeypatch.setattr(k, "liger_installed", lambda: True)

    def broken():
        raise ImportError("cannot import name 'x' from 'triton'")

    monkeypatch.setattr(k, "_apply_fns", broken)
    use, reason = k.choose(cfg(), "peft", "qwen2", cuda=True)
    assert not use and "liger-kernel does not import (cannot import name 'x' from 'triton')" in reason


@pytest.mark.parametrize(("targets", "fused"), [
    (None, True), (("q_proj", "v_proj"), True), ("all-linear", True), (("q_proj", "lm_head"), False),
    (r".*(q_proj|lm_head)", False), ("lm_.*", False), (r".*_head", False), (r".*\.(q|v)_proj", True),
])
def test_the_fused_loss_is_left_out_when_lm_head_carries_lora(targets, fused):
    assert k.targets_lm_head(targets) is not fused


def test_validation_refuses_liger_where_it_cannot_run(monkeypatch):
    """All at once, before any data or model: no CUDA, no package, and the unsloth backend."""
    import importlib.util

    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "liger_kernel" else real(name, *a))
    with pytest.raises(ConfigError) as e:
        cfg(kernels="liger", backend="unsloth").validate()
    text = "\n".join(e.value.issues)
    assert "`kernels`='liger' needs CUDA (liger-kernel's Triton kernels)" in text
    assert "needs the liger-kernel package" in text and "applies to the peft backend" in text


def test_a_cpu_run_logs_which_kernels_ran(tiny_llama_dir, tmp_path, capsys):
    from lora_runtime.backends.peft import PeftBackend
    from lora_runtime.batching import fixed_plan

    config = LoraSftConfig(str(tiny_llama_dir), "d", str(tmp_path), backend="peft", micro_batch_size=2)
    PeftBackend().load(config, fixed_plan(config, 1))
    assert "kernels: kernels='auto' → plain path: liger's Triton kernels need CUDA" in capsys.readouterr().out


def test_with_the_fused_loss_the_peft_plan_fits_the_budget_instead_of_always_recomputing(liger_here, monkeypatch,
                                                                                        tiny_qwen2_dir):
    """liger's fused loss keeps no logits: the peft backend's footprint drops them, and gradient_checkpointing="auto"
    is planned from the memory budget (measured on an H200: 35.9k tok/s without recomputation, 26.9k with)."""
    import torch
    from lora_runtime.backends.peft import PeftBackend
    from lora_runtime.batching import GIB, resolve

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr("lora_runtime.batching.memory_budget", lambda config, lowered=True: (139 * GIB, "free"))
    backend = PeftBackend()
    fused = LoraSftConfig(str(tiny_qwen2_dir), "d", "o", backend="peft")
    plain = LoraSftConfig(str(tiny_qwen2_dir), "d", "o", backend="peft", kernels="none")
    assert backend.checkpointing_by_memory(fused) and not backend.checkpointing_by_memory(plain)
    assert not backend.checkpointing_by_memory(LoraSftConfig(str(tiny_qwen2_dir), "d", "o", target_modules=("lm_head",)))
    from transformers import AutoConfig

    model_config = AutoConfig.from_pretrained(tiny_qwen2_dir)
    assert backend.footprint(model_config, fused).per_token_base == 0 < backend.footprint(model_config, plain).per_token_base
    assert resolve(fused, backend, rows=900).gradient_checkpointing is False  # a tiny model fits: no recomputation
    assert resolve(plain, backend, rows=900).gradient_checkpointing is True


def test_evaluation_asks_the_fused_loss_to_skip_the_logits(tiny_llama_dir, llama_shards, tmp_path):
    """liger's fused loss builds the full logits in eval mode unless told; the memory plan left them out, so the
    trainer's evaluation passes skip_logits=True to a model carrying the fused loss (and nothing to any other)."""
    from lora_runtime import lora_sft
    from transformers import TrainerCallback

    seen: list = []

    class Fused(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            base = model.get_base_model()
            setattr(base, k.FUSED_FLAG, True)
            forward = base.forward

            def recording(*a, skip_logits=None, **kwargs):
                seen.append((base.training, skip_logits))
                return forward(*a, **kwargs)

            base.forward = recording

    lora_sft(str(tiny_llama_dir), str(llama_shards), str(tmp_path / "run"), backend="peft", max_steps=2,
             micro_batch_size=2, eval_data_path=str(llama_shards), eval_steps=2, save_steps=100, callbacks=[Fused()])
    assert (True, None) in seen and (False, True) in seen and (False, None) not in seen
