"""The suite's schedule under pytest-xdist (the README's `uv run pytest -n 2`, scheduled by the root conftest.py): a
file is the unit a worker takes, and tests/reliability/ (whose files share the crash trials, a session fixture) goes
to one worker whole. Run here on a copy of the root conftest over trivial files, each recording its worker."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FILES = {"tests/reliability/test_a.py": 6, "tests/reliability/test_b.py": 6, "tests/other/test_c.py": 6,
         "tests/other/test_d.py": 6}


def test_a_file_goes_to_one_worker_and_the_reliability_files_to_one_together(tmp_path):
    shutil.copy(ROOT / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "packages").mkdir()  # the conftest's doctest collection looks there
    ran = tmp_path / "ran"
    ran.mkdir()
    for name, count in FILES.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            "import os, pathlib, pytest\n"
            f"@pytest.mark.parametrize('i', range({count}))\n"
            "def test_here(i):\n"
            f"    (pathlib.Path({str(ran)!r}) / f'{{__name__}}-{{i}}').write_text(os.environ['PYTEST_XDIST_WORKER'])\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "LORA_"))}
    res = subprocess.run([sys.executable, "-m", "pytest", "-n", "2", "-q", "-p", "no:cacheprovider", "-p",
                          "no:benchmark", "-o", "addopts=", "tests"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    workers: dict[str, set[str]] = {}
    for record in ran.iterdir():
        workers.setdefault(record.name.rsplit("-", 1)[0], set()).add(record.read_text())
    assert len(list(ran.iterdir())) == sum(FILES.values())
    assert all(len(w) == 1 for w in workers.values()), workers  # a file on one worker
    assert workers["test_a"] == workers["test_b"], workers  # the reliability files on the same one
    assert len(set().union(*workers.values())) == 2, workers  # and both workers had work


def test_the_suite_runs_where_xdist_is_not_installed():
    """The GPU machines' wheel set has no pytest-xdist: the root conftest's scheduler hook must not stop pytest there
    (an unknown hook is an internal error)."""
    res = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:xdist", "-p", "no:cacheprovider", "--collect-only",
                          "-q", __file__], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
