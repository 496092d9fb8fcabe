"""Issue 17.6: `merge` never deletes what it did not write; its staging dir is its own, not `.<out>.tmp`."""

from __future__ import annotations

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
