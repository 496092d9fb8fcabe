"""push_to_hub: the adapter (and merged model) go through HfApi.upload_folder after training; what cannot work
(offline, no token, a malformed repo id) is one config issue before anything is prepared or loaded."""

from __future__ import annotations

from pathlib import Path

import _runs
import pytest
from lora_runtime import hub, lora_sft
from lora_runtime.config import ConfigError


@pytest.fixture
def uploads(monkeypatch, tmp_path):
    """HfApi with a token and no network: upload_folder / create_repo record their arguments."""
    from huggingface_hub import HfApi

    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    calls = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create", repo_id)))

    def upload_folder(self, *, repo_id, folder_path, **kw):
        calls.append(("upload", repo_id, folder_path, kw.get("allow_patterns")))
        assert self.token is None or self.token == "hf_test_token"

    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


def test_push_issues(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # no stored login
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert hub.push_issues(None) == []
    assert "not a Hugging Face repo id" in hub.push_issues("no spaces allowed/x y")[0]
    assert "needs a Hugging Face token" in hub.push_issues("org/name")[0]
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    assert hub.push_issues("org/name") == []
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.push_issues("org/name") == [
        "`push_to_hub`='org/name' needs the Hugging Face Hub but HF_HUB_OFFLINE is set: unset it, or drop "
        "`push_to_hub` and upload the adapter later (`hf upload org/name OUTPUT_DIR --include 'adapter_*' --include "
        "'tokenizer*' --include 'chat_template*' --include README.md`)"]


def test_offline_is_refused_before_anything_is_prepared(tiny_llama_dir, llama_shards, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    with pytest.raises(ConfigError) as e:
        lora_sft(str(tiny_llama_dir), str(llama_shards), str(tmp_path / "out"), **_runs.RUN, push_to_hub="org/name")
    assert [i for i in e.value.issues if "push_to_hub" in i] == [hub.push_issues("org/name")[0]]
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_training_uploads_the_adapter_and_the_merged_model(tiny_llama_dir, llama_shards, tmp_path, uploads):
    out = tmp_path / "out"
    result = lora_sft(str(tiny_llama_dir), str(llama_shards), str(out), **{**_runs.RUN, "max_steps": 2},
                      save_merged=True, push_to_hub="org/tiny-lora")
    assert uploads == [("create", "org/tiny-lora"), ("upload", "org/tiny-lora", str(out), [
        "README.md", "adapter_checksums.json", "adapter_config.json", "adapter_model.safetensors", "chat_template.jinja",
        "lora_sft_config.json", "loss.png", "metrics.jsonl", "tokenizer.json", "tokenizer_config.json"]),
                       ("create", "org/tiny-lora-merged"), ("upload", "org/tiny-lora-merged", str(result.merged_dir), None)]
    assert 'PeftModel.from_pretrained(base, "org/tiny-lora")' in (out / "README.md").read_text()


def test_only_what_the_run_wrote_is_uploaded(tmp_path):
    """A run may train into a directory holding the user's own files: they stay local, as do the checkpoints, the
    merged model and the lock. What the final save wrote goes, whatever the tokenizer's files are called. Selected by
    huggingface_hub's own matching, as upload_folder selects."""
    from huggingface_hub.utils import filter_repo_objects
    from lora_runtime.checkpoint import write_final_adapter

    class Tokenizer:  # a tiktoken tokenizer with its own code and named templates
        def save_pretrained(self, d):
            for name in ("tokenizer_config.json", "qwen.tiktoken", "tokenization_qwen.py", "additional_chat_templates/tool_use.jinja"):
                (Path(d) / name).parent.mkdir(exist_ok=True)
                (Path(d) / name).write_text("x")

    def save(d):
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            (d / name).write_text("{}")

    write_final_adapter(tmp_path, save, Tokenizer())
    ours = ["README.md", "loss.png", "metrics.jsonl", "lora_sft_config.json"]
    theirs = [".lock", "credentials.env", "notes/plan.md", "checkpoints/checkpoint-2/adapter_model.safetensors",
              "checkpoints/checkpoint-2/README.md", "merged/model.safetensors", "merged/config.json", "vocab.json"]
    written = ["adapter_checksums.json", "adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json",
               "qwen.tiktoken", "tokenization_qwen.py", "additional_chat_templates/tool_use.jinja"]
    sent = filter_repo_objects([*ours, *theirs, *written], allow_patterns=hub.adapter_files(tmp_path),
                               ignore_patterns=[".*", "**/.*"])
    assert set(sent) == {*ours, *written}


def test_a_failed_upload_is_one_error_naming_what_is_complete_and_how_to_upload_it(tmp_path, monkeypatch):
    from huggingface_hub import HfApi
    from lora_runtime.errors import PushError

    monkeypatch.setenv("HF_TOKEN", "hf_test_token")

    def no_network(self, *a, **kw):
        raise ConnectionError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(HfApi, "create_repo", no_network)
    with pytest.raises(PushError) as e:
        hub.push("org/name", tmp_path, what="merged model")
    assert str(e.value) == (f"uploading the merged model to org/name failed (ConnectionError: [Errno -3] Temporary "
                            f"failure in name resolution); it is complete in {tmp_path}: upload it later with "
                            f"`hf upload org/name {tmp_path}`")
