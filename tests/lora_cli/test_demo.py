"""`lora-cli demo` end to end (cut short by LORA_CLI_DEMO_STEPS), its assets, and the console script in a subprocess."""

from __future__ import annotations

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


def test_console_script_subprocess():
    """The installed `lora-cli` entry point starts (lazily: no torch import for --help)."""
    exe = Path(sys.executable).with_name("lora-cli")
    proc = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert all(c in proc.stdout for c in ("demo", "inspect", "merge", "prepare", "train"))
    proc = subprocess.run([str(exe), "train", "--no-such-option"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "No such option" in proc.stderr


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, monkeypatch):
    """The README's first command, in-process (the torch/transformers imports are shared with the other tests)."""
    from click.testing import CliRunner
    from lora_cli.main import main

    monkeypatch.setenv("LORA_CLI_DEMO_STEPS", str(DEMO_STEPS))
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(main, ["demo"])
    out = res.output
    assert res.exit_code == 0, out[-5000:]
    for stage in ("[1/4] base model", "[2/4] data: capitals.jsonl", "[3/4] training", "[4/4] done: 20 steps"):
        assert stage in out, out
    before, after = map(float, re.search(r"answers: ([\d.]+) \(base\) → ([\d.]+) \(trained\)", out).groups())
    assert after < before - 1.0, out
    run = tmp_path / "runs" / "demo" / "run"  # the default --out
    for line, path in (("adapter", run / "adapter_config.json"), ("metrics", run / "metrics.jsonl"),
                       ("loss plot", run / "loss.png")):
        assert f"{line}:" in out and Path(path).is_file(), path
    answers = re.findall(r"trained: '(.*)'", out)
    assert len(answers) == 3 and len(re.findall(r"base: +'(.*)'", out)) == 3
    assert answers[0].startswith("The capital of"), out  # the answer template is learned within 20 steps


@pytest.mark.parametrize(("args", "env"), [(["--max-steps", "0"], {}), ([], {"LORA_CLI_DEMO_STEPS": "abc"})])
def test_a_demo_step_count_that_is_not_one_or_more_is_a_usage_error(args, env, tmp_path, monkeypatch):
    """0 ran the whole schedule; a non-number in the environment was a traceback; -1 was refused after the model
    and the data were built."""
    from click.testing import CliRunner
    from lora_cli.main import main

    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(main, ["demo", *args], env=env)
    assert res.exit_code == 2 and "--max-steps" in res.output and not (tmp_path / "runs").exists(), res.output
