"""The adapter's README.md is a filled model card (base, data, hyper-parameters, results, how to load it), and a
local base model is recorded in adapter_config.json by its absolute path."""

from __future__ import annotations

import json

import _runs
import pytest
from lora_runtime import lora_sft
from lora_runtime.checkpoint import ADAPTER_SUMS, check_adapter
from lora_runtime.model_card import write_model_card


def _run_dir(tmp_path, model_path: str):
    out = tmp_path / "run"
    out.mkdir()
    (out / "adapter_config.json").write_text(json.dumps({
        "base_model_name_or_path": model_path, "r": 8, "lora_alpha": 16, "lora_dropout": 0.05,
        "target_modules": ["v_proj", "q_proj"], "peft_type": "LORA"}))
    (out / "lora_sft_config.json").write_text(json.dumps({
        "model_path": model_path, "data_path": "train.jsonl", "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.05,
        "target_modules": None, "learning_rate": 1e-4, "lr_scheduler": "cosine", "warmup_steps": 3, "warmup_ratio": None,
        "num_epochs": 2, "max_steps": None, "max_seq_len": 512, "sample_packing": True, "seed": 1,
        "resolved": {"micro_batch_size": 4, "gradient_accumulation_steps": 8, "effective_batch_size": 64,
                     "world_size": 2, "backend": "peft", "versions": {"peft": "0.99", "torch": "9.9"}}}))
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 2.5}\n{"step": 7, "loss": 1.25, "tokens_seen": 999}\n')
    return out


def test_card_is_filled_from_the_run_and_a_hub_base_keeps_its_id(tmp_path):
    out = _run_dir(tmp_path, "Qwen/Qwen2.5-0.5B-Instruct")
    manifest = {"counts": {"valid": 90, "lines_read": 100, "rejected": 10, "tokens": 12345, "loss_tokens": 6000,
                           "rows": 30}, "seq_len": 512, "packing_efficiency": 0.8037}
    text = write_model_card(out, manifest).read_text()
    assert "More Information Needed" not in text
    assert "base_model: Qwen/Qwen2.5-0.5B-Instruct" in text
    for expected in ("`train.jsonl`", "90 valid of 100", "12345", "80.4%", "`q_proj`, `v_proj`", "| 8 / 16 / 0.05 |",
                     "0.0001", "cosine, warmup 3 steps", "2 epoch(s) (7 optimizer steps done)",
                     "4 × 8 × 2 = 64 rows/step", "1.25 (first logged 2.5)", "peft 0.99", "torch 9.9",
                     "PeftModel.from_pretrained", "LoRARequest", "max_lora_rank=8",
                     "**Quantization while training:** none (unquantized base)"):  # was "16-bit" for fp32 runs too
        assert expected in text, expected
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "Qwen/Qwen2.5-0.5B-Instruct"


def test_the_card_describes_what_a_shard_dir_trained_not_the_config_defaults(tmp_path):
    """A shard dir prepared with --train-on-inputs --no-packing, trained with the config's defaults (which defer to
    it): the card said 'assistant answers only' and packing True."""
    out = _run_dir(tmp_path, "Qwen/Qwen2.5-0.5B-Instruct")
    manifest = {"counts": {"valid": 9, "lines_read": 9, "tokens": 900, "loss_tokens": 900, "rows": 9}, "seq_len": 512,
                "packing": False, "packing_efficiency": 0.3, "options": {"train_on_inputs": True}}
    text = write_model_card(out, manifest).read_text()
    assert "**Trained on:** prompts and answers" in text and "| sequence length / packing | 512 / False |" in text
    text = write_model_card(out).read_text()  # no manifest: the config's values
    assert "**Trained on:** assistant answers only" in text and "| sequence length / packing | 512 / True |" in text


@pytest.mark.parametrize(("extra", "why"), [
    ({"use_dora": True}, "vLLM does not serve DoRA adapters"),
    ({"init_lora_weights": "pissa_niter_4"}, "init_lora_weights='pissa_niter_4' changed the base weights"),
    ({"rank_pattern": {"q_proj": 64}}, "rank_pattern / alpha_pattern give modules their own scale")])
def test_the_vllm_recipe_is_given_only_where_vllm_serves_the_model_trained(tmp_path, extra, why):
    out = _run_dir(tmp_path, "Qwen/Qwen2.5-0.5B-Instruct")
    cfg = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**cfg, **extra}))
    text = write_model_card(out).read_text()
    assert "LoRARequest" not in text and f"With vLLM: not this adapter as it is ({why}" in text
    assert "PeftModel.from_pretrained" in text and "lora-cli merge" in text


def test_a_local_base_is_recorded_absolute_and_the_checksums_follow(tmp_path, monkeypatch):
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    out = _run_dir(tmp_path, "models/tiny")
    (out / "adapter_model.safetensors").write_bytes(b"weights")
    from lora_runtime.checkpoint import ADAPTER_FILES, seal

    seal(out, ADAPTER_FILES)
    text = write_model_card(out).read_text()
    absolute = str((tmp_path / "models" / "tiny").resolve())
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == absolute
    assert f"local directory `{absolute}` (basename `tiny`" in text
    assert "base_model:" not in text  # the hub's metadata field takes hub ids only
    assert (out / ADAPTER_SUMS).exists()
    check_adapter(out)  # re-sealed after the rewrite


@pytest.mark.slow
def test_training_writes_the_card_next_to_the_adapter(tiny_qwen2_dir, qwen2_shards, tmp_path, monkeypatch):
    monkeypatch.chdir(tiny_qwen2_dir.parent)
    result = lora_sft(tiny_qwen2_dir.name, str(qwen2_shards), str(tmp_path / "out"),
                      **{**_runs.RUN, "max_steps": 2, "save_steps": 1})
    text = (result.adapter_dir / "README.md").read_text()
    assert "More Information Needed" not in text
    assert str(tiny_qwen2_dir.resolve()) in text and f"basename `{tiny_qwen2_dir.name}`" in text
    assert "2 × 2 × 1 = 4 rows/step" in text
    assert f"**Final training loss:** {result.final_loss:.4g}" in text
    assert "Packing efficiency:" in text
    prepared = json.loads((result.adapter_dir / "lora_sft_config.json").read_text())["resolved"]["prepared"]
    assert prepared["sample_packing"] is True and "train_on_inputs" in prepared  # as the shards recorded them
    cfg = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tiny_qwen2_dir.resolve())
    check_adapter(result.adapter_dir)
    saves = sorted((tmp_path / "out" / "checkpoints").glob("checkpoint-*"))
    assert saves and all(json.loads((c / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        tiny_qwen2_dir.resolve()) for c in saves)  # a checkpoint loads from any working directory too
