"""The body of `prepare`: stream every file through the tokenize stage, then pack, write shards and the manifest."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from ._prepare import (
    CHUNK_RECORDS,
    REJECTS_NAME,
    TMP_NAME,
    Options,
    _key,
    new_manifest,
    pack_rows,
    rows_order,
    write_rejection,
)
from ._stage import TokenizeStage
from .errors import DataError
from .manifest import Manifest
from .records import Record, Rejection, read_records
from .shards import ShardWriter


def run(paths: list[Path], out: Path, tok: Any, opts: Options, *, strict: bool, progress: bool) -> Manifest:
    manifest = new_manifest(opts, tok)
    counts = manifest.counts
    first: list[Rejection] = []
    listed = [0]
    with open(out / REJECTS_NAME, "w", encoding="utf-8") as rejects:
        def reject(r: Rejection, counted: bool = True) -> None:
            write_rejection(rejects, r)
            first.append(r) if not first else None
            listed[0] += 1
            if counted:
                counts["rejected"] += 1
                counts["rejected_by_reason"][r.code] = counts["rejected_by_reason"].get(r.code, 0) + 1

        stage = TokenizeStage(tok, out / TMP_NAME, seq_len=opts.max_seq_len, overlong=opts.overlong,
                              train_on_inputs=opts.train_on_inputs, counts=counts, reject=reject)
        _stream(paths, opts, stage, reject, manifest, progress)
        table, ids, mask = stage.finish()
    if strict and first:
        raise DataError(f"{first[0].reason} (--strict: {listed[0]} line(s) in {out / REJECTS_NAME}; no shards "
                        "written)", path=first[0].path, line=first[0].line, field=first[0].field)
    if len(table) == 0:
        raise DataError(f"no trainable record in {', '.join(map(str, paths))}; see {out / REJECTS_NAME}")
    _write(out, manifest, opts, table, ids, mask)
    manifest.cache_key = _key([s["sha256"] for s in manifest.sources], manifest.tokenizer["fingerprint"], opts)
    manifest.save(out)
    return manifest


def _stream(paths, opts: Options, stage: TokenizeStage, reject, manifest: Manifest, progress: bool) -> None:
    counts = manifest.counts
    bar = _bar(sum(p.stat().st_size for p in paths)) if progress else None
    formats = []
    for index, path in enumerate(paths):
        hasher = hashlib.sha256()
        reader = read_records(path, format=opts.format, field_messages=opts.field_messages,
                              field_instruction=opts.field_instruction, field_input=opts.field_input,
                              field_output=opts.field_output, source_index=index, hasher=hasher)
        chunk: list[Record] = []
        seen = 0
        for item in reader:
            if isinstance(item, Rejection):
                reject(item)
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
        manifest.sources.append({"path": str(path), "sha256": hasher.hexdigest(), "bytes": reader.counts["bytes"],
                                 "format": reader.detected})
    if bar is not None:
        bar.close()
    manifest.dataset_format = formats[0] if len(set(formats)) == 1 else "mixed"


def _bar(total: int):
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc="lora-data prepare", leave=False)


def _write(out: Path, manifest: Manifest, opts: Options, table, ids: np.ndarray, mask: np.ndarray) -> None:
    lengths = table["length"].to_numpy()
    offsets = table["offset"].to_numpy()
    samples = table["sample_id"].to_numpy()
    bins = pack_rows(lengths, opts.max_seq_len, opts.packing)
    writer = ShardWriter(out, opts.max_seq_len, manifest.pad_id, rows_per_shard=opts.rows_per_shard)
    for b in rows_order(bins, opts.seed, opts.packing).tolist():
        members = bins[b]
        slices = [slice(int(offsets[i]), int(offsets[i] + lengths[i])) for i in members]
        writer.add_row(np.concatenate([ids[s] for s in slices]), np.concatenate([mask[s] for s in slices]),
                       lengths[members], samples[members])
    manifest.shards = [s.to_dict() for s in writer.close()]
    c = manifest.counts
    c["samples"], c["rows"] = len(lengths), len(bins)
    c["tokens"] = int(lengths.sum())
    c["loss_tokens"] = int(table["loss_tokens"].sum()) if len(table) else 0
    c["padding_tokens"] = c["rows"] * opts.max_seq_len - c["tokens"]
    manifest.packing_efficiency = round(c["tokens"] / (c["rows"] * opts.max_seq_len), 6) if c["rows"] else 0.0
