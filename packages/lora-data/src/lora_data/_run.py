"""The body of `prepare`: stream every file through the tokenize stage, then pack and write the shards.

Everything lands in the staging dir; `_staging.Staging.commit` swaps it in.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from ._stage import TokenizeStage
from ._staging import REJECTS_NAME
from .errors import DataError
from .fingerprint import template_source, tokenizer_fingerprint
from .manifest import Manifest, empty_counts
from .options import VERSION, Options
from .pack import pack_bfd
from .records import Record, Rejection, is_gzip, read_records
from .rows import is_dataset, is_hub_dataset, source_sha256
from .shards import ShardWriter

CHUNK_RECORDS = 2048


@dataclass
class RejectLog:
    """rejects.jsonl as lines stream by, plus the counts; overlong records are listed but counted as valid."""

    fh: IO[str]
    counts: dict[str, Any]
    listed: int = 0
    first: Rejection | None = field(default=None)

    def __call__(self, r: Rejection, counted: bool = True) -> None:
        self.fh.write(r.to_json())
        self.fh.write("\n")
        self.listed += 1
        self.first = self.first or r
        if counted:
            self.counts["rejected"] += 1
            self.counts["rejected_by_reason"][r.code] = self.counts["rejected_by_reason"].get(r.code, 0) + 1


def run(paths: list[Path], staging: Path, tok: Any, opts: Options, *, strict: bool, progress: bool,
        rejects_shown: Path, spill: Path, split: str | None = None, config: str | None = None,
        workers: int = 1) -> Manifest:
    """Prepare `paths` into `staging` (shards + rejects.jsonl); return the manifest, not yet saved. `rejects_shown`:
    where a failure's message says the rejects are (where the caller keeps them)."""
    manifest = new_manifest(opts, tok)
    with open(staging / REJECTS_NAME, "w", encoding="utf-8") as fh:
        log = RejectLog(fh, manifest.counts)
        stage = TokenizeStage(tok, spill, seq_len=opts.max_seq_len, overlong=opts.overlong,
                              train_on_inputs=opts.train_on_inputs, counts=manifest.counts, reject=log, workers=workers)
        try:
            _stream(paths, opts, stage, manifest, progress, split=split, config=config)
            table, ids, mask = stage.finish()
        finally:
            stage.close()
    if strict and log.first:
        r = log.first
        raise DataError(f"{r.reason} (--strict: {log.listed} line(s) in {rejects_shown}; no shards written)",
                        path=r.path, line=r.line, field=r.field)
    if len(table["length"]) == 0:
        where = ", ".join(map(str, paths))
        if log.first is None:  # nothing rejected either: no record at all
            lines = manifest.counts["lines_read"]
            raise DataError(f"no record in {where}: " + ("empty" if not lines else f"{lines:,} blank line(s) only"))
        raise DataError(f"no trainable record in {where}{_first_reason(log)}; see {rejects_shown}")
    _write(staging, manifest, opts, table, ids, mask)
    manifest.cache_key = opts.cache_key([s["sha256"] for s in manifest.sources], manifest.tokenizer["fingerprint"])
    return manifest


def _first_reason(log: RejectLog) -> str:
    """The first rejection, where and why: when every line fails alike (a whole file in another format), this one
    line is the explanation, without opening rejects.jsonl."""
    r = log.first
    if r is None:
        return ""
    where = f"{r.path}:{r.line}" + (f" ({r.field})" if r.field else "")
    return f" ({log.listed} line(s) rejected; the first, {where}: {r.reason})"


def new_manifest(opts: Options, tok: Any) -> Manifest:
    options = opts.to_dict()
    return Manifest(
        seq_len=options.pop("max_seq_len"), pad_id=pad_id_of(tok), created_by=f"lora-data {VERSION}",
        packing=options.pop("packing"), seed=options.pop("seed"), options=options, counts=empty_counts(),
        tokenizer={"fingerprint": tokenizer_fingerprint(tok), "name_or_path": str(getattr(tok, "name_or_path", "")),
                   "class": getattr(tok, "class_name", type(tok).__name__), "eos": tok.eos_token, "bos": tok.bos_token, "pad": tok.pad_token,
                   "chat_template_source": template_source(tok)},
    )


def pad_id_of(tok: Any) -> int:
    """The pad id written after a row's tokens: pad, else eos (masked out either way)."""
    pid = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if pid is None:
        raise DataError("the tokenizer has neither a pad nor an eos token; set one", field="tokenizer")
    return int(pid)


def _stream(paths, opts: Options, stage: TokenizeStage, manifest: Manifest, progress: bool, *,
            split: str | None, config: str | None) -> None:
    counts = manifest.counts
    bar = _bar(sum(_size(p) for p in paths)) if progress else None
    formats = []
    for index, path in enumerate(paths):
        hub = is_hub_dataset(path)  # hashed over its rows as they stream (no stored bytes to hash)
        streamed = hub or not (is_dataset(path) or is_gzip(path))  # else: hash the stored bytes (`cache_key`'s)
        hasher = hashlib.sha256() if streamed else None
        reader = read_records(path, format=opts.format, fields=opts.fields, source_index=index, hasher=hasher,
                              split=split, config=config, train_on_inputs=opts.train_on_inputs)
        chunk: list[Record] = []
        seen = 0
        for item in reader:
            if isinstance(item, Rejection):
                stage.reject_read(item)
                continue
            chunk.append(item)
            if len(chunk) == CHUNK_RECORDS:
                stage.add(chunk)
                chunk = []
                if bar is not None:
                    bar.update(reader.counts["bytes"] - seen)
                    seen = reader.counts["bytes"]
        if chunk:
            stage.add(chunk)
        if bar is not None:
            bar.update(reader.counts["bytes"] - seen)
        counts["lines_read"] += reader.counts["lines_read"]
        counts["blank"] += reader.counts["blank"]
        formats.append(reader.detected or opts.format)
        digest = hasher.hexdigest() if hasher is not None else source_sha256(path, split=split, config=config)
        source = {"path": str(path), "sha256": digest, "bytes": reader.counts["bytes"], "format": reader.detected}
        if is_dataset(path):
            source.update({k: v for k, v in (("split", split), ("config", config)) if v is not None})
        manifest.sources.append(source)
    if bar is not None:
        bar.close()
    manifest.dataset_format = formats[0] if len(set(formats)) == 1 else "mixed"


def _size(p: Path) -> int:
    try:
        return p.stat().st_size if p.is_file() else 0
    except OSError:
        return 0


def _bar(total: int):
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc="lora-data prepare", leave=False)


def _write(out: Path, manifest: Manifest, opts: Options, table: dict[str, np.ndarray], ids: np.ndarray,
           mask: np.ndarray) -> None:
    lengths, offsets, samples = table["length"], table["offset"], table["sample_id"]
    bins = pack_bfd(lengths, opts.max_seq_len) if opts.packing else [[i] for i in range(len(lengths))]
    # packed rows are shuffled by `seed` (BFD opens them longest first); unpacked rows keep input order
    order = np.random.default_rng(opts.seed).permutation(len(bins)) if opts.packing else np.arange(len(bins))
    writer = ShardWriter(out, opts.max_seq_len, manifest.pad_id, rows_per_shard=opts.rows_per_shard)
    for b in order.tolist():
        members = bins[b]
        slices = [slice(int(offsets[i]), int(offsets[i] + lengths[i])) for i in members]
        writer.add_row(np.concatenate([ids[s] for s in slices]), np.concatenate([mask[s] for s in slices]),
                       lengths[members], samples[members])
    manifest.shards = [s.to_dict() for s in writer.close()]
    c = manifest.counts
    c["samples"], c["rows"] = len(lengths), len(bins)
    c["tokens"] = int(lengths.sum())
    c["loss_tokens"] = int(table["loss_tokens"].sum())
    c["padding_tokens"] = c["rows"] * opts.max_seq_len - c["tokens"]
    manifest.packing_efficiency = round(c["tokens"] / (c["rows"] * opts.max_seq_len), 6) if c["rows"] else 0.0
