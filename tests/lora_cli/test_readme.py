"""Every code block of the root README runs here, so the README cannot rot.

What is changed before running, and nothing else:
- the model id `Qwen/Qwen2.5-1.5B-Instruct` becomes the tiny Llama fixture; `examples/` paths become absolute;
- `lora_runtime.lora_sft(...)` calls and in-process `lora-cli train` commands get `max_steps=1` / `--max-steps 1`
  unless they set it (a full schedule on the fixture would only cost time);
- multi-GPU / multi-node `lora-cli train` commands get `--dry-run` (options, config validation, batch arithmetic and
  the torchrun command line are checked; no GPU here); `torchrun ...` lines are parsed by torchrun's own argparser;
- python blocks marked `<!-- readme-test: config-only ... -->` (QLoRA needs CUDA) are validated as `LoraSftConfig`.
Bash blocks run in order in one directory, like a newcomer's shell session; each python block gets a fresh one.
"""

from __future__ import annotations

import ast
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import _tiny
import pytest
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
MODEL_ID = "Qwen/Qwen2.5-1.5B-Instruct"
DATA_FILES = ("training_data.jsonl", "data.jsonl", "large_dataset.jsonl")


@dataclass
class Block:
    lang: str
    code: str
    line: int  # 1-based line of the opening fence
    mode: str = "run"
    world_size: int = 1


def readme_blocks() -> list[Block]:
    lines = README.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = re.match(r"^```(\w*)$", lines[i])
        if not m:
            i += 1
            continue
        end = lines.index("```", i + 1)
        marker = re.match(r"<!-- readme-test: ([\w-]+)(?: world_size=(\d+))?", lines[i - 1]) if i else None
        blocks.append(Block(m[1], "\n".join(lines[i + 1:end]), i + 1, *(
            (marker[1], int(marker[2] or 1)) if marker else ())))
        i = end + 1
    return blocks


BLOCKS = readme_blocks()
PYTHON = [b for b in BLOCKS if b.lang == "python"]


def commands(block: Block) -> list[list[str]]:
    """Shell commands of a bash block: continuation lines joined, comments dropped, split like the shell would."""
    text = re.sub(r"\\\n\s*", " ", block.code)
    return [shlex.split(line) for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_readme_opens_with_the_two_commands_and_ci_runs_the_second():
    first = BLOCKS[0]
    assert first.lang == "bash" and first.code.splitlines() == ["uv run lora-cli demo", "uv run pytest -n 2"]
    ci = [line for line in (ROOT / ".ci/run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci[-1] == "uv run pytest -n 2"


def test_the_bare_commands_come_after_how_to_run_them():
    """The opening block says `uv run lora-cli`; the later ones say `lora-cli` bare, so the text between must say how
    (prefix `uv run`, or activate the environment)."""
    bare = next(b for b in BLOCKS[1:] if b.lang == "bash")
    before = "\n".join(README.read_text(encoding="utf-8").splitlines()[BLOCKS[0].line:bare.line])
    assert "prefix them with `uv run`" in before and "source .venv/bin/activate" in before


def test_every_block_is_a_kind_this_test_runs():
    assert {b.lang for b in BLOCKS} <= {"bash", "python", "json"}
    assert {b.mode for b in BLOCKS} <= {"run", "config-only"}
    for b in BLOCKS[1:]:
        for cmd in commands(b) if b.lang == "bash" else []:
            assert cmd[0] in ("lora-cli", "lora-data", "torchrun"), f"README.md:{b.line}: no test runs {cmd[0]!r}"


@pytest.fixture
def session_dir(tmp_path, monkeypatch, tiny_llama_dir):
    for name in DATA_FILES:
        _tiny.write_jsonl(tmp_path / name, _tiny.chat_records(24, seed=1))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    return tmp_path


class _OneStep(ast.NodeTransformer):
    """`lora_runtime.lora_sft(...)` → the same call with `max_steps=1` (unless it sets max_steps)."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def visit_Call(self, node: ast.Call) -> ast.Call:
        f = node.func
        if isinstance(f, ast.Attribute) and f.attr == "lora_sft" and getattr(f.value, "id", "") == "lora_runtime":
            self.calls.append({k.arg: ast.literal_eval(k.value) for k in node.keywords})
            if "max_steps" not in self.calls[-1]:
                node.keywords.append(ast.keyword("max_steps", ast.Constant(1)))
        return node


@pytest.mark.slow
@pytest.mark.parametrize("block", PYTHON, ids=[f"README.md:{b.line}" for b in PYTHON])
def test_python_block(block, session_dir, tiny_llama_dir, monkeypatch):
    from lora_runtime import LoraSftConfig

    source = block.code.replace(MODEL_ID, str(tiny_llama_dir))
    transform = _OneStep()
    tree = ast.fix_missing_locations(transform.visit(ast.parse(source)))
    assert len(transform.calls) == 1, f"README.md:{block.line}: expected one lora_runtime.lora_sft(...) call"
    if block.mode == "config-only":  # what a GPU machine would check: pretend CUDA (refused on a CPU, rightly)
        monkeypatch.setattr("lora_runtime.preflight.cuda_available", lambda: True)
        LoraSftConfig(**transform.calls[0]).validate(world_size=block.world_size)
        return
    namespace: dict = {}
    exec(compile("import lora_runtime\n" + ast.unparse(tree), f"README.md:{block.line}", "exec"), namespace)
    result = namespace["result"]
    assert result.steps == 1
    assert (Path(result.adapter_dir) / "adapter_config.json").is_file()


def test_json_blocks_are_valid_records(tmp_path):
    from lora_data import read_records

    blocks = [b for b in BLOCKS if b.lang == "json"]
    assert len(blocks) >= 2
    for b in blocks:
        path = tmp_path / f"line{b.line}.jsonl"
        path.write_text(b.code + "\n")
        out = list(read_records(path))
        assert len(out) == 1 and type(out[0]).__name__ == "Record", f"README.md:{b.line}: {out}"


def _lora_cli(argv: list[str], line: int) -> None:
    from unittest import mock

    from lora_cli import launch
    from lora_cli.main import main

    if argv[0] == "train":
        distributed = any(a in argv for a in ("--gpus", "--nnodes"))
        argv = [*argv, "--dry-run"] if distributed else argv + ([] if "--max-steps" in argv else ["--max-steps", "1"])
    with mock.patch.object(launch, "visible_gpus", lambda: 8):  # a --gpus 8 dry run, as on the machine it is for
        res = CliRunner().invoke(main, argv)
    assert res.exit_code == 0, f"README.md:{line}: lora-cli {' '.join(argv)}\n{res.output}"


def _lora_data(argv: list[str], line: int) -> None:
    from lora_data.cli import cli

    res = CliRunner().invoke(cli, argv)
    assert res.exit_code == 0, f"README.md:{line}: lora-data {' '.join(argv)}\n{res.output}"


def _torchrun(argv: list[str], line: int) -> None:
    from torch.distributed.run import get_args_parser

    args = get_args_parser().parse_args(argv)
    assert args.training_script.endswith(".py") and int(args.nproc_per_node) > 1, f"README.md:{line}"


@pytest.mark.slow
def test_bash_blocks_in_order(session_dir, tiny_llama_dir):
    ran = 0
    for b in BLOCKS[1:]:
        if b.lang != "bash":
            continue
        for cmd in commands(b):
            cmd = [str(tiny_llama_dir) if a == MODEL_ID else a for a in cmd]
            cmd = [str(ROOT / a) if a.startswith("examples/") else a for a in cmd]
            {"lora-cli": _lora_cli, "lora-data": _lora_data, "torchrun": _torchrun}[cmd[0]](cmd[1:], b.line)
            ran += 1
    assert ran >= 8
    assert (session_dir / "merged" / "config.json").is_file()
