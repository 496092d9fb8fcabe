"""`manifest.json`: what a prepared shard directory holds, where it came from, and how to check it.

Numpy-free and polars-free: a GPU box reads it with the standard library alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ManifestError, TokenizerMismatchError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"

NOT_REJECTED = ("overlong_", "reasoning_not_trained")  # the codes (prefixes) of rejects.jsonl entries that still train
COUNT_KEYS = (
    "lines_read", "valid", "rejected", "blank", "overlong", "dropped", "truncated", "split", "samples", "rows",
    "tokens", "loss_tokens", "padding_tokens",
)


def empty_counts() -> dict[str, Any]:
    """All counters at zero, plus `rejected_by_reason` (reason → count)."""
    counts: dict[str, Any] = dict.fromkeys(COUNT_KEYS, 0)
    counts["rejected_by_reason"] = {}
    return counts


@dataclass
class Manifest:
    """Everything about one prepared directory. `packing_efficiency` = real tokens ÷ (rows × seq_len)."""

    seq_len: int
    pad_id: int
    format_version: int = FORMAT_VERSION
    created_by: str = "lora-data"
    packing: bool = True
    seed: int = 0
    dataset_format: str = "messages"  # messages | alpaca | mixed (auto decided per file; see sources[].format)
    options: dict[str, Any] = field(default_factory=dict)
    sources: list[dict[str, Any]] = field(default_factory=list)  # {path, sha256, bytes, format}
    tokenizer: dict[str, Any] = field(default_factory=dict)  # {fingerprint, name_or_path, eos, bos, pad, ...}
    counts: dict[str, Any] = field(default_factory=empty_counts)
    packing_efficiency: float = 0.0
    shards: list[dict[str, Any]] = field(default_factory=list)  # {file, rows, bytes, sha256}
    cache_key: str | None = None
    checksum: str | None = None  # sha256 of every other field, set by save(); checked by ShardReader

    @property
    def rows(self) -> int:
        return sum(int(s["rows"]) for s in self.shards)

    @property
    def fingerprint(self) -> str | None:
        return self.tokenizer.get("fingerprint")

    def check_tokenizer(self, tokenizer: Any, *, path: str | Path = MANIFEST_NAME, hint: str | None = None) -> None:
        """Raise TokenizerMismatchError (both fingerprints shown, `path` and `hint` named) unless `tokenizer` encodes
        like the one used here.

        Call it with the tokenizer the model was loaded with (transformers may load another class than was saved).
        """
        from .fingerprint import tokenizer_fingerprint

        actual = tokenizer_fingerprint(tokenizer)
        if actual != self.fingerprint:
            hint = hint or f"prepared with {self.tokenizer.get('name_or_path')!r}"
            raise TokenizerMismatchError(str(self.fingerprint), actual, path=path, hint=hint)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"

    def save(self, out_dir: str | Path) -> Path:
        """Write `out_dir/manifest.json` atomically (temp file, fsync, rename): a reader never sees half a manifest."""
        out = Path(out_dir)
        final = out / MANIFEST_NAME
        self.checksum = content_digest(self.to_dict())
        tmp = out / f".{MANIFEST_NAME}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(self.to_json())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        fsync_dir(out)
        return final

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, path: str | Path | None = None) -> Manifest:
        if not isinstance(data, dict):
            raise ManifestError(f"expected a JSON object, got {type(data).__name__}", path=path)
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ManifestError(f"format version {version!r} is not supported (this lora-data reads version "
                                f"{FORMAT_VERSION}); prepare the data again with this lora-data",
                                path=path, field="format_version")
        names = {f.name for f in dataclasses.fields(cls)}
        missing = [n for n in ("seq_len", "pad_id", "shards") if n not in data]
        if missing:
            raise ManifestError(f"missing field(s) {', '.join(missing)}", path=path)
        unknown = sorted(set(data) - names)
        if unknown:
            raise ManifestError(f"unknown field(s) {', '.join(unknown)}", path=path)
        for key in ("seq_len", "pad_id"):
            if not isinstance(data[key], int) or isinstance(data[key], bool) or data[key] < 0:
                raise ManifestError(f"expected a non-negative integer, got {data[key]!r}", path=path, field=key)
        if not isinstance(data["shards"], list):
            raise ManifestError(f"expected a list, got {data['shards']!r}", path=path, field="shards")
        return cls(**data)

    def verify_checksum(self, path: str | Path | None = None) -> None:
        """ManifestError unless the content matches the checksum save() wrote; a missing checksum is an error too."""
        if not isinstance(self.checksum, str):
            raise ManifestError("no checksum (every manifest lora-data writes has one: removed or edited by hand); "
                                "prepare the data again", path=path, field="checksum")
        if content_digest(self.to_dict()) != self.checksum:
            raise ManifestError("content does not match its checksum (corrupted, or edited by hand); prepare the "
                                "data again", path=path, field="checksum")

    @classmethod
    def load(cls, out_dir: str | Path) -> Manifest:
        """Read `out_dir/manifest.json`; ManifestError (naming the file) if missing, unparsable or of another version."""
        path = Path(out_dir) / MANIFEST_NAME
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ManifestError(f"not found; is {str(out_dir)!r} a directory made by `lora-data prepare`?",
                                path=path) from None
        except (OSError, UnicodeDecodeError) as e:
            raise ManifestError(f"cannot read: {e}", path=path) from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ManifestError(f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}", path=path) from None
        except ValueError as e:  # an integer longer than sys.get_int_max_str_digits()
            raise ManifestError(f"unreadable number: {e}", path=path) from None
        except RecursionError:
            raise ManifestError("JSON nested too deeply to parse (Python's recursion limit)", path=path) from None
        return cls.from_dict(data, path=path)

    def summary(self) -> str:
        """Every count, the rejects by reason and the packing efficiency (prepare's stderr summary, `inspect`)."""
        c = self.counts
        lines = [f"{c['lines_read']} lines read: {c['valid']} valid, {c['rejected']} rejected, {c['blank']} blank; "
                 f"{c['overlong']} overlong ({c['dropped']} dropped, {c['truncated']} truncated, {c['split']} split)"]
        for reason, n in sorted(c["rejected_by_reason"].items()):
            lines.append(f"  rejected {reason}: {n}")
        if c.get("reasoning_not_trained"):
            lines.append(f"  {c['reasoning_not_trained']} valid records with reasoning the chat template leaves out "
                         "(not trained; listed in rejects.jsonl)")
        lines.append(f"  {c['samples']} samples in {c['rows']} rows of {self.seq_len} tokens: {c['tokens']} tokens, "
                     f"{c['loss_tokens']} loss tokens, {c['padding_tokens']} padding; packing efficiency "
                     f"{self.packing_efficiency:.4f}; {len(self.shards)} shard(s)")
        return "\n".join(lines)


def content_digest(data: dict[str, Any]) -> str:
    """sha256 of a manifest dict's canonical JSON, `checksum` itself left out."""
    body = {k: v for k, v in data.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def fsync_dir(path: str | Path) -> None:
    """fsync a directory so a rename inside it survives a crash (no-op where the OS does not support it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
