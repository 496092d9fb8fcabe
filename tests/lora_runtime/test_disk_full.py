"""Issue 17.4: a full disk while training. The partial checkpoint is removed, one error says which complete
checkpoint is intact, and the same call resumes once there is space again. Libraries report a full disk in their own
ways: the tokenizers library's Rust save raises a plain Exception ("No space left on device (os error 28)"), and
torch.save's zip writer a RuntimeError without an errno ("unexpected pos 84736 vs 84624")."""

from __future__ import annotations

import json
import subprocess

import _runs
import pytest
from click.testing import CliRunner
from lora_runtime import checkpoint
from lora_runtime.api import lora_sft
from lora_runtime.errors import CheckpointError

pytestmark = pytest.mark.slow

# 4 steps, a checkpoint every 2: checkpoint-2 (~720 KiB on a tmpfs) fits, checkpoint-4 does not
RUN = {**_runs.RUN, "max_steps": 4, "save_steps": 2}
# with checkpoint-2 and the run's files on it (~736 KiB), this much tmpfs is full in checkpoint-4 at:
AT_TOKENIZER = "970k"  # the tokenizer save (after the 200 KiB adapter): a plain Exception
AT_OPTIMIZER = "1150k"  # torch.save of the 420 KiB optimizer state: a RuntimeError that names no errno


def test_a_plain_exception_from_the_tokenizer_save_on_a_full_disk(tiny_llama_dir, llama_shards, tmp_path,
                                                                   monkeypatch):
    from transformers import PreTrainedTokenizerBase

    real = PreTrainedTokenizerBase.save_pretrained

    def save(self, save_directory, *args, **kwargs):
        if str(save_directory).endswith(".tmp-checkpoint-4"):
            raise Exception("No space left on device (os error 28)")  # what tokenizers' Rust code raises
        return real(self, save_directory, *args, **kwargs)

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", save)
    out = tmp_path / "run"
    with pytest.raises(CheckpointError, match=r"disk full \(No space left on device \(os error 28\)\) while writing "
                                              r"checkpoint-4 .* the previous checkpoint .*checkpoint-2 is intact"):
        lora_sft(str(tiny_llama_dir), str(llama_shards), str(out), **{**_runs.RUN, "max_steps": 6, "save_steps": 2})
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["checkpoint-2"], names  # the partial .tmp-checkpoint-4 is gone


def _grow(mnt, size: str) -> None:
    """Free space: a tmpfs can be resized in place."""
    subprocess.run(["mount", "-o", f"remount,size={size}", str(mnt)], check=True)


def _assert_only_checkpoint_2_left_and_it_loads(out, tiny_llama_dir) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["checkpoint-2"]  # no .tmp-checkpoint-4, no staging dir
    checkpoint.verify(ckpts / "checkpoint-2")  # every file as its COMPLETE marker lists it
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), ckpts / "checkpoint-2")


def _assert_resumed_and_finished(out, capsys) -> None:
    assert f"resuming from {out / 'checkpoints' / 'checkpoint-2'} (step 2" in capsys.readouterr().out
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    checkpoint.check_adapter(out)  # the final adapter, sealed


@pytest.mark.parametrize(("size", "raised"), [(AT_TOKENIZER, Exception), (AT_OPTIMIZER, RuntimeError)],
                         ids=["tokenizer-save", "torch-save"])
def test_a_real_full_disk_keeps_the_last_checkpoint_and_the_same_call_resumes(size, raised, tmpfs, tiny_llama_dir,
                                                                               llama_shards, capsys):
    mnt = tmpfs(size)
    out = mnt / "run"
    with pytest.raises(CheckpointError) as info:
        lora_sft(str(tiny_llama_dir), str(llama_shards), str(out), **RUN)
    assert type(info.value.__cause__) is raised, repr(info.value.__cause__)  # the library error this size reaches
    message = str(info.value)
    assert message.startswith("disk full (") and "while writing checkpoint-4" in message, message
    assert f"the previous checkpoint {out / 'checkpoints' / 'checkpoint-2'} is intact" in message, message
    _assert_only_checkpoint_2_left_and_it_loads(out, tiny_llama_dir)

    _grow(mnt, "4m")
    capsys.readouterr()
    result = lora_sft(str(tiny_llama_dir), str(llama_shards), str(out), **RUN)
    assert result.steps == 4
    _assert_resumed_and_finished(out, capsys)


# with checkpoint-2 and checkpoint-4 on it (~1,480 KiB), this much tmpfs is full in the final save at:
FINAL_AT_WEIGHTS = "1550k"  # the adapter's safetensors (a SafetensorError)
FINAL_AT_TOKENIZER = "1720k"  # the tokenizer, after the adapter (a plain Exception)


@pytest.mark.parametrize("size", [FINAL_AT_WEIGHTS, FINAL_AT_TOKENIZER], ids=["adapter-save", "tokenizer-save"])
def test_a_real_full_disk_in_the_final_save_leaves_no_torn_adapter_and_the_same_call_writes_it(
        size, tmpfs, tiny_llama_dir, llama_shards, capsys):
    mnt = tmpfs(size)
    out = mnt / "run"
    with pytest.raises(CheckpointError) as info:
        lora_sft(str(tiny_llama_dir), str(llama_shards), str(out), **RUN)
    message = str(info.value)
    assert message.startswith("disk full (") and f"while writing the final adapter in {out}" in message, message
    assert f"it resumes from the complete {out / 'checkpoints' / 'checkpoint-4'}" in message, message
    left = {p.name for p in out.iterdir()}
    assert not left & {"adapter_model.safetensors", "adapter_config.json", checkpoint.ADAPTER_SUMS, "tokenizer.json",
                       checkpoint.FINAL_STAGING}, left  # no torn final adapter, no staging dir
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]

    _grow(mnt, "4m")
    capsys.readouterr()
    result = lora_sft(str(tiny_llama_dir), str(llama_shards), str(out), **RUN)
    assert result.steps == 4 and result.adapter_dir == out
    checkpoint.check_adapter(out)  # written whole and sealed
    assert (out / "tokenizer.json").is_file() and not (out / checkpoint.FINAL_STAGING).exists()
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_lora_cli_train_on_a_real_full_disk_prints_one_error_line(tmpfs, tiny_llama_dir, llama_shards, monkeypatch,
                                                                   capsys):
    from lora_cli.main import main

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    mnt = tmpfs(AT_OPTIMIZER)
    out = mnt / "run"
    args = ["train", "--model", str(tiny_llama_dir), "--shards", str(llama_shards), "--output", str(out),
            "--backend", "peft", "--lora-r", "16", "--lora-alpha", "32", "--target-modules", ",".join(RUN[
                "target_modules"]), "--learning-rate", "5e-3", "--warmup-steps", "2", "--max-steps", "4",
            "--micro-batch-size", "2", "--gradient-accumulation-steps", "2", "--save-steps", "2",
            "--save-total-limit", "2", "--seed", "0", "--logging-steps", "1", "--max-seq-len", "128"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 1, res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in res.output, res.output
    assert errors[0].startswith("error: disk full (") and "checkpoint-2 is intact" in errors[0], errors[0]
    _assert_only_checkpoint_2_left_and_it_loads(out, tiny_llama_dir)

    _grow(mnt, "4m")
    capsys.readouterr()
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert f"resuming from {out / 'checkpoints' / 'checkpoint-2'} (step 2" in res.output + capsys.readouterr().out
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]


def test_a_final_save_that_did_not_finish_is_refused_even_over_an_earlier_runs_whole_adapter(tmp_path):
    """A resumed, finished run whose final save fails keeps the previous run's adapter files in the directory:
    they are whole, so without a mark a merge would take them for this run's adapter."""
    out = tmp_path / "run"
    out.mkdir()

    def first(d):
        (d / "adapter_config.json").write_text("{}")
        (d / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")

    checkpoint.write_final_adapter(out, first, None)
    checkpoint.check_adapter(out)  # the first run's adapter: whole and sealed

    def failing(d):
        raise RuntimeError("the save failed")

    with pytest.raises(RuntimeError, match="the save failed"):
        checkpoint.write_final_adapter(out, failing, None)
    assert (out / "adapter_config.json").is_file() and not (out / checkpoint.FINAL_STAGING).exists()
    with pytest.raises(CheckpointError, match="the final adapter's save did not finish"):
        checkpoint.check_adapter(out)
    checkpoint.write_final_adapter(out, first, None)  # the same call again
    checkpoint.check_adapter(out)
