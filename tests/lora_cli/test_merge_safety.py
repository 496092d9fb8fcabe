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


def test_a_merge_killed_while_replacing_leaves_the_earlier_one_whole(tmp_path, tiny_llama_dir, monkeypatch):
    """Between setting the earlier merge aside and renaming the new one into place: the earlier one is still on disk,
    whole (it used to be deleted first)."""
    from pathlib import Path

    from lora_runtime.merge import merge_adapter
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    adapter = tmp_path / "adapter"
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                   LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(adapter)
    out = merge_adapter(adapter, tiny_llama_dir, tmp_path / "merged")
    size = (out / "model.safetensors").stat().st_size
    rename = Path.rename

    def killed_at_the_new_one(self, target):
        if Path(target) == out:
            raise KeyboardInterrupt("killed")
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", killed_at_the_new_one)
    with pytest.raises(KeyboardInterrupt):
        merge_adapter(adapter, tiny_llama_dir, out)
    kept = list(tmp_path.glob(".merged.replaced-*/merged/model.safetensors"))
    assert len(kept) == 1 and kept[0].stat().st_size == size
