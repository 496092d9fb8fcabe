"""`--push-to-hub` on the command line: generated from the config field for `train`, and on `merge` for the merged
model; offline it is one error line before anything runs."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from lora_cli.main import main


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, tiny_llama_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    out = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(out)
    return out


def test_train_offline_is_one_line_before_training(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    res = CliRunner().invoke(main, ["train", "--model", "m", "--data", "d.jsonl", "--output", "out",
                                    "--push-to-hub", "org/name", "--dry-run"])
    assert res.exit_code == 1
    assert [ln for ln in res.output.splitlines() if "push" in ln] == [
        "error: --push-to-hub='org/name' needs the Hugging Face Hub but HF_HUB_OFFLINE is set: unset it, or drop "
        "--push-to-hub and upload the adapter later (`hf upload org/name OUTPUT_DIR --include 'adapter_*' --include "
        "'tokenizer*' --include 'chat_template*' --include README.md`)"]


def test_merge_pushes_the_merged_model(adapter_dir, tiny_llama_dir, tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    calls = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create", repo_id)))
    monkeypatch.setattr(HfApi, "upload_folder",
                        lambda self, *, repo_id, folder_path, **kw: calls.append(("upload", repo_id, folder_path)))
    out = tmp_path / "merged"
    res = CliRunner().invoke(main, ["merge", str(adapter_dir), "--model", str(tiny_llama_dir), "--out", str(out),
                                    "--push-to-hub", "org/merged"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert calls == [("create", "org/merged"), ("upload", "org/merged", str(out))]
    assert (out / "config.json").is_file()
    assert "pushed to https://huggingface.co/org/merged" in res.stdout


def test_merge_offline_refuses_before_merging(adapter_dir, tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "merged"
    res = CliRunner().invoke(main, ["merge", str(adapter_dir), "--model", str(tiny_llama_dir), "--out", str(out),
                                    "--push-to-hub", "org/merged"])
    assert res.exit_code == 1 and "HF_HUB_OFFLINE is set" in res.output
    assert not out.exists()
