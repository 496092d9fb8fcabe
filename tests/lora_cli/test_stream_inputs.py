"""Issue 17.5: `lora-cli train --data` with a named pipe or stdin (`-`) was refused as "does not exist". Training
reads its data twice (the cache key hashes the bytes, then the records are prepared), so it says they are not
supported and how to train on them: `prepare` reads both (tests/lora_data/test_output_dir.py)."""

from __future__ import annotations

import os

import pytest
from click.testing import CliRunner
from lora_cli.main import main


@pytest.mark.parametrize("kind", ["fifo", "stdin"])
def test_train_on_a_named_pipe_or_stdin_says_it_is_not_supported_and_what_to_do(kind, tiny_llama_dir, tmp_path,
                                                                                 monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    data = "-"
    if kind == "fifo":
        data = str(tmp_path / "pipe.jsonl")
        os.mkfifo(data)
    out = tmp_path / "run"
    res = CliRunner().invoke(main, ["train", "--model", str(tiny_llama_dir), "--data", data, "--output", str(out),
                                    "--data-output-dir", str(tmp_path / "cache"), "--backend", "peft", "--no-bf16"],
                             input="")
    assert res.exit_code == 1, res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in res.output, res.output
    assert errors[0].startswith(f"error: --data={data} ") and "does not exist" not in errors[0], errors[0]
    assert "is not read by train" in errors[0] or "is not a regular file" in errors[0], errors[0]
    assert "`lora-cli prepare - OUT --tokenizer MODEL` reads stdin" in errors[0], errors[0]
    assert not out.exists()
