"""Reliability tests: the training trials (`trials`, run once a session by `_zygote.py`), a shared `counts` record (inputs tried, kills survived, corruptions caught) written to
`last_run.json` at the end of the session (quoted in RELIABILITY.md), and a deterministic hypothesis profile."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("reliability", derandomize=True, deadline=None, print_blob=True, database=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.load_profile("reliability")

# Counts are recorded only when asked (a plain test run leaves the tree clean):
#   LORA_RELIABILITY_COUNTS=tests/reliability/last_run.json uv run pytest tests/reliability
COUNTS_PATH = Path(os.environ["LORA_RELIABILITY_COUNTS"]) if os.environ.get("LORA_RELIABILITY_COUNTS") else None


class Counts(dict):
    def add(self, key: str, n: int = 1) -> None:
        self[key] = self.get(key, 0) + n


@pytest.fixture(scope="session")
def counts():
    data = Counts()
    yield data
    if not data or COUNTS_PATH is None:
        return
    old = json.loads(COUNTS_PATH.read_text()) if COUNTS_PATH.is_file() else {}
    old.update(data)
    old["recorded"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    COUNTS_PATH.write_text(json.dumps(dict(sorted(old.items())), indent=1) + "\n")


@pytest.fixture(scope="session")
def trials(tmp_path_factory) -> dict:
    """Every training trial of `_crash_plan` (crash, signals, faults, secrets, mismatches, safety), run once."""
    from _crash_plan import run_trials

    return run_trials(tmp_path_factory.mktemp("crash"))
