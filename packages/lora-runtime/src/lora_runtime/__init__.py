"""lora_runtime: `lora_sft()` over packed shards, with an Unsloth (CUDA) or transformers+PEFT backend.

`import lora_runtime` is cheap: torch, transformers and peft load on first use of `lora_sft`, `TrainResult`,
`merge_adapter` (they are resolved lazily through `__getattr__`).
"""

from __future__ import annotations

from typing import Any

from lora_runtime.config import ConfigError, LoraSftConfig

__all__ = ["ConfigError", "LoraSftConfig", "TrainResult", "lora_sft", "merge_adapter", "run"]

_LAZY = {"lora_sft": "lora_runtime.api", "run": "lora_runtime.api", "TrainResult": "lora_runtime.api",
         "merge_adapter": "lora_runtime.merge"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lora_runtime' has no attribute {name!r}")
