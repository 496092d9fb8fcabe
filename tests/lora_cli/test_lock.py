"""Issue 17.3: one training run per output dir. A second `train` on the same --output fails at once with one `error:`
line naming the first run's pid; the lock dies with its process (a SIGKILL leaves nothing that blocks the next run)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import _tiny
import pytest
from click.testing import CliRunner
from lora_cli.main import main

pytestmark = pytest.mark.slow


def test_a_second_train_on_the_same_output_fails_naming_the_first(tiny_llama_dir, tmp_path, monkeypatch):
    data = _tiny.write_jsonl(tmp_path / "chat.jsonl", _tiny.chat_records(24, seed=1))
    out = tmp_path / "run"
    args = ["train", "--model", str(tiny_llama_dir), "--data", str(data), "--output", str(out), "--backend", "peft",
            "--no-bf16", "--max-seq-len", "128", "--max-steps", "100000", "--save-steps", "100000",
            "--data-output-dir", str(tmp_path / "cache")]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")} | {"CUDA_VISIBLE_DEVICES": ""}
    first = subprocess.Popen([sys.executable, "-m", "lora_cli", *args], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not ((out / ".lock").is_file() and f"pid {first.pid}" in (out / ".lock").read_text()):
            assert first.poll() is None and time.monotonic() < deadline, "the first run never took the lock"
            time.sleep(0.2)
        monkeypatch.delenv("RANK", raising=False)
        monkeypatch.delenv("WORLD_SIZE", raising=False)
        t0 = time.monotonic()
        res = CliRunner().invoke(main, [*args, "--max-steps", "2"])  # bounded, should it not be refused
        assert time.monotonic() - t0 < 30
        assert res.exit_code == 1, res.output
        (line,) = [x for x in res.output.splitlines() if x.startswith("error: ")]
        assert f"in use by pid {first.pid} (training" in line and "Traceback" not in res.output
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    from lora_runtime.checkpoint import output_lock

    with output_lock(out):  # SIGKILL released it: nothing stale
        assert f"pid {os.getpid()}" in (out / ".lock").read_text()
