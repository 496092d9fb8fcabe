"""Runtime test fixtures: small shard sets built with lora_data.ShardWriter (see _shards.py)."""

from __future__ import annotations

from pathlib import Path

import _shards
import _tiny
import pytest


@pytest.fixture(autouse=True)
def _no_caps_carried_over(monkeypatch):
    """Each test starts with no GPU allocator cap recorded as set by an earlier run (`batching.cap_process`): a test
    that fakes CUDA and records the caps must not leave one for the next test to lift on the real, absent GPU."""
    from lora_runtime import batching

    monkeypatch.setattr(batching, "_CAPPED", set())


@pytest.fixture(scope="session")
def llama_shards(tmp_path_factory, tiny_llama_dir) -> Path:
    return _shards.chat_shards(tmp_path_factory.mktemp("llama_shards"), tiny_llama_dir, n=24, seq_len=128)


@pytest.fixture(scope="session")
def qwen2_shards(tmp_path_factory, tiny_qwen2_dir) -> Path:
    return _shards.chat_shards(tmp_path_factory.mktemp("qwen2_shards"), tiny_qwen2_dir, n=24, seq_len=128)


@pytest.fixture
def toy_shards(tmp_path) -> Path:
    """10 rows of seq_len 8 whose first token is the row index (so order is visible)."""
    rows = [([100 + i, 1, 2, 3, 4], [0, 1, 1, 0, 1], [3, 2]) for i in range(10)]
    return _tiny.write_shards(tmp_path / "toy", rows, seq_len=8, rows_per_shard=4, packing_efficiency=5 / 8)


@pytest.fixture(scope="session")
def four_layer_llama(tmp_path_factory, llama3_tokenizer_dir) -> Path:
    """A random 4-layer Llama: enough layers to recompute or offload some and keep others."""
    return _tiny.build_model(tmp_path_factory.mktemp("llama4"), arch="llama", tokenizer_dir=llama3_tokenizer_dir,
                             num_layers=4)
