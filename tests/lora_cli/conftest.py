"""CLI test fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _in_a_scratch_dir_with_data(tmp_path_factory, monkeypatch):
    """Each test runs in a directory of its own (not its tmp_path) holding `d.jsonl`, the data file the tests'
    command lines name (--dry-run checks that the data is there)."""
    cwd = tmp_path_factory.mktemp("cwd")
    (cwd / "d.jsonl").write_text("")
    monkeypatch.chdir(cwd)
