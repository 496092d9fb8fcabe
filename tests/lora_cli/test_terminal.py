"""What a training run prints, through `lora-cli train` and `lora_sft` alike: one progress bar on a terminal, one
plain line per log elsewhere, and never transformers' raw log dicts (`{'loss': ...}`) or its end-of-run summary
(`{'train_runtime': ...}`)."""

from __future__ import annotations

import io
import sys

import _tiny
import lora_runtime
import pytest
from click.testing import CliRunner
from lora_cli.main import main

pytestmark = pytest.mark.slow
RUN = {"backend": "peft", "max_steps": 4, "logging_steps": 1, "micro_batch_size": 2, "max_seq_len": 128, "bf16": False,
       "save_steps": 100}
RAW = ("{'loss'", "'train_runtime'", "{'eval_loss'")


@pytest.fixture
def data(tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("LORA_DATA_CACHE", str(tmp_path / "cache"))
    return _tiny.write_jsonl(tmp_path / "chat.jsonl", _tiny.chat_records(16, seed=6))


def test_lora_cli_train_prints_one_line_per_log_and_no_raw_dicts(tiny_llama_dir, data, tmp_path):
    args = ["train", "--model", str(tiny_llama_dir), "--data", str(data), "--output", str(tmp_path / "o")]
    for key, value in RUN.items():
        args += [f"--{key.replace('_', '-')}", str(value)] if value is not False else [f"--no-{key.replace('_', '-')}"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert not [raw for raw in RAW if raw in res.output], res.output
    steps = [line for line in res.output.splitlines() if line.startswith("step ")]
    assert [s.split(":")[0] for s in steps] == [f"step {i}/4" for i in range(1, 5)], res.output
    assert all("tokens/s" in s and " left" in s for s in steps)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_lora_sft_on_a_terminal_shows_one_bar_and_no_raw_dicts(tiny_llama_dir, data, tmp_path, monkeypatch, capsys):
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    lora_runtime.lora_sft(str(tiny_llama_dir), str(data), str(tmp_path / "o"), **RUN,
                          eval_data_path=str(data), eval_steps=2)
    err, out = terminal.getvalue(), capsys.readouterr().out
    assert not [raw for raw in RAW if raw in out + err], out + err
    assert "training: 100%" in err and "4/4" in err and "loss=" in err and "tok/s=" in err
    assert not [line for line in (out + err).splitlines() if line.startswith("step ")]  # the bar, not log lines
