"""lora_data: raw chat/Alpaca JSONL → validated, rendered, assistant-masked, packed, memory-mapped shards.

`import lora_data` pulls in numpy only: the shard reader, manifest, errors and the directory lock are imported
eagerly; `prepare`, `read_records` and friends (tokenizers, jsonschema) load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from .errors import DataError, ManifestError, ShardError, TokenizerMismatchError
from .fingerprint import tokenizer_fingerprint
from .locks import LockedError, locked
from .manifest import FORMAT_VERSION, MANIFEST_NAME, Manifest
from .shards import Row, ShardInfo, ShardReader, ShardWriter

_LAZY = {
    # `prepare` lives in `_prepare` so the function name never collides with a submodule of the same name.
    "prepare": "lora_data._prepare",
    "cache_key": "lora_data._prepare",
    "read_records": "lora_data.records",
    "is_alpaca_file": "lora_data.records",
    "Fields": "lora_data.records",
    "load_tokenizer": "lora_data.tokenizer",
    "Record": "lora_data.records",
    "Rejection": "lora_data.records",
    "pack_bfd": "lora_data.pack",
    "is_hub_dataset": "lora_data.rows",
}

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "DataError",
    "Fields",
    "LockedError",
    "Manifest",
    "ManifestError",
    "Record",
    "Rejection",
    "Row",
    "ShardError",
    "ShardInfo",
    "ShardReader",
    "ShardWriter",
    "TokenizerMismatchError",
    "cache_key",
    "is_alpaca_file",
    "is_hub_dataset",
    "load_tokenizer",
    "locked",
    "pack_bfd",
    "prepare",
    "read_records",
    "tokenizer_fingerprint",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lora_data' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
