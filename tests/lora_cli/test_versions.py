"""`lora-cli --version` names all three packages; command summaries in `--help` are whole sentences."""

from __future__ import annotations

from importlib.metadata import version

import pytest
from click.testing import CliRunner
from lora_cli.main import main


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version_prints_the_three_packages(flag):
    res = CliRunner().invoke(main, [flag], catch_exceptions=False)
    assert res.exit_code == 0
    assert res.stdout.splitlines() == [f"{p} {version(p)}" for p in ("lora-cli", "lora-runtime", "lora-data")]


@pytest.mark.parametrize("command", ["merge", "chat"])
def test_the_summary_in_help_is_not_cut(command):
    res = CliRunner().invoke(main, ["--help"], terminal_width=80, catch_exceptions=False)
    line = next(ln for ln in res.stdout.splitlines() if ln.strip().startswith(command + " "))
    assert line.rstrip().endswith(".") and not line.rstrip().endswith("..."), line
