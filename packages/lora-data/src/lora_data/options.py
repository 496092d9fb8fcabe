"""`Options`: everything besides the inputs and the tokenizer that changes what `prepare` writes.

All of it goes into the cache key and (flattened, training-hub's names) into `manifest.options`:

>>> o = Options.from_kwargs(128, field_messages="conversation", overlong="split")
>>> o.fields.messages, o.to_dict()["field_messages"], o.to_dict()["overlong"]
('conversation', 'conversation', 'split')
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from .errors import DataError
from .manifest import FORMAT_VERSION
from .pack import OVERLONG
from .records import FORMATS, Fields

VERSION = "0.1.0"  # lora-data's version: in `created_by`, the cache key and `lora-data --version`
# which records train and how they read (validation, formats): in the cache key, so that shards prepared under other
# rules are prepared again. 2: an all-empty answer is rejected, a null Alpaca input reads as none, .json arrays;
# 3: a key twice in one object is rejected; 4: EOS after whitespace (Llama-2) is trained, a key twice is found
# whatever the whitespace before its colon, tool calls and reasoning are trained, a record's tools reach the template;
# 5, 6: a record whose template leaves some reasoning out (GPT-OSS, a tool call's once a final answer follows) trains,
# as do identical tool-call turns with no content located between them and tool results a template JSON-escapes; an
# empty tool result between a call and the next turn is no longer trained with them (Qwen3); `<think>` written into
# an answer's content trains where the template splits it out (Qwen3); 7: a CSV cell is its text ("NA", "4"), a
# null member of a nested record (parquet, arrow, datasets) is absent, a key ending in a backslash no longer hides a
# key written twice, a .json array's element with a number Python cannot read is rejected alone, an overlong
# record's pieces keep its place in the input order
RECORD_RULES = 7
DATASET_TYPES = {"chat_template": "messages"}  # training-hub's `dataset_type` → our `format` (alpaca is alpaca)


@dataclass(frozen=True)
class Options:
    max_seq_len: int
    format: str = "auto"
    fields: Fields = field(default_factory=Fields)
    overlong: str = "drop"
    packing: bool = True
    train_on_inputs: bool = False
    seed: int = 0
    rows_per_shard: int = 4096

    @classmethod
    def from_kwargs(cls, max_seq_len: int, **options: Any) -> Options:
        """`prepare`'s keyword options (training-hub's `field_*` and `dataset_type` names accepted) → Options."""
        if "dataset_type" in options:
            kind = options.pop("dataset_type")
            options.setdefault("format", DATASET_TYPES.get(kind, kind))
        names = set(Fields.option_names())
        fields_ = Fields.from_options(options)
        rest = {k: v for k, v in options.items() if k not in names}
        unknown = sorted(set(rest) - {f.name for f in dataclasses.fields(cls)} - {"fields"})
        if unknown:
            raise DataError(f"unknown option(s) {', '.join(unknown)}", field="options")
        return cls(max_seq_len=max_seq_len, fields=rest.pop("fields", fields_), **rest)

    def check(self) -> None:
        if not isinstance(self.max_seq_len, int) or self.max_seq_len < 2:
            raise DataError(f"max_seq_len must be an integer ≥ 2; got {self.max_seq_len!r}", field="max_seq_len")
        if self.format not in FORMATS:
            raise DataError(f"expected one of {', '.join(FORMATS)}; got {self.format!r}", field="format")
        if self.overlong not in OVERLONG:
            raise DataError(f"expected one of {', '.join(OVERLONG)}; got {self.overlong!r}", field="overlong")
        if self.rows_per_shard < 1:
            raise DataError(f"must be ≥ 1; got {self.rows_per_shard}", field="rows_per_shard")

    def to_dict(self) -> dict[str, Any]:
        """Flat, with training-hub's `field_*` names (the form the manifest and the cache key have always used)."""
        out: dict[str, Any] = {"max_seq_len": self.max_seq_len, "format": self.format, **self.fields.as_options()}
        out.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in out and f.name != "fields"})
        return out

    def cache_key(self, source_hashes: list[str], fingerprint: str) -> str:
        """sha256 of the sources' hashes, the tokenizer fingerprint, every option and the format/tool versions."""
        blob = json.dumps({"sources": source_hashes, "tokenizer": fingerprint, "options": self.to_dict(),
                           "format_version": FORMAT_VERSION, "lora_data": VERSION, "record_rules": RECORD_RULES},
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()
