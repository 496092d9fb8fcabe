"""Every named dependency of a package does a job in its code: it is imported there, or it is listed below with the
job it does without an import. A dependency nothing uses (trl and xformers were) fails here."""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = sorted((ROOT / "packages").glob("*/pyproject.toml"))
IMPORT_NAME = {"huggingface-hub": "huggingface_hub", "pyyaml": "yaml", "unsloth-zoo": "unsloth_zoo"}
# Used without an import of their own: the reason is the job they do.
INDIRECT = {
    ("lora-runtime", "accelerate"): "transformers' Trainer runs on it (required by Trainer)",
    ("lora-runtime", "unsloth-zoo"): "unsloth's runtime half; pinned with unsloth so both move together",
    ("lora-runtime", "bitsandbytes"): "transformers' BitsAndBytesConfig loads 4-/8-bit bases through it",
}


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower()


def _imported(src: Path) -> set[str]:
    out = set()
    for path in src.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                out |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                out.add(node.module.split(".")[0])
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and re.fullmatch(r"[a-z_]+\.[a-z_.]+", node.value):
                out.add(node.value.split(".")[0])  # importlib.import_module("lora_data.cli")
    return out


def _cases():
    for pyproject in PACKAGES:
        project = tomllib.loads(pyproject.read_text())["project"]
        deps = list(project.get("dependencies", []))
        for extra, reqs in project.get("optional-dependencies", {}).items():
            deps += [r for r in reqs if _name(r) != project["name"]]  # a pass-through extra of a sibling
            assert reqs, f"{project['name']}[{extra}] is empty"
        for dep in deps:
            yield pytest.param(project["name"], pyproject.parent, _name(dep), id=f"{project['name']}:{_name(dep)}")


@pytest.mark.parametrize(("package", "folder", "dep"), list(_cases()))
def test_every_named_dependency_is_used(package, folder, dep):
    if (package, dep) in INDIRECT:
        return
    module = IMPORT_NAME.get(dep, dep.replace("-", "_"))
    assert module in _imported(folder / "src"), (
        f"{package} depends on {dep} but no code in {folder.name}/src imports {module}: give it a job or remove it "
        "(and say why in the README's Dependencies section)")


def test_the_dropped_dependencies_stay_out_and_the_readme_says_why():
    names = {_name(r) for p in PACKAGES for r in tomllib.loads(p.read_text())["project"].get("dependencies", [])}
    gpu = tomllib.loads((ROOT / "packages/lora-runtime/pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    assert "trl" not in names and "xformers" not in {_name(r) for r in gpu}
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Dependencies", 1)[1].split("\n## ", 1)[0]
    for dep in ("trl", "xformers", "datasets", "unsloth", "bitsandbytes", "peft"):
        assert f"`{dep}`" in section, dep


def test_trl_is_imported_only_inside_functions_outside_the_gpu_benchmarks():
    """trl is a dev-group peer: a module-level import would break importing the module where it is absent."""
    for path in [*(ROOT / "tests").rglob("*.py"), *(ROOT / "benchmarks").glob("*.py"), *(ROOT / "packages").rglob("*.py")]:
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import)
                    else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(m.split(".")[0] == "trl" for m in mods), f"{path.relative_to(ROOT)}: module-level trl import"
