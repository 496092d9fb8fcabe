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


def test_what_a_killed_merge_left_is_cleared_by_the_next_and_a_live_ones_is_not(tmp_path, tiny_llama_dir):
    """A merge killed while writing left its partial copy of the model (`.merged.tmp-XXXX`, gigabytes for a real
    model) beside the output for good. A killed merge's staging dirs (marked, their lock gone with it) are cleared by
    the next merge into the same output: a partial write removed, an earlier merge set aside put back if the output
    is missing. A live merge's, and anything not marked as a merge's, are left alone."""
    import contextlib
    import subprocess
    import sys

    from lora_runtime.merge import MARKER, STAGING, _clear_killed, _staging

    out = tmp_path / "merged"
    script = (  # a merge's state when killed after setting the earlier merge aside, before its rename
        "import contextlib, os, sys\nfrom pathlib import Path\nfrom lora_runtime.merge import MARKER, _staging\n"
        "out = Path(sys.argv[1])\nheld = contextlib.ExitStack()\n"
        "tmp = _staging(out, 'tmp', held)\n(tmp / 'model.safetensors').write_bytes(b'partial')\n"
        "aside = _staging(out, 'replaced', held)\n(aside / out.name).mkdir()\n"
        "(aside / out.name / MARKER).write_text('earlier')\nos._exit(0)\n")
    subprocess.run([sys.executable, "-c", script, str(out)], check=True, timeout=120)
    with contextlib.ExitStack() as held:
        live = _staging(out, "tmp", held)
        foreign = tmp_path / ".merged.tmp-mine"
        foreign.mkdir()
        subprocess.run([sys.executable, "-c", script, str(tmp_path / "merged.v2")], check=True, timeout=120)
        other = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".merged.v2."))  # another output's
        _clear_killed(out)
        assert (out / MARKER).read_text() == "earlier"  # put back: the output was missing
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, foreign.name, "merged", *other])
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    adapter = tmp_path / "adapter"
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                   LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(adapter)
    subprocess.run([sys.executable, "-c", script, str(out)], check=True, timeout=120)
    res = CliRunner().invoke(main, ["merge", str(adapter), "--model", str(tiny_llama_dir), "--out", str(out)])
    assert res.exit_code == 0, res.output
    # the live one's lock is gone now too: cleared like the killed one's
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([foreign.name, "adapter", "merged", *other])
    assert not (out / STAGING).exists()
    assert (out / "model.safetensors").is_file()
