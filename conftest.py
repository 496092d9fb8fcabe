"""Doctests of the packages: every docstring example under packages/*/src runs with the suite (`uv run pytest -n 2`).

Only there: the tests' own conftest files and helpers are not doctest modules (collected as such, two conftest.py
files of one run would clash under the module name `conftest`).

Under pytest-xdist (the README's `-n 2`), a test file is the unit a worker takes: its module fixtures are made once,
and tests/reliability/ goes to one worker whole (its files share the crash trials, a session fixture of about 45 s of
CPU, and the counts file it may write). An explicit `--dist` other than load or loadfile keeps xdist's own.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from _pytest.doctest import DoctestModule

SOURCES = Path(__file__).parent / "packages"
ONE_WORKER = ("tests/reliability/",)  # path prefixes whose files run on one worker together


def scope_of(nodeid: str) -> str:
    """The unit of work of a test under xdist: its file, or the ONE_WORKER prefix its file is under."""
    path = nodeid.split("::", 1)[0]
    return next((prefix for prefix in ONE_WORKER if path.startswith(prefix)), path)


@pytest.hookimpl(tryfirst=True, optionalhook=True)  # optional: the suite also runs where xdist is not installed
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") not in ("load", "loadfile"):
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ByFile(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return scope_of(nodeid)

    return ByFile(config, log)


def pytest_collect_file(file_path: Path, parent):
    if (file_path.suffix == ".py" and file_path.name != "__main__.py" and SOURCES in file_path.parents
            and "src" in file_path.parts):
        return DoctestModule.from_parent(parent, path=file_path)
    return None
