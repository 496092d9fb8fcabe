"""Doctests of the packages: every docstring example under packages/*/src runs with the suite (`uv run pytest`).

Only there: the tests' own conftest files and helpers are not doctest modules (collected as such, two conftest.py
files of one run would clash under the module name `conftest`).
"""

from __future__ import annotations

from pathlib import Path

from _pytest.doctest import DoctestModule

SOURCES = Path(__file__).parent / "packages"


def pytest_collect_file(file_path: Path, parent):
    if (file_path.suffix == ".py" and file_path.name != "__main__.py" and SOURCES in file_path.parents
            and "src" in file_path.parts):
        return DoctestModule.from_parent(parent, path=file_path)
    return None
