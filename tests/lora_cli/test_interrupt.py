"""Ctrl-C during `lora-cli train`: the step finishes, a checkpoint is saved, exit 130; the same command resumes."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys

import _tiny
import lora_runtime
import pytest
from click.testing import CliRunner
from lora_cli.main import main

pytestmark = pytest.mark.slow


@pytest.fixture
def shards(tmp_path, tiny_llama_dir):
    import lora_data

    data = _tiny.write_jsonl(tmp_path / "chat.jsonl", _tiny.chat_records(40, seed=5))
    lora_data.prepare(data, tmp_path / "shards", tiny_llama_dir, max_seq_len=128)
    return tmp_path / "shards"


def test_sigint_saves_a_checkpoint_and_the_same_command_resumes(tiny_llama_dir, shards, tmp_path, monkeypatch):
    from transformers import TrainerCallback

    real = lora_runtime.run
    handler_before = signal.getsignal(signal.SIGINT)  # SIG_IGN where the suite runs as a background job

    class SigintAtStep3(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                os.kill(os.getpid(), signal.SIGINT)  # what a Ctrl-C on the terminal delivers

    def with_sigint(config):
        return real(dataclasses.replace(config, callbacks=[SigintAtStep3(), *config.callbacks]))

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(lora_runtime, "run", with_sigint)
    out = tmp_path / "run"
    args = ["train", "--model", str(tiny_llama_dir), "--shards", str(shards), "--output", str(out), "--backend",
            "peft", "--no-bf16", "--micro-batch-size", "1", "--max-steps", "6", "--save-steps", "100"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 130, res.output
    assert f"stopped by SIGINT after step 3; a checkpoint is saved in {out}" in res.output
    assert (out / "checkpoints" / "checkpoint-3" / "COMPLETE").is_file()
    assert not (out / "adapter_model.safetensors").exists(), "a stopped run must not leave an adapter that looks final"
    assert "adapter:  (none yet: stopped early" in res.output
    assert signal.getsignal(signal.SIGINT) is handler_before  # the handler was put back

    monkeypatch.setattr(lora_runtime, "run", real)
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "6 steps" in res.output
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]  # resumed at 4, nothing doubled


def test_a_finished_run_continued_and_stopped_leaves_no_final_adapter_that_merge_takes(tiny_llama_dir, shards,
                                                                                       tmp_path, monkeypatch):
    """Finished at step 3, continued to 6 and stopped after 5: the step-3 adapter stayed sealed, and merge and chat
    took it for the run's, which had said "adapter: (none yet: stopped early"."""
    import lora_data
    from lora_runtime.checkpoint import check_adapter
    from lora_runtime.errors import CheckpointError

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    out = tmp_path / "run"
    args = ["train", "--model", str(tiny_llama_dir), "--shards", str(shards), "--output", str(out), "--backend",
            "peft", "--no-bf16", "--micro-batch-size", "1", "--save-steps", "100"]
    assert CliRunner().invoke(main, [*args, "--max-steps", "3"]).exit_code == 0
    check_adapter(out)
    _signal_at_step(monkeypatch, 5, signal.SIGINT)
    res = CliRunner().invoke(main, [*args, "--max-steps", "6"])
    assert res.exit_code == 130, res.output
    with pytest.raises(CheckpointError, match=r"its final adapter is of step 3, but the run trained on to step 5 and "
                                              r"stopped before writing its own: merge the newest complete checkpoint "
                                              r"instead \(.*checkpoint-5\)"):
        check_adapter(out)
    with lora_data.locked(out, what="training"), pytest.raises(
            CheckpointError, match=r"its final adapter is of step 3, and a run is training on there \(pid \d+ "
                                   r"\(training: .*\)\): wait for it to finish, or merge its newest complete "
                                   r"checkpoint \(.*checkpoint-5\)"):
        check_adapter(out)  # while the continued run still trains: it has not "stopped"


def _signal_at_step(monkeypatch, step: int, sig: signal.Signals) -> None:
    """Patch lora_runtime.run: `sig` to this process after optimizer step `step` (as a terminal or scheduler would)."""
    from transformers import TrainerCallback

    real = lora_runtime.run

    class SignalAtStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == step:
                os.kill(os.getpid(), sig)

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(lora_runtime, "run",
                        lambda config: real(dataclasses.replace(config, callbacks=[SignalAtStep(), *config.callbacks])))


def _signals_at_step_3(monkeypatch, pause_s: float):
    """Patch lora_runtime.run: after step 3, SIGINT, `pause_s` seconds, SIGINT again (to this process)."""
    import time

    from transformers import TrainerCallback

    real = lora_runtime.run

    class TwoSigints(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(pause_s)
                os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(lora_runtime, "run",
                        lambda config: real(dataclasses.replace(config, callbacks=[TwoSigints(), *config.callbacks])))


def _args(model, shards, out, *extra):
    return ["train", "--model", str(model), "--shards", str(shards), "--output", str(out), "--backend", "peft",
            "--no-bf16", "--micro-batch-size", "1", "--max-steps", "6", *extra]


def test_a_stop_delivered_twice_still_saves(tiny_llama_dir, shards, tmp_path, monkeypatch):
    """`uv run` without a terminal: the process group's SIGINT and uv's forwarded copy arrive together."""
    _signals_at_step_3(monkeypatch, pause_s=0.1)
    out = tmp_path / "run"
    res = CliRunner().invoke(main, _args(tiny_llama_dir, shards, out, "--save-steps", "100"))
    assert res.exit_code == 130, res.output
    assert "SIGINT again: already stopping after this step" in res.output
    assert f"stopped by SIGINT after step 3; a checkpoint is saved in {out} (checkpoint-3)" in res.output
    assert (out / "checkpoints" / "checkpoint-3" / "COMPLETE").is_file()


def test_a_later_repeat_aborts_and_names_the_step_the_next_run_resumes_from(tiny_llama_dir, shards, tmp_path,
                                                                            monkeypatch):
    from lora_cli import stop

    monkeypatch.setattr(stop, "DUPLICATE_S", 0.2)
    _signals_at_step_3(monkeypatch, pause_s=0.5)
    out = tmp_path / "run"
    res = CliRunner().invoke(main, _args(tiny_llama_dir, shards, out, "--save-steps", "2"))
    assert res.exit_code == 130, res.output
    assert ("aborted by a repeated SIGINT before a checkpoint was written; the same command resumes from "
            f"{out / 'checkpoints' / 'checkpoint-2'} (step 2)") in res.output
    assert not (out / "checkpoints" / "checkpoint-3").exists()


def test_a_stop_at_the_last_step_is_a_finished_run(tiny_llama_dir, shards, tmp_path, monkeypatch):
    """The run finishes its last step and writes its adapter whatever arrives then: exit 0, not "resume"."""
    _signal_at_step(monkeypatch, 6, signal.SIGTERM)
    out = tmp_path / "run"
    res = CliRunner().invoke(main, _args(tiny_llama_dir, shards, out))
    assert res.exit_code == 0, res.output
    assert "SIGTERM arrived after the last step began; the run finished" in res.output and "resume" not in res.output
    assert (out / "adapter_model.safetensors").is_file()
    res = CliRunner().invoke(main, [*_args(tiny_llama_dir, shards, tmp_path / "run2"), "--no-save-model"])
    assert res.exit_code == 0 and "the run finished" in res.output, res.output  # no adapter asked for
    assert "adapter:  (none: save_model was off; the checkpoints hold adapters)" in res.output  # not "stopped early"


def test_ranks_agree_on_a_stop_a_step_late_except_at_the_end(monkeypatch):
    """Over NCCL the agreed stop flag is read a step late (no step waits for the device): the first step reads
    nothing, a flag raised at step 2 stops step 3; read at once (the run's last two steps, and gloo) it stops at
    once. Two ranks are faked here: the all-reduce of one process's flag is that flag."""
    import torch.distributed as dist
    from lora_cli.stop import _AnyRank

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *a: 2)
    monkeypatch.setattr(dist, "get_backend", lambda *a: "gloo")
    monkeypatch.setattr(dist, "all_reduce", lambda t, op=None: None)
    late = _AnyRank(late=True)
    assert [late(flag) for flag in (False, True, True)] == [False, False, True]
    late = _AnyRank(late=True)
    assert late(False) is False and late(True, at_once=True) is True
    assert _AnyRank()(True) is True  # gloo: at once



@pytest.mark.skipif(sys.platform == "win32", reason="a pseudo-terminal")
def test_a_closed_terminal_stops_the_run_with_a_checkpoint(tiny_llama_dir, shards, tmp_path, monkeypatch):
    """The terminal a run prints to goes away (an ssh session drops): SIGHUP, and every later write to it fails with
    EIO. Before: SIGHUP killed the run without a checkpoint, and the stop's own message raised EIO out of the step."""
    import pty
    import select
    import threading

    from transformers import TrainerCallback

    master, terminal = pty.openpty()
    hang_up = threading.Event()

    def read_the_terminal() -> None:
        """Drains the terminal until the hang-up, then closes it: this thread alone uses the descriptor (a read of a
        number closed elsewhere could take another file's bytes once the number is reused)."""
        while not hang_up.is_set():
            if select.select([master], [], [], 0.05)[0]:
                os.read(master, 4096)
        os.close(master)  # the terminal hangs up: writes to it fail with EIO from here on

    reader = threading.Thread(target=read_the_terminal, daemon=True)

    class HangUp(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                hang_up.set()
                reader.join()
            if state.global_step == 3:
                os.kill(os.getpid(), signal.SIGHUP)  # what the closed terminal sends

    real = lora_runtime.run
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(lora_runtime, "run",
                        lambda config: real(dataclasses.replace(config, callbacks=[HangUp(), *config.callbacks])))
    reader.start()
    with open(terminal, "w", buffering=1) as tty:
        monkeypatch.setattr(sys, "stdout", tty)
        monkeypatch.setattr(sys, "stderr", tty)
        out = tmp_path / "run"
        before = signal.signal(signal.SIGHUP, signal.SIG_DFL)  # as in a terminal (not ignored, as under nohup)
        try:
            with pytest.raises(SystemExit) as stopped:
                main(_args(tiny_llama_dir, shards, out, "--save-steps", "100"))
        finally:
            signal.signal(signal.SIGHUP, before)
    assert stopped.value.code == 130
    assert (out / "checkpoints" / "checkpoint-3" / "COMPLETE").is_file()
    assert not (out / "adapter_model.safetensors").exists()
