"""A run never writes over a user's files: ckpt_output_dir may be new, empty, a training run's (resumed or replaced
as the resume options say) or hold only files a run does not write; a directory of someone else's files that a run
would overwrite, the base model's own directory, or a file are refused before anything is written."""

from __future__ import annotations

import re
import shutil

import pytest
from lora_runtime import lora_sft
from lora_runtime.checkpoint import CONFIG_NAME, check_output_dir
from lora_runtime.errors import CheckpointError


@pytest.mark.parametrize("name", ["README.md", "metrics.jsonl", "tokenizer.json", "adapter_config.json", "config.json"])
def test_a_users_file_that_a_run_would_write_is_refused(tmp_path, name):
    (tmp_path / name).write_text("mine")
    with pytest.raises(CheckpointError, match=re.escape(f"holds {name}, which a run writes, and no training run made it")):
        check_output_dir(tmp_path)


def test_new_empty_other_files_and_a_runs_directory_pass(tmp_path):
    check_output_dir(tmp_path / "new")
    check_output_dir(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")  # nothing a run writes
    check_output_dir(tmp_path)
    for marker in (CONFIG_NAME, "checkpoints/checkpoint-4/COMPLETE", "checkpoints/.tmp-checkpoint-4/trainer_state.json"):
        (tmp_path / marker).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / marker).write_text("{}")
        (tmp_path / "README.md").write_text("the model card of the run")
        check_output_dir(tmp_path)
        (tmp_path / "README.md").unlink()
        shutil.rmtree(tmp_path / "checkpoints", ignore_errors=True)
        (tmp_path / CONFIG_NAME).unlink(missing_ok=True)
    (tmp_path / ".lock").write_text("pid 7 (training: lora-cli train --model m)")  # a run killed before its first save
    (tmp_path / "metrics.jsonl").write_text("")
    check_output_dir(tmp_path)


def test_a_users_checkpoints_folder_does_not_make_a_runs_directory(tmp_path):
    """A `checkpoints` folder of another tool's (no checkpoint of a run's in it) beside the user's README: the run
    must not take the directory for its own, overwrite the README and delete the folder's `checkpoint-<step>`."""
    (tmp_path / "README.md").write_text("my project notes")
    (tmp_path / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    (tmp_path / "checkpoints" / "checkpoint-2" / "my_weights.bin").write_bytes(b"mine")
    with pytest.raises(CheckpointError, match=re.escape("holds README.md, checkpoints, which a run writes")):
        check_output_dir(tmp_path)
    (tmp_path / "README.md").unlink()
    with pytest.raises(CheckpointError, match=re.escape("holds checkpoints, which a run writes")):
        check_output_dir(tmp_path)


def test_the_base_model_directory_and_a_file_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="is the base model's directory"):
        check_output_dir(tmp_path, tmp_path / ".")
    (tmp_path / "f").write_text("")
    with pytest.raises(CheckpointError, match="is a file, not a directory"):
        check_output_dir(tmp_path / "f")


def test_lora_sft_refuses_before_writing_anything(tiny_llama_dir, llama_shards, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "README.md").write_text("# My project")
    with pytest.raises(CheckpointError, match=re.escape("holds README.md")):
        lora_sft(str(tiny_llama_dir), str(llama_shards), str(out), backend="peft", max_steps=1)
    assert sorted(p.name for p in out.iterdir()) == ["README.md"] and (out / "README.md").read_text() == "# My project"
    with pytest.raises(CheckpointError, match="is the base model's directory"):
        lora_sft(str(tiny_llama_dir), str(llama_shards), str(tiny_llama_dir), backend="peft", max_steps=1)


def test_a_failed_runs_new_directory_is_removed_before_its_lock_is_released(tmp_path, monkeypatch):
    """A first run that fails before writing anything removes the directory it made while it still holds the lock: a
    second run that took the lock in the moment between would otherwise lose its directory and lock to that removal."""
    import fcntl

    from lora_runtime import checkpoint

    out = tmp_path / "run"
    held_at_removal = []
    real_rmtree = shutil.rmtree

    def rmtree(path, *args, **kwargs):
        with open(out / ".lock", "a+") as fh:  # a second opener, as another run's
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                held_at_removal.append(False)
            except BlockingIOError:
                held_at_removal.append(True)
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.shutil, "rmtree", rmtree)
    with pytest.raises(RuntimeError, match="before any write"), checkpoint.output_lock(out):
        raise RuntimeError("failed before any write")
    assert held_at_removal == [True] and not out.exists()
