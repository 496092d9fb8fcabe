"""`load_tokenizer(path_or_tokenizer)`: the tokenizer `prepare` renders and encodes with."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import DataError


def load_tokenizer(tokenizer: Any):
    """A path (str/Path) is loaded with AutoTokenizer, the way the runtime loads the model's tokenizer."""
    if isinstance(tokenizer, (str, Path)):
        from transformers import AutoTokenizer

        if not Path(tokenizer).exists():
            raise DataError(f"tokenizer directory not found: {tokenizer}", field="tokenizer")
        try:
            return AutoTokenizer.from_pretrained(str(tokenizer))
        except (OSError, ValueError) as e:
            raise DataError(f"cannot load a tokenizer from {tokenizer}: {e}", field="tokenizer") from None
    return tokenizer
