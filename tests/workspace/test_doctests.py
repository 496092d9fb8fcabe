"""Every docstring example (`>>>`) of the packages and the benchmarks runs here, so none can go stale unnoticed."""

from __future__ import annotations

import doctest
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _modules() -> list[str]:
    names = []
    for path in sorted([*ROOT.glob("packages/*/src/**/*.py"), *ROOT.glob("benchmarks/**/*.py")]):
        if ">>>" in path.read_text(encoding="utf-8"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            names.append(".".join(parts[3:] if parts[0] == "packages" else parts).removesuffix(".__init__"))
    return names


MODULES = _modules()


def test_the_examples_are_found():
    assert {"lora_runtime.batching", "lora_runtime.offload", "lora_data.pack", "lora_cli.launch",
            "benchmarks.compare"} <= set(MODULES), MODULES


@pytest.mark.parametrize("name", MODULES)
def test_the_docstring_examples_hold(name):
    module = importlib.import_module(name)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    out: list[str] = []
    for test in doctest.DocTestFinder().find(module):
        runner.run(test, out=out.append)
    result = runner.summarize(verbose=False)
    skipped = sum(bool(ex.options.get(doctest.SKIP)) for t in doctest.DocTestFinder().find(module) for ex in t.examples)
    assert (result.attempted or skipped) and not result.failed, "".join(out)
