"""`lora-cli demo` end to end: one real subprocess run (the README's first command), cut short by an env var."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from lora_cli.demo_run import MARKER, demo_assets, fresh_run_dir

DEMO_STEPS = 20


def test_demo_assets_are_small_and_complete():
    root = demo_assets()
    names = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    assert names == ["capitals.jsonl", "demo.yaml", "model/chat_template.jinja", "model/config.json",
                     "model/tokenizer.json", "model/tokenizer_config.json"]
    assert sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) < 300_000


def test_fresh_run_dir_recreates_only_its_own(tmp_path):
    run = fresh_run_dir(tmp_path / "demo")
    (run / "old.txt").write_text("from the last demo")
    fresh_run_dir(run)
    assert sorted(p.name for p in run.iterdir()) == [MARKER]
    (tmp_path / "mine").mkdir()
    with pytest.raises(FileExistsError, match="was not made by `lora-cli demo`"):
        fresh_run_dir(tmp_path / "mine")


@pytest.mark.slow
def test_demo_subprocess(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env["LORA_CLI_DEMO_STEPS"] = str(DEMO_STEPS)
    proc = subprocess.run([sys.executable, "-m", "lora_cli", "demo", "--out", str(tmp_path / "demo")], env=env,
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    out = proc.stdout
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    for stage in ("[1/4] base model", "[2/4] data: capitals.jsonl", "[3/4] training", "[4/4] done: 20 steps"):
        assert stage in out, out
    before, after = map(float, re.search(r"answers: ([\d.]+) \(base\) → ([\d.]+) \(trained\)", out).groups())
    assert after < before - 1.0, out
    run = tmp_path / "demo" / "run"
    for line, path in (("adapter", run / "adapter_config.json"), ("metrics", run / "metrics.jsonl"),
                       ("loss plot", run / "loss.png")):
        assert f"{line}:" in out and Path(path).is_file(), path
    answers = re.findall(r"trained: '(.*)'", out)
    assert len(answers) == 3 and len(re.findall(r"base: +'(.*)'", out)) == 3
    assert answers[0].startswith("The capital of"), out  # the answer template is learned within 20 steps
