"""Issue 18.2: a resumed run compares its config with the checkpoint's. What may change (max_steps, the learning-rate
schedule, logging cadence, ...) is applied and logged; what the checkpoint fixes (rank, targets, model, data, seed,
rows per step, ...) is one issue per setting, naming both values and how to start fresh, before the model loads."""

from __future__ import annotations

import _runs
import _shards
import pytest
from lora_runtime import ConfigError
from lora_runtime.api import lora_sft
from lora_runtime.errors import CheckpointError
from lora_runtime.metrics import read_metrics

pytestmark = pytest.mark.slow
BASE = {**_runs.RUN, "save_steps": 4, "save_total_limit": None, "warmup_steps": 2}


def _lrs(result) -> dict[int, float]:
    return {r["step"]: r["lr"] for r in read_metrics(result.metrics_path) if "loss" in r}


@pytest.fixture(scope="module")
def finished_at_4(tmp_path_factory, tiny_llama_dir, llama_shards):
    out = tmp_path_factory.mktemp("resume_changes") / "run"
    lora_sft(str(tiny_llama_dir), str(llama_shards), str(out), **{**BASE, "max_steps": 4})
    return out


def test_a_longer_run_with_a_new_learning_rate_follows_the_new_schedule(finished_at_4, tiny_llama_dir, llama_shards,
                                                                       tmp_path, capsys):
    """Extending max_steps 4 → 8 and raising learning_rate: steps 5-8 get exactly the learning rates of an
    uninterrupted 8-step run at the new rate (before: step 5 ran at lr 0 and the old rate was kept)."""
    import shutil

    new = {**BASE, "max_steps": 8, "learning_rate": 1e-2}
    whole = lora_sft(str(tiny_llama_dir), str(llama_shards), str(tmp_path / "whole"), **new)
    out = tmp_path / "extended"
    shutil.copytree(finished_at_4, out)
    capsys.readouterr()
    resumed = lora_sft(str(tiny_llama_dir), str(llama_shards), str(out), **new)
    log = capsys.readouterr().out
    assert "resume: changed since checkpoint-4, applied: " in log
    assert "max_steps: 4 → 8" in log and "learning_rate: 0.005 → 0.01" in log
    expected, got = _lrs(whole), _lrs(resumed)  # the lr each step ran at
    assert sorted(got) == list(range(1, 9))
    for step in range(5, 9):
        assert got[step] == pytest.approx(expected[step], rel=1e-9), (step, got, expected)
    assert got[5] > 0


def test_a_new_logging_cadence_applies_after_the_resume(finished_at_4, tiny_llama_dir, llama_shards, tmp_path):
    import shutil

    out = tmp_path / "cadence"
    shutil.copytree(finished_at_4, out)
    resumed = lora_sft(str(tiny_llama_dir), str(llama_shards), str(out), **{**BASE, "max_steps": 8, "logging_steps": 2})
    assert sorted(_lrs(resumed)) == [1, 2, 3, 4, 6, 8]  # the checkpoint's trainer state said every step


@pytest.mark.parametrize(("change", "name", "old", "new"), [
    ({"lora_r": 8}, "lora_r", 16, 8),
    ({"target_modules": ["q_proj", "v_proj"]}, "target_modules", _runs.TARGETS, ["q_proj", "v_proj"]),
    ({"seed": 1}, "seed", 0, 1),
])
def test_a_setting_the_checkpoint_fixes_is_one_issue_naming_both_values(finished_at_4, tiny_llama_dir, llama_shards,
                                                                        change, name, old, new):
    before = sorted(p.name for p in finished_at_4.rglob("*"))
    with pytest.raises(ConfigError) as e:
        lora_sft(str(tiny_llama_dir), str(llama_shards), str(finished_at_4), **{**BASE, "max_steps": 8, **change})
    (issue,) = e.value.issues
    assert issue.startswith(f"`{name}` is {new!r} now but {finished_at_4 / 'checkpoints' / 'checkpoint-4'} was "
                            f"trained with {old!r}; it cannot change on resume"), issue
    assert "start fresh with the new one in a new `ckpt_output_dir`" in issue
    assert sorted(p.name for p in finished_at_4.rglob("*")) == before


def test_the_same_target_modules_in_another_order_resume(finished_at_4, tiny_llama_dir, llama_shards, tmp_path, capsys):
    """PEFT matches target_modules as a set: the same names listed in another order (a config file written by hand
    or by another tool) were refused as a change."""
    import shutil

    out = tmp_path / "reordered"
    shutil.copytree(finished_at_4, out)
    capsys.readouterr()
    resumed = lora_sft(str(tiny_llama_dir), str(llama_shards), str(out),
                       **{**BASE, "max_steps": 5, "target_modules": list(reversed(_runs.TARGETS))})
    assert resumed.steps == 5 and "target_modules: " not in capsys.readouterr().out  # not even "applied"


def test_a_merge_of_an_earlier_finish_goes_once_the_run_trains_further(finished_at_4, tiny_llama_dir, llama_shards,
                                                                        tmp_path, capsys):
    """save_merged=True at step 4, then the run continued to step 5 without it: `merged/` still held step 4's model
    beside step 5's adapter, and nothing said so (its logits off by 0.1 from base + adapter)."""
    import shutil

    out = tmp_path / "merged_then_more"
    shutil.copytree(finished_at_4, out)
    lora_sft(str(tiny_llama_dir), str(llama_shards), str(out), **{**BASE, "max_steps": 4, "save_merged": True})
    assert (out / "merged" / "MERGED_BY_LORA_SFT").is_file()
    lora_sft(str(tiny_llama_dir), str(llama_shards), str(out), **{**BASE, "max_steps": 4})  # nothing trained: kept
    assert (out / "merged" / "MERGED_BY_LORA_SFT").is_file()
    capsys.readouterr()
    lora_sft(str(tiny_llama_dir), str(llama_shards), str(out), **{**BASE, "max_steps": 5})
    assert not (out / "merged").exists()
    assert f"removed {out / 'merged'}: a merge of an earlier adapter of this run, not this one (step 5)" in \
        capsys.readouterr().out
    from lora_runtime import merge_adapter  # a merge of another run's adapter put there by hand: left, and named

    merge_adapter(finished_at_4, tiny_llama_dir, out / "merged")
    lora_sft(str(tiny_llama_dir), str(llama_shards), str(out), **{**BASE, "max_steps": 6})
    assert (out / "merged" / "MERGED_BY_LORA_SFT").is_file()
    assert f"warning: {out / 'merged'} holds a merge of another adapter than this run's (step 6)" in \
        capsys.readouterr().out


def test_another_base_model_is_refused_whatever_its_path(finished_at_4, tiny_llama_dir, llama_shards, tmp_path,
                                                         monkeypatch):
    """The checkpoint records the model's identity (config.json and weights), not the path's text: other weights
    under the path the run was given are refused, and the same model reached by a relative path is the same."""
    import shutil

    from safetensors.torch import load_file, save_file

    ckpt = finished_at_4 / "checkpoints" / "checkpoint-4"
    other = tmp_path / "other-model"  # the same tokenizer, so the shards pass: only the resume check can refuse it
    shutil.copytree(tiny_llama_dir, other)
    weights = load_file(other / "model.safetensors")
    name = sorted(weights)[len(weights) // 2]
    save_file({**weights, name: weights[name] + 1}, other / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConfigError) as e:
        lora_sft(str(other), str(llama_shards), str(finished_at_4), **{**BASE, "max_steps": 8})
    (issue,) = e.value.issues
    assert issue.startswith(f"`model_path` {str(other)!r} is not the model {ckpt} was trained with (then "
                            f"{str(tiny_llama_dir)!r}): its config.json or weights differ; it cannot change on resume")
    copy = tmp_path / "run"  # the finished run, resumed where it ended: nothing left to train
    shutil.copytree(finished_at_4, copy, ignore=shutil.ignore_patterns(".lock"))
    monkeypatch.chdir(tiny_llama_dir.parent)
    record = (copy / "lora_sft_config.json").read_bytes()
    assert lora_sft(tiny_llama_dir.name, str(llama_shards), str(copy),
                    **{**BASE, "max_steps": 4, "learning_rate": 7e-3}).steps == 4
    # a setting changed since trained nothing: the record and the card keep what the adapter was trained with (they
    # said learning rate 0.007)
    assert (copy / "lora_sft_config.json").read_bytes() == record
    assert "| learning rate | 0.007 |" not in (copy / "README.md").read_text()


def test_a_record_left_from_an_earlier_finish_is_written_again(finished_at_4, tiny_llama_dir, llama_shards, tmp_path,
                                                              monkeypatch):
    """Continued from 4 to 8 at a new rate, the disk fills after the adapter is sealed, before the run record: the
    same call again writes the record (it kept the step-4 finish's, and the card described that run)."""
    import errno
    import json
    import shutil

    from lora_runtime import checkpoint

    out = tmp_path / "continued"
    shutil.copytree(finished_at_4, out)
    real = checkpoint.write_json_atomic

    def full(path, obj):
        if path == out / checkpoint.CONFIG_NAME:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, obj)

    call = {**BASE, "max_steps": 8, "learning_rate": 7e-3}
    monkeypatch.setattr(checkpoint, "write_json_atomic", full)
    with pytest.raises(CheckpointError, match="after the final adapter was written and sealed"):
        lora_sft(str(tiny_llama_dir), str(llama_shards), str(out), **call)
    monkeypatch.setattr(checkpoint, "write_json_atomic", real)
    assert lora_sft(str(tiny_llama_dir), str(llama_shards), str(out), **call).steps == 8
    record = json.loads((out / checkpoint.CONFIG_NAME).read_text())
    assert (record["max_steps"], record["learning_rate"]) == (8, 7e-3), record  # were 4 and 5e-3
    assert record["resolved"]["step"] == 8
    assert "| learning rate | 0.007 |" in (out / "README.md").read_text()


def test_other_data_is_refused(finished_at_4, tiny_llama_dir, llama_shards, tmp_path):
    """Naming the data the run trained on; no guess at an upgrade of lora-data, which fits the same file only."""
    other = _shards.chat_shards(tmp_path / "other", tiny_llama_dir, n=30, seq_len=128, seed=7)
    with pytest.raises(ConfigError, match=rf"the data {other} is other than .*checkpoint-4 was trained on "
                                          rf"\({llama_shards}: shards \w+, now \w+\); it cannot change") as e:
        lora_sft(str(tiny_llama_dir), str(other), str(finished_at_4), **{**BASE, "max_steps": 8})
    assert "upgrade" not in str(e.value)


def test_rows_per_step_are_fixed(finished_at_4, tiny_llama_dir, llama_shards):
    with pytest.raises(ConfigError, match=r"rows per optimizer step .* are 2 now but .* trained with 4; .*"
                                          "pass `effective_batch_size`=4"):
        lora_sft(str(tiny_llama_dir), str(llama_shards), str(finished_at_4),
                 **{**BASE, "max_steps": 8, "gradient_accumulation_steps": 1})


def test_resume_from_an_explicit_checkpoint(finished_at_4, tiny_llama_dir, llama_shards, tmp_path):
    """resume_from=PATH continues another directory's checkpoint in a new output dir."""
    ckpt = finished_at_4 / "checkpoints" / "checkpoint-4"
    out = tmp_path / "continued"
    res = lora_sft(str(tiny_llama_dir), str(llama_shards), str(out), **{**BASE, "max_steps": 6},
                   resume_from=str(ckpt))
    assert res.steps == 6
    assert [r["step"] for r in read_metrics(res.metrics_path) if "loss" in r] == [5, 6]
    assert (finished_at_4 / "checkpoints" / "checkpoint-4" / "COMPLETE").is_file()
    # the same call again (as a stopped run's message says to) goes on from this run's own checkpoints: it was
    # refused, the dir holding checkpoints later than resume_from
    again = lora_sft(str(tiny_llama_dir), str(llama_shards), str(out), **{**BASE, "max_steps": 6},
                     resume_from=str(ckpt))
    assert again.steps == 6 and [r["step"] for r in read_metrics(res.metrics_path) if "loss" in r] == [5, 6]
    with pytest.raises(ConfigError, match="is not a complete checkpoint"):
        lora_sft(str(tiny_llama_dir), str(llama_shards), str(out), **BASE, resume_from=str(tmp_path))


def test_the_same_call_goes_on_after_its_resume_from_was_rotated_away(finished_at_4, tiny_llama_dir, llama_shards,
                                                                     tmp_path):
    """resume_from a checkpoint of the run's own dir with save_total_limit=1: its next save rotates resume_from away,
    and the same call again (as a stop's message says) failed validation: "not a complete checkpoint"."""
    import shutil

    out = tmp_path / "rolled"
    shutil.copytree(finished_at_4, out)
    call = {**BASE, "max_steps": 8, "save_total_limit": 1, "resume_from": str(out / "checkpoints" / "checkpoint-4")}
    assert lora_sft(str(tiny_llama_dir), str(llama_shards), str(out), **call).steps == 8
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-8"]
    again = lora_sft(str(tiny_llama_dir), str(llama_shards), str(out), **call)
    assert again.steps == 8 and [r["step"] for r in read_metrics(again.metrics_path) if "loss" in r] == [*range(1, 9)]


def test_resume_from_an_older_checkpoint_beside_later_ones_is_refused(finished_at_4, tiny_llama_dir, llama_shards,
                                                                       tmp_path):
    """The resumed run's saves of steps the directory already holds would be dropped (the earlier checkpoint of a
    step is kept), and a later resume would continue the old run: refused before training, nothing changed."""
    import shutil

    out = tmp_path / "older"
    shutil.copytree(finished_at_4, out)
    later = out / "checkpoints" / "checkpoint-8"
    shutil.copytree(out / "checkpoints" / "checkpoint-4", later)  # a stand-in for the run's step 8
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    with pytest.raises(CheckpointError, match=r"resume_from=.*checkpoint-4 is step 4, but .* already holds later "
                                              r"checkpoints \(checkpoint-8\)"):
        lora_sft(str(tiny_llama_dir), str(llama_shards), str(out), **{**BASE, "max_steps": 8},
                 resume_from=str(out / "checkpoints" / "checkpoint-4"))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before
    elsewhere = tmp_path / "best"  # a copy under any name: its step is the marker's
    shutil.copytree(out / "checkpoints" / "checkpoint-4", elsewhere)
    with pytest.raises(CheckpointError, match=r"best is step 4, .*Drop resume_from to continue from checkpoint-8"):
        lora_sft(str(tiny_llama_dir), str(llama_shards), str(out), **{**BASE, "max_steps": 8}, resume_from=str(elsewhere))
    res = lora_sft(str(tiny_llama_dir), str(llama_shards), str(tmp_path / "fresh"), **{**BASE, "max_steps": 6},
                   resume_from=str(out / "checkpoints" / "checkpoint-4"))  # a new directory: resumed as before
    assert res.steps == 6


def test_resume_from_another_dirs_checkpoint_into_a_dir_holding_a_run_is_refused(finished_at_4, tiny_llama_dir,
                                                                                  llama_shards, tmp_path):
    """Before, the dir's earlier run (its metrics rows, its checkpoint-4) was kept beside the resumed one: metrics,
    train_loss, the card and the plot mixed two runs. A dir whose only rows are this resume's (a crash before its
    first checkpoint) continues as before."""
    import json
    import shutil

    import lora_data
    from lora_runtime.checkpoint import LOCK_WHAT

    elsewhere = tmp_path / "best"
    shutil.copytree(finished_at_4 / "checkpoints" / "checkpoint-4", elsewhere)
    taken = tmp_path / "taken"
    shutil.copytree(finished_at_4, taken, ignore=shutil.ignore_patterns(".lock"))
    before = (taken / "metrics.jsonl").read_bytes()
    with pytest.raises(CheckpointError, match=r"best is another run's checkpoint \(step 4\), but .*taken holds a run "
                                              r"of its own \(checkpoint-4, metrics.jsonl rows of steps 1-4\)"):
        lora_sft(str(tiny_llama_dir), str(llama_shards), str(taken), **{**BASE, "max_steps": 6},
                 resume_from=str(elsewhere))
    assert (taken / "metrics.jsonl").read_bytes() == before
    crashed = tmp_path / "crashed"  # what a run killed before its first checkpoint leaves: its lock and its rows
    with lora_data.locked(crashed, what=LOCK_WHAT):
        pass
    (crashed / "metrics.jsonl").write_text(json.dumps({"step": 4, "resumed_at": 4}) + "\n" +
                                           json.dumps({"step": 5, "loss": 1.0}) + "\n")
    res = lora_sft(str(tiny_llama_dir), str(llama_shards), str(crashed), **{**BASE, "max_steps": 6},
                   resume_from=str(elsewhere))
    assert [r["step"] for r in read_metrics(res.metrics_path)] == [4, 5, 6], read_metrics(res.metrics_path)


def test_summary_figures_cover_the_whole_run_after_a_resume(tiny_llama_dir, llama_shards, tmp_path, capsys):
    """Issue 18.3: stopped after step 3 and resumed to 6: train_loss (TrainResult, and the summary transformers hands
    the integrations) is the mean of all 6 logged losses, not this session's sum over all steps; no raw dicts."""
    from transformers import TrainerCallback

    summaries = []

    class Summary(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "train_loss" in logs:
                summaries.append(logs["train_loss"])

    out = tmp_path / "run"
    run = {**BASE, "max_steps": 6, "save_steps": 100}
    lora_sft(str(tiny_llama_dir), str(llama_shards), str(out), **run, callbacks=[_runs.StopAt(3)])
    capsys.readouterr()
    result = lora_sft(str(tiny_llama_dir), str(llama_shards), str(out), **run, callbacks=[Summary()])
    captured = capsys.readouterr()
    losses = [r["loss"] for r in read_metrics(result.metrics_path) if "loss" in r]
    assert len(losses) == 6
    assert result.train_loss == pytest.approx(sum(losses) / 6, rel=1e-9)
    assert summaries == [pytest.approx(sum(losses) / 6, rel=1e-9)]
    assert result["train_loss"] == result.train_loss and result["final_loss"] == losses[-1] == result.final_loss
    assert "{'loss'" not in captured.out and "train_runtime" not in captured.out  # PrinterCallback is gone
    assert "step 6/6: loss " in captured.err and "tokens/s" in captured.err  # progress lines, stderr not a TTY


def test_a_result_is_readable_by_key(finished_at_4, tiny_llama_dir, llama_shards):
    result = lora_sft(str(tiny_llama_dir), str(llama_shards), str(finished_at_4), **{**BASE, "max_steps": 4})
    assert result["steps"] == 4 and result.get("eval_loss") is None and "final_loss" in result
    assert dict(result)["backend"] == "peft" and "model" not in result
    with pytest.raises(KeyError, match="training-hub's live 'model'"):
        result["model"]
