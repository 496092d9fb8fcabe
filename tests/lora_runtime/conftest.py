"""Runtime test fixtures: small shard sets built with lora_data.ShardWriter (see _shards.py)."""

from __future__ import annotations

from pathlib import Path

import _shards
import pytest


@pytest.fixture(scope="session")
def llama_shards(tmp_path_factory, tiny_llama_dir) -> Path:
    return _shards.chat_shards(tmp_path_factory.mktemp("llama_shards"), tiny_llama_dir, n=24, seq_len=128)


@pytest.fixture(scope="session")
def qwen2_shards(tmp_path_factory, tiny_qwen2_dir) -> Path:
    return _shards.chat_shards(tmp_path_factory.mktemp("qwen2_shards"), tiny_qwen2_dir, n=24, seq_len=128)


@pytest.fixture
def toy_shards(tmp_path) -> Path:
    """10 rows of seq_len 8 whose first token is the row index (so order is visible)."""
    from lora_data import Manifest, ShardWriter

    w = ShardWriter(tmp_path / "toy", seq_len=8, pad_id=0, rows_per_shard=4)
    for i in range(10):
        w.add_row([100 + i, 1, 2, 3, 4], [0, 1, 1, 0, 1], seq_lens=[3, 2])
    infos = w.close()
    Manifest(seq_len=8, pad_id=0, shards=[s.to_dict() for s in infos], tokenizer={"fingerprint": "toy"},
             packing_efficiency=5 / 8).save(tmp_path / "toy")
    return tmp_path / "toy"
