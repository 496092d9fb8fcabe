"""Issue 17.6: `merge` never deletes what it did not write; its staging dir is its own, not `.<out>.tmp`."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from lora_cli.main import main


def test_merge_leaves_a_foreign_dot_tmp_sibling_alone(tmp_path, tiny_llama_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    adapter = tmp_path / "adapter"
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                   LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(adapter)
    sibling = tmp_path / ".merged.tmp"
    sibling.mkdir()
    (sibling / "mine.txt").write_text("keep me")
    res = CliRunner().invoke(main, ["merge", str(adapter), "--model", str(tiny_llama_dir), "--out",
                                    str(tmp_path / "merged")])
    assert res.exit_code == 0, res.output
    assert (sibling / "mine.txt").read_text() == "keep me"
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".merged.tmp", "adapter", "merged"]  # no staging left
    first = (tmp_path / "merged" / "model.safetensors").stat().st_ino
    res = CliRunner().invoke(main, ["merge", str(adapter), "--model", str(tiny_llama_dir), "--out",
                                    str(tmp_path / "merged")])  # replaces the earlier merge, set aside, then dropped
    assert res.exit_code == 0, res.output
    assert (tmp_path / "merged" / "model.safetensors").stat().st_ino != first
    assert sorted(p.name for p in tmp_path.iterdir()) == [".merged.tmp", "adapter", "merged"]
    assert (sibling / "mine.txt").read_text() == "keep me"


def test_a_merge_that_fails_while_replacing_puts_the_earlier_one_back(tmp_path, tiny_llama_dir, monkeypatch):
    """An error (Ctrl-C, a failed rename) after the earlier merge is set aside and before the new one is in place:
    the earlier one is back at out_dir, whole, and nothing is left beside it (it used to be deleted first)."""
    from pathlib import Path

    from lora_runtime.merge import merge_adapter
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    adapter = tmp_path / "adapter"
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                   LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(adapter)
    out = merge_adapter(adapter, tiny_llama_dir, tmp_path / "merged")
    before = (out / "model.safetensors").stat()
    rename = Path.rename

    def interrupted_at_the_new_one(self, target):
        if Path(target) == out and self.name.startswith(".merged.tmp-"):
            raise KeyboardInterrupt("interrupted")
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", interrupted_at_the_new_one)
    with pytest.raises(KeyboardInterrupt):
        merge_adapter(adapter, tiny_llama_dir, out)
    after = (out / "model.safetensors").stat()
    assert (after.st_ino, after.st_size) == (before.st_ino, before.st_size)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "merged"]


def test_a_missing_local_base_is_named_as_such(tmp_path):
    """Not huggingface_hub's "Repo id must be in the form 'repo_name' or 'namespace/repo_name'"."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "adapter_config.json").write_text("{}")
    for model in (str(tmp_path / "nonexist"), "./nonexist"):
        res = CliRunner().invoke(main, ["merge", str(tmp_path / "run"), "--model", model, "--out", str(tmp_path / "m")])
        assert res.exit_code == 1 and res.output == f"error: --model {model}: no such directory\n", res.output
