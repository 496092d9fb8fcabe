"""Issue 18.6: options peers' users reach for: warmup_ratio, eval_split_ratio, chat_template (resume_from:
test_resume_changes.py)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import _tiny
import pytest
from lora_data import DataError
from lora_runtime import ConfigError, LoraSftConfig


def test_warmup_ratio_is_a_fraction_of_all_steps():
    from lora_runtime.batching import fixed_plan
    from lora_runtime.loop import training_arguments

    def args(cfg):
        return training_arguments(cfg, fixed_plan(cfg, 1), "fp32")

    assert args(LoraSftConfig("m", "d", "o", max_steps=40, warmup_ratio=0.25, micro_batch_size=2)).get_warmup_steps(40) == 10
    assert args(LoraSftConfig("m", "d", "o", max_steps=40, warmup_ratio=0.5, micro_batch_size=2)).get_warmup_steps(40) == 20
    assert args(LoraSftConfig("m", "d", "o", micro_batch_size=2)).get_warmup_steps(40) == 10  # warmup_steps
    with pytest.raises(ConfigError, match=r"`warmup_ratio` must be in \[0, 1\), got 1.5"):
        LoraSftConfig("m", "d", "o", warmup_ratio=1.5).validate()


def test_adamw_torch_runs_fused_on_a_gpu_and_other_optimizers_as_named(monkeypatch):
    import torch
    from lora_runtime.loop import optimizer_name

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert optimizer_name(LoraSftConfig("m", "d", "o")) == ("adamw_torch", "")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert optimizer_name(LoraSftConfig("m", "d", "o"))[0] == "adamw_torch_fused"
    for name in ("adamw_8bit", "sgd", "adamw_torch_fused"):
        assert optimizer_name(LoraSftConfig("m", "d", "o", optim=name)) == (name, "")


def test_fused_adamw_loads_the_multi_tensor_state_and_steps_alike():
    """A checkpoint of the multi-tensor AdamW (adamw_torch before, or on a CPU) resumes under the fused one: the same
    state, and the next step moves the parameters alike."""
    import torch

    def run(fused: bool, state=None):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(4, 3))
        opt = torch.optim.AdamW([p], lr=1e-2, weight_decay=0.01, foreach=not fused, fused=fused or None)
        if state is not None:
            opt.load_state_dict(state)
        for _ in range(2 if state is None else 1):
            p.grad = torch.arange(12.0).reshape(4, 3) / 10
            opt.step()
        return p.detach().clone(), opt.state_dict()

    _, state = run(False)
    multi, _ = run(False, state)
    fused, _ = run(True, state)
    torch.testing.assert_close(fused, multi)


def test_eval_split_ratio_holds_out_a_seeded_share_of_the_lines(tmp_path):
    from lora_runtime.data import split_eval

    records = _tiny.chat_records(40, seed=1)
    data = _tiny.write_jsonl(tmp_path / "chat.jsonl", [*records[:20], "", *records[20:]])
    cfg = LoraSftConfig("m", str(data), "o", eval_split_ratio=0.1, data_output_dir=str(tmp_path / "cache"))
    train, evals = split_eval(data, cfg)
    def lines(p):
        return [json.loads(x) for x in Path(p).read_text(encoding="utf-8").splitlines() if x.strip()]

    assert len(lines(evals)) == 4 and len(lines(train)) == 36
    assert sorted(map(json.dumps, lines(train) + lines(evals))) == sorted(map(json.dumps, records))
    assert split_eval(data, cfg) == (train, evals)  # the same inputs give the same files
    other = split_eval(data, LoraSftConfig("m", str(data), "o", eval_split_ratio=0.1, seed=1,
                                           data_output_dir=str(tmp_path / "cache")))[1]
    assert lines(other) != lines(evals)  # the seed picks them
    with pytest.raises(ConfigError, match="`eval_split_ratio` and `eval_data_path` both name the eval data"):
        LoraSftConfig("m", str(data), "o", eval_split_ratio=0.1, eval_data_path=str(data)).validate()
    array = tmp_path / "chat.json"  # a .json array file splits by its elements, as its JSON Lines twin does
    array.write_text(json.dumps(records, indent=2))
    train_a, evals_a = split_eval(array, LoraSftConfig("m", str(array), "o", eval_split_ratio=0.1,
                                                        data_output_dir=str(tmp_path / "cache")))
    assert len(lines(evals_a)) == 4 and sorted(map(json.dumps, lines(train_a) + lines(evals_a))) == sorted(
        map(json.dumps, records))


def test_eval_split_ratio_splits_the_records_of_a_gzip_or_parquet_file(tmp_path):
    """Records, not the stored bytes: a .jsonl.gz and a parquet file split as their JSON Lines twin does (the gzip
    stream's bytes used to be cut at its newline bytes)."""
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq
    from lora_runtime.data import split_eval

    records = _tiny.chat_records(40, seed=1)
    plain = _tiny.write_jsonl(tmp_path / "chat.jsonl", records)
    packed = tmp_path / "chat.jsonl.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    table = tmp_path / "chat.parquet"
    pq.write_table(pa.Table.from_pylist(records), table)

    def split(path):
        cfg = LoraSftConfig("m", str(path), "o", eval_split_ratio=0.1, data_output_dir=str(tmp_path / "cache"))
        return [[json.loads(x) if x.strip() else None for x in Path(p).read_text(encoding="utf-8").splitlines()]
                for p in split_eval(path, cfg)]

    want = split(plain)
    assert sum(x is not None for x in want[1]) == 4
    assert split(packed) == want and split(table) == want
    broken = tmp_path / "broken.jsonl.gz"
    broken.write_bytes(packed.read_bytes()[:60])
    with pytest.raises(DataError, match=r"broken\.jsonl\.gz: not a readable gzip file"):
        split(broken)


def test_ensure_shards_prepares_the_split_and_the_chat_template(tmp_path, tiny_llama_dir, capsys):
    from lora_data import ShardReader
    from lora_runtime.data import ensure_shards
    from transformers import AutoTokenizer

    data = _tiny.write_jsonl(tmp_path / "chat.jsonl", _tiny.chat_records(30, seed=2))
    cfg = LoraSftConfig(str(tiny_llama_dir), str(data), str(tmp_path / "o"), max_seq_len=256, eval_split_ratio=0.2,
                        chat_template="chatml", data_output_dir=str(tmp_path / "cache"))
    _, shards = ensure_shards(cfg)
    # ChatML's turn end is not this Llama-3 tokenizer's eos: generation would run past every trained answer
    assert ("warning: the chat template ends each turn with <|im_end|>, but this tokenizer's eos is <|eot_id|>: "
            "generation stops at <|eot_id|>, so pass <|im_end|> as a stop token") in capsys.readouterr().out
    assert shards.eval_dir is not None and shards.manifest.counts["valid"] == 24
    text = AutoTokenizer.from_pretrained(tiny_llama_dir).decode(ShardReader(shards.train_dir)[0].input_ids)
    assert "<|im_start|>user" in text and "<|start_header_id|>" not in text  # rendered with ChatML, not Llama-3

    template = tmp_path / "my.jinja"
    template.write_text("{% for m in messages %}{{ '### ' + m['role'] + ': ' + m['content'] + eos_token }}{% endfor %}")
    cfg = LoraSftConfig(str(tiny_llama_dir), str(data), str(tmp_path / "o"), max_seq_len=256,
                        chat_template=str(template), data_output_dir=str(tmp_path / "cache"))
    text = AutoTokenizer.from_pretrained(tiny_llama_dir).decode(ShardReader(ensure_shards(cfg)[1].train_dir)[0].input_ids)
    assert "### user: " in text


def test_a_turn_end_the_tokenizer_has_no_token_for_is_named():
    from types import SimpleNamespace

    from lora_runtime.data import CHATML_TEMPLATE, turn_end_note

    pieces = SimpleNamespace(eos_token="</s>", unk_token_id=0, convert_tokens_to_ids=lambda token: 0)
    assert "which this tokenizer has no token for: the model learns it as several pieces" in turn_end_note(
        CHATML_TEMPLATE, pieces)
    chatml = SimpleNamespace(eos_token="<|im_end|>", unk_token_id=None, convert_tokens_to_ids=lambda token: 7)
    assert turn_end_note(CHATML_TEMPLATE, chatml) is None  # Qwen's: its eos is the turn end
    assert turn_end_note("{{ messages[0]['content'] + eos_token }}", pieces) is None


def test_an_unknown_chat_template_is_named():
    with pytest.raises(ConfigError, match=r"`chat_template`=templates/nope\.jinja is neither a file nor one of"):
        LoraSftConfig("m", "d", "o", chat_template="templates/nope.jinja").validate()


def test_forced_checkpointing_on_a_gpu_points_to_the_memory_budget(monkeypatch):
    """Only where gradient_checkpointing="auto" would plan by memory: the peft backend without a fused loss
    recomputes every layer under auto too."""
    import torch
    from lora_runtime.backends.peft import PeftBackend
    from lora_runtime.backends.unsloth import UnslothBackend
    from lora_runtime.loop import forced_recompute_hint

    forced = LoraSftConfig("m", "d", "o", gradient_checkpointing=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert forced_recompute_hint(forced, UnslothBackend()) == ""  # a CPU plan has no budget to point to
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert "max_memory_gib" in forced_recompute_hint(forced, UnslothBackend())
    assert forced_recompute_hint(dataclasses.replace(forced, kernels="none"), PeftBackend()) == ""
    for gc in ("auto", False):
        assert forced_recompute_hint(LoraSftConfig("m", "d", "o", gradient_checkpointing=gc), UnslothBackend()) == ""


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["cosine_with_min_lr", "warmup_stable_decay"])
def test_the_schedules_that_need_a_parameter_of_their_own_run(schedule, tiny_llama_dir, llama_shards, tmp_path):
    """transformers builds these two only with a parameter lora_sft does not take: cosine_with_min_lr ends at 10% of
    the learning rate, warmup_stable_decay holds it and decays over the last 10% of the steps."""
    import _runs
    from lora_runtime import lora_sft
    from lora_runtime.metrics import read_metrics

    result = lora_sft(str(tiny_llama_dir), str(llama_shards), str(tmp_path / "run"),
                      **{**_runs.RUN, "max_steps": 20, "save_steps": 20, "warmup_steps": 0, "lr_scheduler": schedule})
    lrs = [r["lr"] for r in read_metrics(result.metrics_path) if "loss" in r]
    peak = _runs.RUN["learning_rate"]
    if schedule == "cosine_with_min_lr":
        assert lrs[0] == pytest.approx(peak) and peak * 0.1 < lrs[-1] < peak * 0.15
    else:
        assert lrs[:18] == pytest.approx([peak] * 18) and lrs[19] < peak


@pytest.mark.slow
def test_a_constant_schedule_says_it_takes_no_warmup(tiny_llama_dir, llama_shards, tmp_path, capsys):
    """transformers' "constant" ignores warmup_steps / warmup_ratio; the run said nothing about it."""
    import _runs
    from lora_runtime import lora_sft
    from lora_runtime.metrics import read_metrics

    result = lora_sft(str(tiny_llama_dir), str(llama_shards), str(tmp_path / "run"),
                      **{**_runs.RUN, "max_steps": 3, "save_steps": 3, "warmup_ratio": 0.5, "lr_scheduler": "constant"})
    assert [r["lr"] for r in read_metrics(result.metrics_path) if "loss" in r] == [_runs.RUN["learning_rate"]] * 3
    assert "lr_scheduler='constant' has no warmup: warmup_steps / warmup_ratio (2 steps) do not apply" in capsys.readouterr().out


def test_a_polynomial_schedule_needs_a_learning_rate_above_its_end():
    from lora_runtime import ConfigError, LoraSftConfig

    with pytest.raises(ConfigError, match="decays to 1e-7"):
        LoraSftConfig("m", "d", "o", lr_scheduler="polynomial", learning_rate=1e-7).validate()
    LoraSftConfig("m", "d", "o", lr_scheduler="polynomial", learning_rate=2e-7).validate()
