"""The progress bar `lora_sft` and `lora-cli train` share: on a terminal one bar with loss and tokens/s (tqdm adds
the ETA), else one plain line per log; rank 0 only."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from lora_runtime.progress import progress_callback


def _drive(cb, logs):
    state = SimpleNamespace(global_step=0, max_steps=4)
    cb.on_train_begin(None, state, None)
    for step in range(1, 5):
        state.global_step = step
        cb.on_step_end(None, state, None)
        cb.on_log(None, state, None, logs={**logs, "loss": 1.0 / step})
    cb.on_train_end(None, state, None)


def test_a_bar_on_a_terminal(capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    _drive(progress_callback(terminal=True), {"tokens_per_s": 1234.5, "learning_rate": 2e-4})
    err = capsys.readouterr().err
    assert "training: 100%" in err and "4/4" in err and "loss=0.250, tok/s=1,234" in err
    assert "step 4/4" not in err


def test_plain_lines_elsewhere_and_nothing_on_other_ranks(capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    _drive(progress_callback(terminal=False), {"tokens_per_s": 1234.5, "learning_rate": 2e-4})
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 4 and lines[-1].startswith("step 4/4: loss 0.2500, lr 0.0002, 1,234 tokens/s, 0:00:00 left")
    monkeypatch.setenv("RANK", "1")
    _drive(progress_callback(terminal=True), {})
    assert capsys.readouterr().err == ""


def test_a_nan_is_written_as_strict_json_and_never_plotted(tmp_path):
    """json.dumps writes NaN bare, which strict parsers (JSON.parse, serde_json) refuse: null instead."""
    import json
    import math

    from lora_runtime.metrics import MetricsWriter, plot_loss, run_summary

    w = MetricsWriter(tmp_path / "metrics.jsonl")
    w.write({"step": 1, "loss": 2.0, "grad_norm": 1.5})
    w.write({"step": 2, "loss": float("nan"), "grad_norm": float("inf")})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[1], parse_constant=lambda c: pytest.fail(f"{c} is not JSON")) == {
        "step": 2, "loss": None, "grad_norm": None}
    summary = run_summary(tmp_path / "metrics.jsonl")
    assert math.isnan(summary["final_loss"]) and summary["train_loss"] == 2.0  # the last loss logged was NaN
    assert plot_loss(tmp_path / "metrics.jsonl", tmp_path / "loss.png").is_file()


def test_a_run_resumed_from_another_runs_checkpoint_weighs_its_own_steps(tmp_path):
    """Resumed at step 2 from a checkpoint of another directory: the rows of steps 1-2 are there. The mean loss is
    over the steps logged here, the first of them covering step 3 alone."""
    from lora_runtime.metrics import MetricsWriter, run_summary

    w = MetricsWriter(tmp_path / "metrics.jsonl", resume_step=2)
    for step, loss in ((3, 4.0), (4, 2.0)):
        w.write({"step": step, "loss": loss})
    assert run_summary(tmp_path / "metrics.jsonl")["train_loss"] == 3.0
    w = MetricsWriter(tmp_path / "metrics.jsonl", resume_step=3)  # resumed again, here: its own rows are kept
    w.write({"step": 4, "loss": 2.0})
    assert run_summary(tmp_path / "metrics.jsonl")["train_loss"] == 3.0
