"""`prepare(inputs, out_dir, tokenizer, max_seq_len=...)`: validate → render → tokenize → pack → shards + manifest.

Deterministic: the same inputs, tokenizer and options give byte-identical shards (`seed` orders the packed rows).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataError
from .fingerprint import template_source, tokenizer_fingerprint
from .manifest import FORMAT_VERSION, MANIFEST_NAME, Manifest, empty_counts
from .pack import OVERLONG, pack_bfd
from .records import FORMATS, Rejection

VERSION = "0.1.0"
REJECTS_NAME = "rejects.jsonl"
TMP_NAME = ".prepare-tmp"
CHUNK_RECORDS = 2048


@dataclass(frozen=True)
class Options:
    """Everything besides inputs and tokenizer that changes the output (all of it goes into `cache_key`)."""

    max_seq_len: int
    format: str = "auto"
    field_messages: str = "messages"
    field_instruction: str = "instruction"
    field_input: str = "input"
    field_output: str = "output"
    overlong: str = "drop"
    packing: bool = True
    train_on_inputs: bool = False
    seed: int = 0
    rows_per_shard: int = 4096

    def check(self) -> None:
        if not isinstance(self.max_seq_len, int) or self.max_seq_len < 2:
            raise DataError(f"max_seq_len must be an integer ≥ 2; got {self.max_seq_len!r}", field="max_seq_len")
        if self.format not in FORMATS:
            raise DataError(f"expected one of {', '.join(FORMATS)}; got {self.format!r}", field="format")
        if self.overlong not in OVERLONG:
            raise DataError(f"expected one of {', '.join(OVERLONG)}; got {self.overlong!r}", field="overlong")
        if self.rows_per_shard < 1:
            raise DataError(f"must be ≥ 1; got {self.rows_per_shard}", field="rows_per_shard")


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


def _key(source_hashes: list[str], fingerprint: str, options: Options) -> str:
    blob = json.dumps({"sources": source_hashes, "tokenizer": fingerprint, "options": asdict(options),
                       "format_version": FORMAT_VERSION, "lora_data": VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def cache_key(inputs, tokenizer: Any, **options: Any) -> str:
    """Content hash of the inputs' bytes + the tokenizer's fingerprint + every option: equal keys, equal shards.

    The runtime compares it with `Manifest.load(dir).cache_key` to reuse prepared shards.
    """
    from .shards import sha256_file

    paths = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    return _key([sha256_file(p) for p in paths], tokenizer_fingerprint(load_tokenizer(tokenizer)), Options(**options))


def prepare(inputs, output_dir, tokenizer: Any, *, max_seq_len: int, strict: bool = False, progress: bool | None = None,
            verbose: bool = True, **options: Any) -> Manifest:
    """Prepare JSONL `inputs` (a path or a list) into `output_dir` and return the saved Manifest.

    options: format ("auto"|"messages"|"alpaca"), field_messages/field_instruction/field_input/field_output, overlong
    ("drop"|"truncate"|"split"), packing, train_on_inputs, seed, rows_per_shard. `strict`: any line in rejects.jsonl
    raises DataError and no shards are written. `progress`: a bar on stderr (default: only when stderr is a TTY).
    `verbose`: print the summary (counts, rejects by reason, packing efficiency) on stderr.
    """
    if "dataset_type" in options:  # training-hub's name for the format
        kind = options.pop("dataset_type")
        options.setdefault("format", {"chat_template": "messages"}.get(kind, kind))
    opts = Options(max_seq_len=max_seq_len, **options)
    opts.check()
    paths = [Path(inputs)] if isinstance(inputs, (str, Path)) else [Path(p) for p in inputs]
    for p in paths:
        if not p.is_file():
            raise DataError("input file not found", path=p)
    tok = load_tokenizer(tokenizer)
    out = Path(output_dir)
    _clear(out)
    from ._run import run

    try:
        manifest = run(paths, out, tok, opts, strict=strict,
                       progress=sys.stderr.isatty() if progress is None else progress)
    finally:
        shutil.rmtree(out / TMP_NAME, ignore_errors=True)
    if verbose:
        print(summary(manifest), file=sys.stderr)
    return manifest


def _clear(out: Path) -> None:
    """Remove a previous run's outputs: the manifest first, so a half-cleared dir never looks whole."""
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_NAME).unlink(missing_ok=True)
    for p in out.glob("shard-*.bin"):
        p.unlink()
    (out / REJECTS_NAME).unlink(missing_ok=True)
    shutil.rmtree(out / TMP_NAME, ignore_errors=True)


def new_manifest(out_opts: Options, tok: Any) -> Manifest:
    opt = asdict(out_opts)
    return Manifest(
        seq_len=opt.pop("max_seq_len"), pad_id=pad_id_of(tok), created_by=f"lora-data {VERSION}",
        packing=opt.pop("packing"), seed=opt.pop("seed"), options=opt, counts=empty_counts(),
        tokenizer={"fingerprint": tokenizer_fingerprint(tok), "name_or_path": str(getattr(tok, "name_or_path", "")),
                   "class": type(tok).__name__, "eos": tok.eos_token, "bos": tok.bos_token, "pad": tok.pad_token,
                   "chat_template_source": template_source(tok)},
    )


def pad_id_of(tok: Any) -> int:
    """The pad id written after a row's tokens: pad, else eos (masked out either way)."""
    pid = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if pid is None:
        raise DataError("the tokenizer has neither a pad nor an eos token; set one", field="tokenizer")
    return int(pid)


def rows_order(bins: list[list[int]], seed: int, packing: bool) -> np.ndarray:
    """Packed rows are shuffled by `seed` (BFD opens them longest first); unpacked rows keep input order."""
    return np.random.default_rng(seed).permutation(len(bins)) if packing else np.arange(len(bins))


def pack_rows(lengths: np.ndarray, seq_len: int, packing: bool) -> list[list[int]]:
    return pack_bfd(lengths, seq_len) if packing else [[i] for i in range(len(lengths))]


def summary(m: Manifest) -> str:
    """The stderr summary: every count, the rejects by reason, and the packing efficiency."""
    c = m.counts
    lines = [f"lora-data prepare: {c['lines_read']} lines read: {c['valid']} valid, {c['rejected']} rejected, "
             f"{c['blank']} blank; {c['overlong']} overlong ({c['dropped']} dropped, {c['truncated']} truncated, "
             f"{c['split']} split)"]
    for reason, n in sorted(c["rejected_by_reason"].items()):
        lines.append(f"  rejected {reason}: {n}")
    lines.append(f"  {c['samples']} samples in {c['rows']} rows of {m.seq_len} tokens: {c['tokens']} tokens, "
                 f"{c['loss_tokens']} loss tokens, {c['padding_tokens']} padding; packing efficiency "
                 f"{m.packing_efficiency:.4f}; {len(m.shards)} shard(s)")
    return "\n".join(lines)


def write_rejection(fh, r: Rejection) -> None:
    fh.write(r.to_json())
    fh.write("\n")
