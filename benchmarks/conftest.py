"""Fixtures of the benchmark suite.

CPU smoke tests of the scenario harness (tiny shapes, built offline) and, for the GPU training benchmarks
(benchmarks/test_train.py), the Qwen2.5-1.5B shape with random bf16 weights (throughput and memory do not depend on
the values), built once per session on the GPU and saved, so the benchmark loads it through the users'
`from_pretrained` path. LORA_BENCH_MODEL_DIR reuses a model built earlier (the scenarios build one under
/tmp/lora_bench/models/qwen1.5b).
"""

from __future__ import annotations

import os
from pathlib import Path

import _tiny
import pytest

ROOT = Path(__file__).resolve().parent.parent


def cuda_reason() -> str | None:
    """Why the GPU benchmarks cannot run here, or None."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "needs a CUDA GPU (training throughput and peak GPU memory); none here"
    return None


@pytest.fixture(scope="session")
def bench_model_dir(tmp_path_factory) -> Path:
    reason = cuda_reason()
    if reason:
        pytest.skip(reason)
    given = os.environ.get("LORA_BENCH_MODEL_DIR")
    if given:
        return Path(given)
    from benchmarks.gpu import common

    d = tmp_path_factory.mktemp("bench_model")
    tok = _tiny.build_tokenizer(d / "tok", template="chatml")
    return common.build_model("qwen1.5b", d / "qwen1.5b", tok)


@pytest.fixture(scope="session")
def llama3_tokenizer_dir(tmp_path_factory) -> Path:
    return _tiny.build_tokenizer(tmp_path_factory.mktemp("tok_llama3"), template="llama3")


@pytest.fixture(scope="session")
def llama_shards(tmp_path_factory, llama3_tokenizer_dir) -> Path:
    """24 short chat records prepared with lora_data into rows of 128 for the tiny llama3 tokenizer."""
    import lora_data
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("llama_shards")
    records = _tiny.write_jsonl(d / "chat.jsonl", _tiny.chat_records(24))
    tok = AutoTokenizer.from_pretrained(llama3_tokenizer_dir)
    lora_data.prepare(records, d / "shards", tok, max_seq_len=128, verbose=False)
    return d / "shards"


@pytest.fixture(scope="session")
def tiny_bench(tmp_path_factory) -> tuple[Path, Path]:
    """(DATA, WORK) for the tiny shape: what `python -m benchmarks.gpu prepare` makes (tokenizer, 60 records, shards
    of 2048) and the model a scenario would build under WORK/models (built here, in this process: faster)."""
    from benchmarks.gpu import common
    from benchmarks.gpu.__main__ import prepare

    d = tmp_path_factory.mktemp("bench")
    prepare(d / "data", (("tiny", 2048),), n_records=60, parity_set=False)
    common.build_model("tiny", d / "work" / "models" / "tiny", d / "data" / "tok_tiny")
    return d / "data", d / "work"
