"""Shared fixtures for the GPU training benchmarks (benchmarks/test_train.py); the CPU data-prep benchmark needs none.

The model is the Qwen2.5-1.5B shape with random bf16 weights (throughput and memory do not depend on the values),
built once per session on the GPU and saved, so the benchmark loads it through the users' `from_pretrained` path.
LORA_BENCH_MODEL_DIR reuses a model built earlier (e.g. by benchmarks/gpu/call2.sh).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


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
    import _tiny

    from benchmarks.gpu import common

    d = tmp_path_factory.mktemp("bench_model")
    tok = _tiny.build_tokenizer(d / "tok", template="chatml")
    return common.build_model("qwen1.5b", d / "qwen1.5b", tok)
