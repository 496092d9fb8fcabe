"""`--micro-batch-size` takes a number or auto (lora_runtime.batching decides auto when training starts)."""

from __future__ import annotations

import json

import pytest


@pytest.mark.parametrize(("arg", "value"), [("auto", "auto"), ("8", 8)])
def test_cli_parses_micro_batch_size(arg, value, tmp_path):
    from click.testing import CliRunner
    from lora_cli.main import main

    res = CliRunner().invoke(main, ["train", "--model", "m", "--data", "d.jsonl", "--output", str(tmp_path),
                                   "--micro-batch-size", arg, "--dry-run"])
    assert res.exit_code == 0, res.output
    assert f'"micro_batch_size": {json.dumps(value)}' in res.output
    assert ("micro auto" in res.output) == (value == "auto")


def test_cli_rejects_a_non_number(tmp_path):
    from click.testing import CliRunner
    from lora_cli.main import main

    res = CliRunner().invoke(main, ["train", "--model", "m", "--data", "d.jsonl", "--output", str(tmp_path),
                                   "--micro-batch-size", "lots"])
    assert res.exit_code == 2 and "expected a whole number or 'auto', got 'lots'" in res.output
