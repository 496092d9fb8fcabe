"""micro_batch_size="auto" (lora_runtime.batching): sized from free GPU memory, 2 on a CPU, the optimizer math kept
when effective_batch_size is set, the checkpoint's choice reused on resume (the CLI side: tests/lora_cli/test_micro_auto.py)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from lora_runtime import ConfigError, LoraSftConfig
from lora_runtime.backends.peft import PeftBackend
from lora_runtime.batching import (
    GIB,
    Footprint,
    checkpointed_micro,
    peft_footprint,
    plan_batch,
    resolve,
    unsloth_footprint,
)

QWEN15 = SimpleNamespace(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True)
LLAMA8 = SimpleNamespace(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)


def plan(fp, free_gib, *, seq_len=2048, micro="auto", gc="auto", quota=None, rows=900):
    return plan_batch(fp, seq_len=seq_len, free=free_gib * GIB, micro=micro, gc=gc, quota=quota, rows_per_rank=rows)


@pytest.mark.parametrize(("model", "seq_len", "free_gib", "expect"), [
    (QWEN15, 2048, 139, (8, False)),  # an H200: 16k tokens a pass without recomputation (measured 53.5k tok/s)
    (QWEN15, 2048, 22, (8, True)),  # a 24 GB card: same pass, recompute
    (QWEN15, 2048, 10, (3, True)),  # 10 GiB left: fewer rows, still recomputed
    (LLAMA8, 8192, 139, (2, False)),  # 8B at 8k context: 2 rows = 16k tokens fit an H200 without recomputation
    (LLAMA8, 8192, 60, (2, True)),
    (LLAMA8, 2048, 24, (4, True)),  # 15 GiB of 8B weights on a 24 GB card
])
def test_unsloth_auto_takes_the_largest_pass_that_fits(model, seq_len, free_gib, expect):
    micro, on, why = plan(unsloth_footprint(model, False), free_gib, seq_len=seq_len)
    assert (micro, on) == expect, why
    assert f"micro_batch_size auto → {micro}" in why and f"{free_gib:.1f} GiB free" in why


def test_4bit_weights_leave_room_for_more():
    bf16 = plan(unsloth_footprint(LLAMA8, False), 24)
    four = plan(unsloth_footprint(LLAMA8, True), 24)
    assert four[0] > bf16[0], (bf16, four)


def test_nothing_fits_falls_back_to_one_row_recomputed_and_says_so():
    micro, on, why = plan(unsloth_footprint(LLAMA8, False), 10)
    assert (micro, on) == (1, True) and why.endswith("(does not fit: may OOM)")


def test_effective_batch_size_gets_a_divisor_so_the_optimizer_step_is_unchanged():
    fp = Footprint(weights=3 * GIB, per_token_off=2e6, per_token_on=1e5)
    assert plan(fp, 139, quota=12)[:2] == (6, False)  # 12 rows per step per GPU → 6 a pass × accumulation 2
    assert plan(fp, 139, quota=7)[:2] == (7, False)
    assert plan(fp, 139, quota=5, seq_len=8192)[:2] == (1, False)  # cap 2 rows of 8k; 5 has no divisor 2


def test_without_effective_batch_size_an_epoch_keeps_16_steps():
    fp = Footprint(weights=0, per_token_off=1, per_token_on=1)
    assert plan(fp, 139, rows=64)[0] == 4  # 64 rows / 16 steps
    assert plan(fp, 139, rows=10)[0] == 2  # never below training-hub's 2 for that reason
    assert plan(fp, 139, rows=10**6, seq_len=512)[0] == 32  # 16k tokens of short rows


def test_explicit_values_are_obeyed():
    fp = unsloth_footprint(QWEN15, False)
    assert plan(fp, 139, micro=2, gc=True)[:2] == (2, True)
    assert plan(fp, 10, micro=16, gc=False)[:2] == (16, False)  # asked for: kept, with the warning
    assert plan(fp, 139, micro=16)[:2] == (16, False)


def test_peft_footprint_matches_its_h200_measurement():
    # backend="peft", micro 8 × 2048, checkpointing on: 32.4 GiB peak on the H200 (benchmarks/RESULTS.md)
    need = peft_footprint(QWEN15, False).need(8 * 2048, True) / GIB
    assert 32.4 <= need <= 32.4 * 1.4, need


def test_resolve_on_cpu_is_training_hubs_two(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = resolve(LoraSftConfig("m", "d", str(tmp_path / "o")), PeftBackend(), rows=100)
    assert out.micro_batch_size == 2 and out.gradient_checkpointing == "auto"
    assert "micro_batch_size: auto → 2 (training-hub's default" in capsys.readouterr().out


def test_resolve_keeps_an_explicit_micro_batch(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve(LoraSftConfig("m", "d", str(tmp_path), micro_batch_size=5), PeftBackend(), 100).micro_batch_size == 5


def test_resume_reuses_the_micro_batch_the_checkpoint_recorded(tmp_path, capsys, monkeypatch):
    from lora_runtime import checkpoint

    root = checkpoint.checkpoints_dir(tmp_path)
    tmp = checkpoint.staging_dir(root, 3)
    (tmp / "lora_sft_config.json").write_text(json.dumps({"micro_batch_size": 8}))
    checkpoint.commit(tmp, 3)
    cfg = LoraSftConfig("m", "d", str(tmp_path))
    assert checkpointed_micro(cfg) == 8
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # even where auto would say 2
    assert resolve(cfg, PeftBackend(), rows=100).micro_batch_size == 8
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


def test_batch_plan_refuses_an_unresolved_auto():
    with pytest.raises(ValueError, match="decided when training starts"):
        LoraSftConfig("m", "d", "o").batch_plan(1)


def test_effective_batch_size_is_honoured_on_a_cpu(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = resolve(LoraSftConfig("m", "d", str(tmp_path), effective_batch_size=9), PeftBackend(), rows=100)
    micro, accum, effective = out.batch_plan(1)
    assert (micro, accum, effective) == (1, 9, 9)  # 2 does not divide 9: training-hub's 2 → its largest divisor


def test_with_effective_batch_size_resume_replans_instead_of_pinning(tmp_path, monkeypatch):
    from lora_runtime import checkpoint

    tmp = checkpoint.staging_dir(checkpoint.checkpoints_dir(tmp_path), 3)
    (tmp / "lora_sft_config.json").write_text(json.dumps({"micro_batch_size": 8}))
    checkpoint.commit(tmp, 3)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = LoraSftConfig("m", "d", str(tmp_path), effective_batch_size=16)
    assert resolve(cfg, PeftBackend(), rows=100).batch_plan(1) == (2, 8, 16)  # same rows per step as 8 × 2


def _fake_gpu(monkeypatch, free_gib):
    import lora_runtime.batching as batching

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(batching, "free_gpu_bytes", lambda config: free_gib * GIB)


def test_resolve_on_a_gpu_plans_micro_and_checkpointing_for_unsloth(monkeypatch, capsys, tmp_path):
    from lora_runtime.backends.unsloth import UnslothBackend
    from transformers import Qwen2Config

    Qwen2Config(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True).save_pretrained(tmp_path / "m")
    _fake_gpu(monkeypatch, 139)
    out = resolve(LoraSftConfig(str(tmp_path / "m"), "d", str(tmp_path / "o")), UnslothBackend(), rows=900)
    assert (out.micro_batch_size, out.gradient_checkpointing) == (8, False)
    assert "memory plan: micro_batch_size auto → 8" in capsys.readouterr().out
    _fake_gpu(monkeypatch, 10)
    out = resolve(LoraSftConfig(str(tmp_path / "m"), "d", str(tmp_path / "o")), UnslothBackend(), rows=900)
    assert (out.micro_batch_size, out.gradient_checkpointing) == (3, True)


def test_a_config_it_cannot_size_falls_back_to_two_and_says_why(monkeypatch, capsys, tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=2, n_embd=64, n_head=2).save_pretrained(tmp_path / "gpt2")  # no intermediate_size
    _fake_gpu(monkeypatch, 139)
    out = resolve(LoraSftConfig(str(tmp_path / "gpt2"), "d", str(tmp_path / "o")), PeftBackend(), rows=900)
    assert out.micro_batch_size == 2 and "cannot size GPT2Config" in capsys.readouterr().out


def test_explicit_values_on_a_gpu_skip_the_plan(monkeypatch, tmp_path):
    _fake_gpu(monkeypatch, 139)  # a peft backend with micro given never reads the model config (none exists here)
    out = resolve(LoraSftConfig("no-such-model", "d", str(tmp_path), micro_batch_size=4), PeftBackend(), rows=9)
    assert out.micro_batch_size == 4


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
    assert saved["micro_batch_size"] == 3 and saved["resolved"]["micro_batch_size"] == 3


def test_moe_weights_count_every_expert():
    from lora_runtime.batching import weight_bytes

    mixtral = SimpleNamespace(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                              num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False, num_local_experts=8)
    assert 85 < weight_bytes(mixtral, False) / GIB < 89  # Mixtral-8x7B: 46.7 B parameters in bf16
    assert weight_bytes(LLAMA8, False) / GIB == pytest.approx(15.0, abs=0.1)
