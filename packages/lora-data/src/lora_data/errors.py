"""The DataError hierarchy: every message names the place (file:line), the field path, the value and the fix.

>>> str(DataError('expected one of system, user, assistant, tool; got "bot"', path="train.jsonl", line=17,
...               field="messages[2].role"))
'train.jsonl:17: messages[2].role: expected one of system, user, assistant, tool; got "bot"'
"""

from __future__ import annotations

from pathlib import Path


class DataError(Exception):
    """Bad input data. `path`, `line` (1-based) and `field` (a JSON path such as `messages[2].role`) are optional."""

    def __init__(self, message: str, *, path: str | Path | None = None, line: int | None = None,
                 field: str | None = None) -> None:
        self.message = message
        self.path = str(path) if path is not None else None
        self.line = line
        self.field = field
        super().__init__(self._format())

    def _format(self) -> str:
        where = ""
        if self.path is not None:
            where = self.path if self.line is None else f"{self.path}:{self.line}"
        parts = [p for p in (where, self.field, self.message) if p]
        return ": ".join(parts)


class ShardError(DataError):
    """A shard or manifest is corrupt, truncated, of another format version, or does not match its manifest.

    The message names the file. Fix: prepare the data again (`lora-data prepare ...`).
    """

    def __init__(self, message: str, *, path: str | Path | None = None, field: str | None = None) -> None:
        super().__init__(message, path=path, field=field)


class ManifestError(ShardError):
    """`manifest.json` is missing, unparsable, or lacks a field (a kind of ShardError: the set is unusable)."""


class TokenizerMismatchError(DataError):
    """The shards were prepared with another tokenizer than the one the model uses; shows both fingerprints."""

    def __init__(self, expected: str, actual: str, *, path: str | Path | None = None, hint: str = "") -> None:
        self.expected = expected
        self.actual = actual
        msg = (f"tokenizer fingerprint mismatch: shards were prepared with {expected}, the model's tokenizer is "
               f"{actual}; prepare the data again with this model's tokenizer (`lora-data prepare ... --tokenizer "
               f"MODEL_DIR`)")
        if hint:
            msg += f" ({hint})"
        super().__init__(msg, path=path)
