"""The batch plan (lora_runtime.batching): micro_batch_size="auto" and gradient_checkpointing="auto" sized from the
memory budget (free memory or max_memory_gib), recomputing only as many layers as needed; 2 rows on a CPU; the
optimizer math kept when effective_batch_size is set; the checkpoint's choice reused on resume (the CLI side:
tests/lora_cli/test_micro_auto.py)."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch
from lora_runtime import ConfigError, LoraSftConfig
from lora_runtime.backends.peft import PeftBackend
from lora_runtime.batching import (
    CONTEXT_BYTES,
    FRAGMENTATION,
    GIB,
    BatchPlan,
    Footprint,
    checkpointed_micro,
    peft_footprint,
    per_gpu,
    plan_batch,
    resolve,
    step_cost,
    unsloth_footprint,
)

QWEN15 = SimpleNamespace(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True)
LLAMA8 = SimpleNamespace(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)


def plan(fp, free_gib, *, seq_len=2048, micro="auto", gc="auto", quota=None, rows=900):
    return plan_batch(fp, seq_len=seq_len, budget=free_gib * GIB, micro=micro, gc=gc, quota=quota, rows_per_rank=rows)


@pytest.mark.parametrize(("model", "seq_len", "free_gib", "expect"), [
    (QWEN15, 2048, 139, (8, 0)),  # an H200: 16k tokens a pass without recomputation (measured 50.9k tok/s)
    (QWEN15, 2048, 40, (8, 0)),
    (QWEN15, 2048, 24, (7, 8)),  # a 24 GB card: 14k tokens a pass (the host's time, about), 8 of 28 recomputed
    (QWEN15, 2048, 16, (7, 17)),  # 16 GiB: 17 layers
    (QWEN15, 2048, 8, (16, 28)),  # 8 GiB: every layer, and a pass large enough to outrun the host's time
    (QWEN15, 2048, 6, (9, 28)),  # 6 GiB: every layer
    (LLAMA8, 8192, 139, (2, 0)),  # 8B at 8k context: 2 rows = 16k tokens fit an H200 without recomputation
    (LLAMA8, 8192, 40, (1, 13)),  # an 8B layer is 4.7× the GPU work of a 1.5B one: one 8k row keeps the GPU busy
    (LLAMA8, 2048, 24, (2, 22)),  # 15 GiB of 8B weights on a 24 GB card
])
def test_unsloth_auto_takes_the_fastest_plan_that_fits(model, seq_len, free_gib, expect):
    choice = plan(unsloth_footprint(model, False), free_gib, seq_len=seq_len)
    assert (choice.micro, choice.recomputed) == expect, choice.reason
    assert f"micro_batch_size auto → {choice.micro}" in choice.reason and f"of {free_gib:.1f} GiB" in choice.reason
    fp = unsloth_footprint(model, False)
    assert fp.need(choice.micro * seq_len, choice.recomputed) <= free_gib * GIB


def test_more_memory_never_plans_a_slower_step():
    """Every budget's plan is estimated no slower than a smaller budget's (the rows may shrink where fewer layers
    recompute: 16 rows at 8 GiB, 7 at 14)."""
    fp = unsloth_footprint(QWEN15, False)
    plans = [plan(fp, gib) for gib in range(8, 60, 2)]
    speeds = [c.micro * 2048 / step_cost(c.micro * 2048, c.recomputed, 28, fp.host_pass_tokens) for c in plans]
    assert speeds == sorted(speeds)
    assert [c.recomputed for c in plans][-1] == 0 and plans[0].recomputed == 28


def test_4bit_weights_leave_room_for_more():
    fp16, fp4 = unsloth_footprint(LLAMA8, False), unsloth_footprint(LLAMA8, True)
    bf16, four = plan(fp16, 20), plan(fp4, 20)

    def speed(fp, c):
        return c.micro * 2048 / step_cost(c.micro * 2048, c.recomputed, fp.layers, fp.host_pass_tokens)

    assert four.recomputed < bf16.recomputed and speed(fp4, four) > speed(fp16, bf16), (bf16, four)


def test_nothing_fits_falls_back_to_one_row_recomputed_and_says_so():
    choice = plan(unsloth_footprint(LLAMA8, False), 10)
    assert (choice.micro, choice.recomputed) == (1, 32) and choice.reason.endswith("(does not fit: may OOM)")


def test_effective_batch_size_gets_a_divisor_so_the_optimizer_step_is_unchanged():
    fp = Footprint(weights=3 * GIB, layers=28, per_token_layer=7e4, per_token_recomputed=0, per_token_working=1e5)
    assert plan(fp, 139, quota=12)[:2] == (6, 0)  # 12 rows per step per GPU → 6 a pass × accumulation 2


def test_footprint_counts_kept_and_recomputed_layers():
    fp = Footprint(weights=0, layers=4, per_token_layer=10, per_token_recomputed=1, per_token_working=20,
                   per_token_base=100)
    assert [fp.per_token(k) for k in range(5)] == [140, 151, 142, 133, 124]
    assert fp.peak(1000, True) == fp.peak(1000, 4) and fp.peak(1000, False) == fp.peak(1000, 0)
    assert plan(fp, 139, quota=7)[:2] == (7, False)
    assert plan(fp, 139, quota=5, seq_len=8192)[:2] == (1, False)  # cap 4 rows of 8k; 5 has no divisor 2 to 4


def test_without_effective_batch_size_an_epoch_keeps_16_steps():
    fp = Footprint(weights=0, layers=2, per_token_layer=1, per_token_recomputed=1, per_token_working=1)
    assert plan(fp, 139, rows=64)[0] == 4  # 64 rows / 16 steps
    assert plan(fp, 139, rows=10)[0] == 2  # never below training-hub's 2 for that reason
    assert plan(fp, 139, rows=10**6, seq_len=512)[0] == 32  # 16k tokens of short rows


def test_explicit_values_are_obeyed():
    fp = unsloth_footprint(QWEN15, False)
    assert plan(fp, 139, micro=2, gc=True)[:2] == (2, 28)
    asked = plan(fp, 10, micro=16, gc=False)
    assert asked[:2] == (16, 0) and asked.reason.endswith("(does not fit: may OOM)")  # kept, with the warning
    assert plan(fp, 139, micro=16)[:2] == (16, 0)


def test_peft_footprint_matches_its_h200_measurement():
    # backend="peft", micro 8 × 2048, checkpointing on: 32.4 GiB peak on the H200 (benchmarks/RESULTS.md)
    peak = peft_footprint(QWEN15, False).peak(8 * 2048, True) / GIB
    assert 32.4 * 0.85 <= peak <= 32.4 * 1.15, peak


@pytest.mark.parametrize(("gc", "measured_gib"), [(True, 6.9), (False, 44.8)])
def test_peft_footprint_with_the_fused_loss_matches_its_h200_measurement(gc, measured_gib):
    # backend="peft", kernels="liger", micro 8 × 2048 (benchmarks/RESULTS.md, kernels)
    peak = peft_footprint(QWEN15, False, fused_loss=True).peak(8 * 2048, gc) / GIB
    assert measured_gib * 0.85 <= peak <= measured_gib * 1.15, peak


def test_resolve_on_cpu_is_training_hubs_two(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = resolve(LoraSftConfig("m", "d", str(tmp_path / "o")), PeftBackend(), rows=100)
    assert isinstance(out, BatchPlan) and (out.micro, out.accumulation, out.gradient_checkpointing) == (2, 1, False)
    assert "micro_batch_size: auto → 2 (training-hub's default" in capsys.readouterr().out


def test_resolve_keeps_an_explicit_micro_batch(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve(LoraSftConfig("m", "d", str(tmp_path), micro_batch_size=5), PeftBackend(), 100).micro == 5


def test_resume_reuses_the_micro_batch_the_checkpoint_recorded(tmp_path, capsys, monkeypatch):
    from lora_runtime import checkpoint

    root = checkpoint.checkpoints_dir(tmp_path)
    tmp = checkpoint.staging_dir(root, 3)
    (tmp / "lora_sft_config.json").write_text(json.dumps({"micro_batch_size": "auto",
                                                          "resolved": {"micro_batch_size": 8}}))
    checkpoint.commit(tmp, 3)
    cfg = LoraSftConfig("m", "d", str(tmp_path))
    assert checkpointed_micro(cfg) == 8
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # even where auto would say 2
    assert resolve(cfg, PeftBackend(), rows=100).micro == 8
    assert "auto → 8, as recorded by the checkpoint" in capsys.readouterr().out
    assert checkpointed_micro(LoraSftConfig("m", "d", str(tmp_path / "fresh"))) is None


@pytest.mark.parametrize(("kw", "world", "needle"), [
    ({"micro_batch_size": "eight"}, 1, "`micro_batch_size` must be > 0 or 'auto', got 'eight'"),
    ({"micro_batch_size": 0}, 1, "`micro_batch_size` must be > 0 or 'auto', got 0"),
    ({"effective_batch_size": 9}, 2, "effective_batch_size=9 is not divisible by world_size=2"),
    ({"effective_batch_size": 8, "gradient_accumulation_steps": 2}, 1, "drop gradient_accumulation_steps=2"),
])
def test_auto_validation(kw, world, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        LoraSftConfig("m", "d", "o", **kw).validate(world_size=world)


def test_a_fixed_plan_refuses_an_unresolved_auto():
    from lora_runtime.batching import fixed_plan

    with pytest.raises(ValueError, match="decided when training starts"):
        fixed_plan(LoraSftConfig("m", "d", "o"), 1)


def test_effective_batch_size_is_honoured_on_a_cpu(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = resolve(LoraSftConfig("m", "d", str(tmp_path), effective_batch_size=9), PeftBackend(), rows=100)
    assert (out.micro, out.accumulation, out.effective) == (1, 9, 9)  # 2 does not divide 9: training-hub's 2 → its largest divisor


def test_with_effective_batch_size_resume_replans_instead_of_pinning(tmp_path, monkeypatch):
    from lora_runtime import checkpoint

    tmp = checkpoint.staging_dir(checkpoint.checkpoints_dir(tmp_path), 3)
    (tmp / "lora_sft_config.json").write_text(json.dumps({"micro_batch_size": 8}))
    checkpoint.commit(tmp, 3)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = LoraSftConfig("m", "d", str(tmp_path), effective_batch_size=16)
    out = resolve(cfg, PeftBackend(), rows=100)
    assert (out.micro, out.accumulation, out.effective) == (2, 8, 16)  # same rows per step as 8 × 2


def _fake_gpu(monkeypatch, free_gib):
    import lora_runtime.batching as batching

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(batching, "memory_budget", lambda config, lowered=True: (
        free_gib * GIB if config.max_memory_gib is None else min(free_gib, config.max_memory_gib) * GIB, "free"))


def _recorded_caps(monkeypatch, devices: bool = False) -> list:
    """The allocator caps `resolve` sets on an 80 GiB card, as fractions (with `devices`: (device, fraction))."""
    caps: list = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (70 * GIB, 80 * GIB))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction",
                        lambda f, device=None: caps.append((device, f) if devices else f))
    return caps


def test_resolve_on_a_gpu_plans_micro_and_checkpointing_for_unsloth(monkeypatch, capsys, tmp_path):
    from lora_runtime.backends.unsloth import UnslothBackend
    from transformers import Qwen2Config

    Qwen2Config(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True).save_pretrained(tmp_path / "m")
    _fake_gpu(monkeypatch, 139)
    out = resolve(LoraSftConfig(str(tmp_path / "m"), "d", str(tmp_path / "o")), UnslothBackend(), rows=900)
    assert (out.micro, out.gradient_checkpointing, out.recomputed_layers) == (8, False, None)
    assert "memory plan (free): micro_batch_size auto → 8" in capsys.readouterr().out
    _fake_gpu(monkeypatch, 16)
    out = resolve(LoraSftConfig(str(tmp_path / "m"), "d", str(tmp_path / "o")), UnslothBackend(), rows=900)
    assert (out.micro, out.gradient_checkpointing, out.recomputed_layers) == (7, True, 17)
    assert out.to_dict()["recomputed_layers"] == 17 and 0 < out.to_dict()["estimated_peak_gib"] < 16
    _fake_gpu(monkeypatch, 6)
    out = resolve(LoraSftConfig(str(tmp_path / "m"), "d", str(tmp_path / "o")), UnslothBackend(), rows=900)
    assert (out.micro, out.gradient_checkpointing, out.recomputed_layers) == (9, True, None)  # None: every layer


def test_a_config_it_cannot_size_falls_back_to_two_and_says_why(monkeypatch, capsys, tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=2, n_embd=64, n_head=2).save_pretrained(tmp_path / "gpt2")  # no intermediate_size
    _fake_gpu(monkeypatch, 139)
    out = resolve(LoraSftConfig(str(tmp_path / "gpt2"), "d", str(tmp_path / "o")), PeftBackend(), rows=900)
    assert out.micro == 2 and "cannot size GPT2Config" in capsys.readouterr().out


@pytest.mark.parametrize("backend,options", [("unsloth", {}), ("unsloth", {"micro_batch_size": 4}),
                                             ("peft", {"activation_offload": True, "kernels": "none"})])
def test_a_memory_planned_backend_that_cannot_size_the_model_recomputes_every_layer(monkeypatch, capsys, tmp_path,
                                                                                   backend, options):
    """gradient_checkpointing="auto" without the estimate it plans by: every layer on a GPU, as on the backends
    that never plan by memory (offload asked for must not end with less saved than the default), and the log says
    why, whether or not micro_batch_size is auto."""
    from lora_runtime.backends.unsloth import UnslothBackend
    from transformers import GPT2Config

    GPT2Config(n_layer=2, n_embd=64, n_head=2).save_pretrained(tmp_path / "gpt2")
    _fake_gpu(monkeypatch, 80)
    impl = UnslothBackend() if backend == "unsloth" else PeftBackend()
    out = resolve(LoraSftConfig(str(tmp_path / "gpt2"), "d", str(tmp_path / "o"), **options), impl, rows=900)
    assert (out.gradient_checkpointing, out.recomputed_layers, out.offloaded_layers) == (True, None, 0)
    assert "gradient checkpointing: auto → on for every layer (cannot size GPT2Config" in capsys.readouterr().out


def test_a_budget_below_the_weights_is_refused_before_loading(monkeypatch, tmp_path):
    """Refused before the process is capped or the model loaded; not where the free memory, not the budget, is short
    (raising max_memory_gib would not help), nor with 8-bit weights (the estimate counts them as bf16)."""
    from lora_runtime.backends.unsloth import UnslothBackend
    from transformers import Qwen2Config

    Qwen2Config(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True).save_pretrained(tmp_path / "m")
    _fake_gpu(monkeypatch, 70)
    fractions = _recorded_caps(monkeypatch)
    config = LoraSftConfig(str(tmp_path / "m"), "d", str(tmp_path / "o"), max_memory_gib=2)
    with pytest.raises(ConfigError, match=r"max_memory_gib=2 is below what the model holds on a GPU before any "
                                          r"activation: 3.4 GiB .*; raise it, or pass load_in_4bit=True"):
        resolve(config, UnslothBackend(), rows=900)
    assert fractions == []
    assert resolve(dataclasses.replace(config, max_memory_gib=4), UnslothBackend(), rows=900).gradient_checkpointing
    assert fractions == [4 / 80]
    _fake_gpu(monkeypatch, 3)  # another process holds the GPU: the plan goes ahead, saying it may not fit
    assert resolve(dataclasses.replace(config, max_memory_gib=40), UnslothBackend(), rows=900).micro == 1
    _fake_gpu(monkeypatch, 70)
    monkeypatch.setattr("lora_runtime.preflight.cuda_available", lambda: True)
    resolve(dataclasses.replace(config, load_in_8bit=True), UnslothBackend(), rows=900)  # not refused


def test_a_run_lifts_its_cap_when_it_ends_also_by_an_error(monkeypatch, tmp_path):
    """After lora_sft(max_memory_gib=...) returns or raises, the process's other GPU work is not held to the cap."""
    from lora_runtime import api, batching

    caps = _recorded_caps(monkeypatch)

    def capped_then_fails(config, env):
        batching.cap_process(config, 8 * GIB)
        raise RuntimeError("a step failed")

    monkeypatch.setattr(api, "_run_locked", capped_then_fails)
    with pytest.raises(RuntimeError, match="a step failed"):
        api.run(LoraSftConfig(str(tmp_path / "m"), str(tmp_path / "d.jsonl"), str(tmp_path / "o"), max_memory_gib=8))
    assert caps == [8 / 80, 1.0] and not batching._CAPPED


def test_a_cap_set_by_one_run_is_lifted_for_the_next_in_the_same_process(monkeypatch, tmp_path):
    """A notebook or a sweep: lora_sft(max_memory_gib=16), then lora_sft() must not stay held to 16 GiB (the
    allocator keeps its fraction for the life of the process); a cap the user's code set is not ours to lift."""
    from transformers import Qwen2Config

    Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, vocab_size=1000).save_pretrained(tmp_path / "m")
    _fake_gpu(monkeypatch, 70)
    fractions = _recorded_caps(monkeypatch)
    model, out = str(tmp_path / "m"), str(tmp_path / "o")
    resolve(LoraSftConfig(model, "d", out, max_memory_gib=16), PeftBackend(), rows=100)
    resolve(LoraSftConfig(model, "d", out), PeftBackend(), rows=100)
    resolve(LoraSftConfig(model, "d", out, micro_batch_size=2), PeftBackend(), rows=100)
    assert fractions == [16 / 80, 1.0]  # capped, lifted once, then nothing of ours left to lift


@pytest.mark.parametrize("ebs", [2, 6])
def test_a_batch_the_torchrun_processes_cannot_share_is_refused_by_name(monkeypatch, tmp_path, ebs):
    """A user's own script under torchrun need not say nproc_per_node: the batch is checked against WORLD_SIZE,
    before anything is prepared or loaded (lora_sft), and again where the plan is made."""
    from lora_runtime import api

    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    config = LoraSftConfig(str(tmp_path / "m"), str(tmp_path / "d.jsonl"), str(tmp_path / "o"), effective_batch_size=ebs)
    with pytest.raises(ConfigError, match=f"effective_batch_size={ebs} is not divisible by world_size=4"):
        api.run(config)
    assert not (tmp_path / "o").exists()
    with pytest.raises(ConfigError, match=f"effective_batch_size={ebs} is not divisible by the 4 processes"):
        resolve(config, PeftBackend(), rows=100)


@pytest.mark.parametrize("sized", [True, False])
def test_max_memory_gib_caps_the_process_whether_or_not_the_model_can_be_sized(monkeypatch, tmp_path, sized):
    from transformers import GPT2Config, Qwen2Config

    (Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, vocab_size=1000) if sized else GPT2Config(n_layer=2, n_embd=64, n_head=2)
     ).save_pretrained(tmp_path / "m")
    _fake_gpu(monkeypatch, 70)
    fractions = _recorded_caps(monkeypatch)
    resolve(LoraSftConfig(str(tmp_path / "m"), "d", str(tmp_path / "o"), max_memory_gib=16), PeftBackend(), rows=100)
    assert fractions == [16 / 80]


def test_under_model_splitting_max_memory_gib_caps_every_gpu_the_model_spans(monkeypatch, tmp_path):
    from transformers import Qwen2Config

    Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, vocab_size=1000).save_pretrained(tmp_path / "m")
    _fake_gpu(monkeypatch, 70)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    caps = _recorded_caps(monkeypatch, devices=True)
    split = LoraSftConfig(str(tmp_path / "m"), "d", str(tmp_path / "o"), max_memory_gib=16, enable_model_splitting=True)
    resolve(split, PeftBackend(), rows=100)
    resolve(dataclasses.replace(split, max_memory_gib=None), PeftBackend(), rows=100)
    assert caps == [(0, 16 / 80), (1, 16 / 80), (0, 1.0), (1, 1.0)]


def test_under_model_splitting_auto_recomputes_every_layer_or_none(monkeypatch, tmp_path):
    """A count of layers would checkpoint the first ones, all on the first GPU, while the plan counted a GPU's share."""
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256).save_pretrained(tmp_path / "m")
    fp = peft_footprint(LLAMA8, False, fused_loss=True)
    split = LoraSftConfig(str(tmp_path / "m"), "d", str(tmp_path / "o"), enable_model_splitting=True)
    share = plan(per_gpu(fp, split, LLAMA8, world=4), 12, seq_len=8192)
    assert 0 < share.recomputed < 8  # what a GPU's share alone would take

    class Backend:  # plans by memory, as the peft backend does with kernels="liger"
        checkpointing_by_memory = staticmethod(lambda config: True)
        footprint = staticmethod(lambda model_config, config: fp)

    _fake_gpu(monkeypatch, 12)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    out = resolve(split, Backend(), rows=900)
    assert out.gradient_checkpointing and out.recomputed_layers is None  # every layer, on every GPU
    assert out.estimated_peak_bytes * FRAGMENTATION + CONTEXT_BYTES <= 12 * GIB


def test_an_epoch_keeps_16_optimizer_steps_with_gradient_accumulation():
    fp = Footprint(weights=0, layers=2, per_token_layer=1, per_token_recomputed=1, per_token_working=1)
    c = plan_batch(fp, seq_len=2048, budget=139 * GIB, micro="auto", gc="auto", quota=None, rows_per_rank=256,
                   accumulation=4)
    assert c.micro == 4 and "≥ 16 steps an epoch of 256 rows at accumulation 4" in c.reason  # 4 × 4 × 16 = 256


@pytest.mark.parametrize(("gc", "recomputed", "offload", "ends"), [
    (False, None, "auto", "; or gradient_checkpointing=True."),
    (True, 5, "auto", "; or gradient_checkpointing=True."),
    (True, None, "auto", "(QLoRA) to quarter the base weights' memory."),  # every layer recomputes already
    (False, None, True, "; or activation_offload=False with gradient_checkpointing=True."),
])
def test_the_oom_hint_names_only_what_is_not_on_already(gc, recomputed, offload, ends):
    from lora_runtime.trainer import oom_hint

    config = LoraSftConfig("m", "d", "o", activation_offload=offload)
    message = oom_hint(config, BatchPlan(4, 1, 1, gc, recomputed), 3, RuntimeError("CUDA out of memory"))
    assert message.startswith("out of memory in training step 3 (CUDA out of memory).") and message.endswith(ends)


def test_explicit_values_on_a_gpu_skip_the_plan(monkeypatch, tmp_path):
    _fake_gpu(monkeypatch, 139)  # micro given: no plan, whatever the model (none exists here)
    out = resolve(LoraSftConfig("no-such-model", "d", str(tmp_path), micro_batch_size=4), PeftBackend(), rows=9)
    assert out.micro == 4


@pytest.mark.slow
def test_a_real_resume_with_auto_takes_the_interrupted_runs_micro_batch(tiny_llama_dir, llama_shards, tmp_path, capsys):
    import _runs
    from lora_runtime import lora_sft

    run = {**_runs.RUN, "max_steps": 4, "save_steps": 100, "gradient_accumulation_steps": 1}
    out = tmp_path / "run"
    first = lora_sft(str(tiny_llama_dir), str(llama_shards), str(out), **{**run, "micro_batch_size": 3},
                     callbacks=[_runs.StopAt(2)])
    assert first.steps == 2 and (out / "checkpoints" / "checkpoint-2" / "COMPLETE").is_file()
    capsys.readouterr()
    resumed = lora_sft(str(tiny_llama_dir), str(llama_shards), str(out), **{**run, "micro_batch_size": "auto"})
    log = capsys.readouterr().out
    assert "micro_batch_size: auto → 3, as recorded by the checkpoint" in log and "resuming from" in log
    assert resumed.steps == 4
    saved = json.loads((out / "lora_sft_config.json").read_text())
    assert saved["micro_batch_size"] == "auto" and saved["resolved"]["micro_batch_size"] == 3


def test_moe_weights_count_every_expert():
    from lora_runtime.batching import weight_bytes

    mixtral = SimpleNamespace(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                              num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False, num_local_experts=8)
    assert 85 < weight_bytes(mixtral, False) / GIB < 89  # Mixtral-8x7B: 46.7 B parameters in bf16
    assert weight_bytes(LLAMA8, False) / GIB == pytest.approx(15.0, abs=0.1)


def _offloading(fp: Footprint, model, bandwidth: float, host_gib: float = 100) -> Footprint:
    import dataclasses

    from lora_runtime.batching import offload_speed

    return dataclasses.replace(fp, offload_bandwidth=bandwidth, gpu_tokens_per_s=offload_speed(model),
                               host_budget=host_gib * GIB)


def test_offload_counts_the_layers_in_flight_and_the_links_time():
    from lora_runtime.batching import compiled_footprint
    from lora_runtime.offload import IN_FLIGHT

    fp = _offloading(compiled_footprint(QWEN15), QWEN15, 50e9)
    layer = fp.per_token_layer
    assert fp.per_token(0, 10) == pytest.approx(fp.per_token(0) - (10 - IN_FLIGHT) * layer)
    assert fp.per_token(0, 1) == fp.per_token(0)  # one layer in flight saves nothing
    assert fp.host_bytes(16384, 10) == 10 * layer * 16384 * 2  # torch rounds pinned buffers to a power of two
    # 50 GB/s: 3 layers' copies (3.7 GB, 74 ms) hide under the forward (40% of ~270 ms), 6 (147 ms) do not;
    # 5 GB/s makes the GPU wait for 3 layers
    assert fp.step_cost(16384, 0, 3) == pytest.approx(fp.step_cost(16384, 0, 0), rel=0.01)
    assert fp.step_cost(16384, 0, 6) > 1.1 * fp.step_cost(16384, 0, 0)
    slow = _offloading(compiled_footprint(QWEN15), QWEN15, 5e9)
    assert slow.step_cost(16384, 0, 3) > 1.5 * fp.step_cost(16384, 0, 3)


def test_offload_takes_layers_off_the_gpu_where_the_link_keeps_pace():
    """The plan offloads where the link hides the copies and recomputes (or shrinks the pass) where it cannot; never
    past the budget, nor past the pinned host memory it may take."""
    from lora_runtime.batching import compiled_footprint

    base = compiled_footprint(QWEN15, level="pointwise")
    fast, slow = _offloading(base, QWEN15, 50e9), _offloading(base, QWEN15, 2e9)
    without = plan(base, 16)
    with_fast, with_slow = plan(fast, 16), plan(slow, 16)
    assert without.offloaded == 0 and with_slow.offloaded == 0
    assert with_fast.offloaded > 0
    assert fast.need(with_fast.micro * 2048, with_fast.recomputed, with_fast.offloaded) <= 16 * GIB

    def speed(fp, c):
        return c.micro * 2048 / fp.step_cost(c.micro * 2048, c.recomputed, c.offloaded)

    assert speed(fast, with_fast) > 1.05 * speed(base, without)
    assert f"activation offload → {with_fast.offloaded} of 28 layers (" in with_fast.reason
    assert "activation offload → 0 of 28 layers:" in with_slow.reason
    tight = _offloading(base, QWEN15, 50e9, host_gib=0.5)  # little host memory: fewer layers
    c = plan(tight, 16)
    assert tight.host_bytes(c.micro * 2048, c.offloaded) <= 0.5 * GIB and c.offloaded < with_fast.offloaded


def test_offload_lets_an_8b_model_at_8k_tokens_recompute_fewer_layers_in_24_gib():
    from lora_runtime.batching import compiled_footprint

    llama = SimpleNamespace(**vars(LLAMA8), model_type="llama")
    base = compiled_footprint(llama, level="pointwise")
    fast = _offloading(base, llama, 50e9)
    without, offloading = plan(base, 24, seq_len=8192), plan(fast, 24, seq_len=8192)
    assert offloading.offloaded > 0 and offloading.recomputed < without.recomputed
    assert fast.step_cost(8192, offloading.recomputed, offloading.offloaded) < base.step_cost(8192, without.recomputed)


def test_the_plan_records_its_offloaded_layers():
    p = BatchPlan(micro=4, accumulation=1, world_size=1, gradient_checkpointing=True, recomputed_layers=3,
                  offloaded_layers=5)
    assert p.to_dict()["offloaded_layers"] == 5
    assert BatchPlan(2, 1, 1, False).to_dict()["offloaded_layers"] == 0


def test_a_plan_that_cannot_fit_offloads_every_layer_where_that_needs_less():
    import dataclasses

    from lora_runtime.batching import compiled_footprint

    fp = _offloading(compiled_footprint(QWEN15), QWEN15, 50e9)
    for per_token_working in (fp.per_token_working, 4 * fp.per_token_working):
        fp = dataclasses.replace(fp, per_token_working=per_token_working)
        c = plan(fp, 3)  # not even the weights and one row fit: the least memory of the two ways
        assert "does not fit" in c.reason and c.micro == 1
        assert fp.need(2048, c.recomputed, c.offloaded) == min(fp.need(2048, 28), fp.need(2048, 0, 28))
    assert (c.recomputed, c.offloaded) == (0, 28)  # an expensive recompute: every layer offloaded instead


def test_a_plan_that_cannot_fit_offloads_no_more_than_host_memory_takes():
    from lora_runtime.batching import compiled_footprint

    fp = _offloading(compiled_footprint(QWEN15), QWEN15, 50e9, host_gib=0.1)
    c = plan(fp, 3, gc=False)  # nothing fits, no recomputation allowed: only what host memory holds is offloaded
    assert "does not fit" in c.reason and c.recomputed == 0
    assert fp.host_bytes(c.micro * 2048, c.offloaded) <= 0.1 * GIB


def test_the_reason_gives_the_bytes_each_way_and_the_pinned_memory_apart():
    from lora_runtime.batching import compiled_footprint

    fp = _offloading(compiled_footprint(QWEN15, level="pointwise"), QWEN15, 50e9)
    c = plan(fp, 16)
    moved = c.offloaded * fp.per_token_layer * c.micro * 2048
    assert c.offloaded and f"({moved / GIB:.1f} GiB each way a pass at 50.0 GB/s measured" in c.reason
    assert f"pinned host memory up to {2 * moved / GIB:.1f} of 100.0 GiB" in c.reason


def test_a_lowered_budget_bounds_the_plan_but_not_the_process_cap(monkeypatch, tmp_path, capsys):
    """After an out-of-memory error the run plans again inside `lowered_budget`: every memory decision reads the
    lower figure (never a higher one), while the hard cap of max_memory_gib stays the user's."""
    from lora_runtime.batching import lowered_budget, memory_budget
    from transformers import Qwen2Config

    Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, vocab_size=1000).save_pretrained(tmp_path / "m")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    fractions = _recorded_caps(monkeypatch)
    config = LoraSftConfig(str(tmp_path / "m"), "d", str(tmp_path / "o"), max_memory_gib=16)
    assert memory_budget(config) == (16 * GIB, "max_memory_gib=16")
    with lowered_budget((10 * GIB, "after the error")):
        assert memory_budget(config) == (10 * GIB, "after the error")
        assert memory_budget(config, lowered=False) == (16 * GIB, "max_memory_gib=16")
        with lowered_budget((20 * GIB, "more")):
            assert memory_budget(config) == (16 * GIB, "max_memory_gib=16")
        import lora_runtime.distributed as distributed

        reads = []
        monkeypatch.setattr(distributed, "all_reduce_min", lambda v: (reads.append(v), v)[1])
        plan = resolve(config, PeftBackend(), rows=100)
    assert fractions == [16 / 80] and len(reads) == 1  # the budget read once (a collective under torchrun)
    footprint = PeftBackend().footprint(Qwen2Config.from_pretrained(tmp_path / "m"), config)
    assert plan.estimated_fixed_bytes == footprint.peak(0, 0) > 0  # what a re-plan keeps whole
    planned = [line for line in capsys.readouterr().out.splitlines() if "memory plan" in line]
    assert len(planned) == 1 and "memory plan (after the error)" in planned[0] and planned[0].endswith("of 10.0 GiB")
    assert memory_budget(LoraSftConfig("m", "d", "o")) == (70 * GIB, "free")
