"""Fixed-shape, memory-mappable shard files: `ShardWriter` writes them, `ShardReader` verifies and indexes them.

Numpy only (no polars, no transformers, no torch), so a GPU box reads shards with numpy alone.

One file per shard, `shard-00000.bin`::

    bytes 0..7    magic b"LORASHD\\0"
    bytes 8..11   format version, uint32 little-endian
    bytes 12..15  header length H, uint32 little-endian
    bytes 16..    JSON header (H bytes): rows, seq_len, pad_id, n_segments, sections[{name, dtype, shape, offset}]
    then, each section starting on a 64-byte boundary (little-endian):
      input_ids    uint32 [rows, seq_len]   positions past the row's tokens hold pad_id
      loss_mask    uint8  [rows, seq_len]   1 where the token is a training target; 0 on padding
      seg_offsets  uint64 [rows + 1]        row r's samples are segments seg_offsets[r] .. seg_offsets[r+1]-1
      seg_lens     uint32 [n_segments]      length of each packed sample, in row order
      seg_sample   uint64 [n_segments]      source record index of each sample (traceability to the input line)

A row packing samples of length 3 and 1 into seq_len 5 (pad 0)::

    input_ids [4 5 6 9 0]   loss_mask [0 1 1 1 0]   seq_lens [3 1]   → position ids restart: [0 1 2 0 0]
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .errors import ShardError
from .manifest import FORMAT_VERSION, MANIFEST_NAME, Manifest, fsync_dir

MAGIC = b"LORASHD\0"
ALIGN = 64
_PREFIX = struct.Struct("<8sII")
_SECTIONS = (("input_ids", "<u4"), ("loss_mask", "u1"), ("seg_offsets", "<u8"), ("seg_lens", "<u4"),
             ("seg_sample", "<u8"))
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")
_HASH_BASE = 0x100000001B3  # FNV's 64-bit prime: the base of `ShardReader.sample_keys`' polynomial hash


class Row(NamedTuple):
    """One packed row: `input_ids` (uint32, len seq_len), `loss_mask` (uint8), `seq_lens` (int64; sum ≤ seq_len),
    `sample_ids` (int64: the source record index of each packed sample)."""

    input_ids: np.ndarray
    loss_mask: np.ndarray
    seq_lens: np.ndarray
    sample_ids: np.ndarray


@dataclass(frozen=True)
class ShardInfo:
    file: str
    rows: int
    bytes: int
    sha256: str

    def to_dict(self) -> dict:
        return {"file": self.file, "rows": self.rows, "bytes": self.bytes, "sha256": self.sha256}


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.bin"


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class ShardWriter:
    """Accumulate rows and write `rows_per_shard` rows per file (temp name, fsync, rename: never a half shard).

    >>> import tempfile
    >>> w = ShardWriter(tempfile.mkdtemp(), seq_len=5, pad_id=0)
    >>> w.add_row([4, 5, 6, 9], [0, 1, 1, 1], seq_lens=[3, 1], sample_ids=[0, 7])
    >>> [s.rows for s in w.close()]
    [1]
    """

    def __init__(self, out_dir: str | Path, seq_len: int, pad_id: int, rows_per_shard: int = 4096) -> None:
        if seq_len <= 0 or rows_per_shard <= 0:
            raise ValueError(f"seq_len and rows_per_shard must be > 0; got {seq_len}, {rows_per_shard}")
        if not 0 <= pad_id < 2**32:
            raise ValueError(f"pad_id must fit uint32; got {pad_id}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.seq_len, self.pad_id, self.rows_per_shard = seq_len, pad_id, rows_per_shard
        self._infos: list[ShardInfo] = []
        self._next_sample = 0
        self._ids = np.zeros((0, seq_len), dtype="<u4")  # grown as rows come: memory follows the data, not
        self._mask = np.zeros((0, seq_len), dtype="u1")  # rows_per_shard × seq_len
        self._reset()

    def _reset(self) -> None:
        self._ids.fill(self.pad_id)  # the next shard reuses the buffers the last one grew
        self._mask.fill(0)
        self._offsets = [0]
        self._lens: list[int] = []
        self._samples: list[int] = []
        self._n = 0

    def add_row(self, input_ids, loss_mask, seq_lens, sample_ids=None) -> None:
        """Add one row. `input_ids`/`loss_mask` hold sum(seq_lens) tokens (or seq_len, with a pad tail of mask 0)."""
        ids = np.asarray(input_ids)
        mask = np.asarray(loss_mask)
        lens = [int(x) for x in seq_lens]
        total = sum(lens)
        if not lens or min(lens) <= 0 or total > self.seq_len:
            raise ValueError(f"seq_lens must be positive and sum to ≤ seq_len={self.seq_len}; got {lens}")
        if ids.shape != mask.shape or ids.ndim != 1 or len(ids) not in (total, self.seq_len):
            raise ValueError(f"input_ids {ids.shape} and loss_mask {mask.shape} must both have sum(seq_lens)={total} "
                             f"or seq_len={self.seq_len} entries")
        if len(ids) > total and mask[total:].any():
            raise ValueError("loss_mask must be 0 past sum(seq_lens) (those positions are padding)")
        if sample_ids is None:
            sample_ids = range(self._next_sample, self._next_sample + len(lens))
        samples = [int(s) for s in sample_ids]
        if len(samples) != len(lens):
            raise ValueError(f"sample_ids has {len(samples)} entries for {len(lens)} segments")
        if self._n == len(self._ids):
            self._grow()
        self._ids[self._n, :total] = ids[:total]
        self._mask[self._n, :total] = mask[:total]
        self._lens += lens
        self._samples += samples
        self._offsets.append(len(self._lens))
        self._next_sample = max(self._next_sample, max(samples) + 1)
        self._n += 1
        if self._n == self.rows_per_shard:
            self._flush()

    def _grow(self) -> None:
        rows = min(self.rows_per_shard, max(8, 2 * len(self._ids)))
        ids = np.full((rows, self.seq_len), self.pad_id, dtype="<u4")
        mask = np.zeros((rows, self.seq_len), dtype="u1")
        ids[: self._n], mask[: self._n] = self._ids[: self._n], self._mask[: self._n]
        self._ids, self._mask = ids, mask

    def _flush(self) -> None:
        if self._n == 0:
            return
        arrays = {
            "input_ids": self._ids[: self._n], "loss_mask": self._mask[: self._n],
            "seg_offsets": np.asarray(self._offsets, dtype="<u8"), "seg_lens": np.asarray(self._lens, dtype="<u4"),
            "seg_sample": np.asarray(self._samples, dtype="<u8"),
        }
        name = shard_name(len(self._infos))
        nbytes, digest = _write_shard(self.out_dir / name, arrays, self.seq_len, self.pad_id)
        self._infos.append(ShardInfo(name, self._n, nbytes, digest))
        self._reset()

    def close(self) -> list[ShardInfo]:
        """Write the last partial shard and return one `ShardInfo` per file, in order."""
        self._flush()
        fsync_dir(self.out_dir)
        return list(self._infos)


def _layout(rows: int, seq_len: int, n_segments: int) -> tuple[list[dict], int]:
    shapes = {"input_ids": [rows, seq_len], "loss_mask": [rows, seq_len], "seg_offsets": [rows + 1],
              "seg_lens": [n_segments], "seg_sample": [n_segments]}
    sections, offset = [], 0
    for name, dtype in _SECTIONS:
        sections.append({"name": name, "dtype": dtype, "shape": shapes[name], "offset": offset})
        offset += _align(int(np.prod(shapes[name])) * np.dtype(dtype).itemsize)
    return sections, offset


def _write_shard(path: Path, arrays: dict[str, np.ndarray], seq_len: int, pad_id: int) -> tuple[int, str]:
    rows, n_seg = len(arrays["input_ids"]), len(arrays["seg_lens"])
    sections, body = _layout(rows, seq_len, n_seg)
    header = {"format_version": FORMAT_VERSION, "rows": rows, "seq_len": seq_len, "pad_id": pad_id,
              "n_segments": n_seg, "sections": sections}
    data_start = _align(_PREFIX.size + len(json.dumps(header)) + 32)
    header["data_start"] = data_start
    hbytes = json.dumps(header, sort_keys=True).encode()
    assert _PREFIX.size + len(hbytes) <= data_start
    h = hashlib.sha256()
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        def put(b: bytes) -> None:
            f.write(b)
            h.update(b)

        put(_PREFIX.pack(MAGIC, FORMAT_VERSION, len(hbytes)) + hbytes)
        put(b"\0" * (data_start - _PREFIX.size - len(hbytes)))
        for sec in sections:
            raw = np.ascontiguousarray(arrays[sec["name"]], dtype=sec["dtype"]).tobytes()
            put(raw + b"\0" * (_align(len(raw)) - len(raw)))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return data_start + body, h.hexdigest()


def read_header(path: str | Path) -> dict:
    """Parse and check a shard's magic, version and JSON header; ShardError naming the file otherwise."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            prefix = f.read(_PREFIX.size)
            if len(prefix) < _PREFIX.size:
                raise ShardError(f"truncated: {len(prefix)} bytes, shorter than the shard prefix", path=path)
            magic, version, hlen = _PREFIX.unpack(prefix)
            if magic != MAGIC:
                raise ShardError(f"not a lora-data shard (magic {magic!r})", path=path)
            if version != FORMAT_VERSION:
                raise ShardError(f"shard format version {version} is not supported (this lora-data reads version "
                                 f"{FORMAT_VERSION}); prepare the data again", path=path)
            raw = f.read(hlen)
    except FileNotFoundError:
        raise ShardError("missing shard file listed in manifest.json; prepare the data again", path=path) from None
    try:
        header = json.loads(raw)
        _ = (header["rows"], header["seq_len"], header["pad_id"], header["sections"], header["data_start"])
    except (ValueError, KeyError, TypeError) as e:
        raise ShardError(f"corrupt shard header ({e})", path=path) from None
    return header


class ShardReader:
    """Random access to the rows of a prepared directory, memory-mapped.

    Checks, before any row is served: the manifest's format version; shard names (and symlinks) stay inside the
    directory; the manifest's own checksum (last, so the specific checks explain first); each
    file's size; each file's sha256 (when `verify`, the default); each shard header against the manifest; the segment
    tables. Any failure raises ShardError naming the file.

    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> w = ShardWriter(d, seq_len=5, pad_id=0)
    >>> w.add_row([4, 5, 6, 9], [0, 1, 1, 1], seq_lens=[3, 1])
    >>> _ = Manifest(seq_len=5, pad_id=0, shards=[s.to_dict() for s in w.close()]).save(d)
    >>> r = ShardReader(d)
    >>> len(r), r.seq_len, r[0].input_ids.tolist(), r[0].seq_lens.tolist()  # rows, row length, row 0, its samples
    (1, 5, [4, 5, 6, 9, 0], [3, 1])
    >>> r.samples_per_row().tolist()
    [2]
    >>> keys = r.sample_keys()  # one per sample: equal where the tokens are
    >>> keys.size, bool(keys[0] != keys[1])
    (2, True)
    """

    def __init__(self, out_dir: str | Path, *, verify: bool = True) -> None:
        self.dir = Path(out_dir)
        self.manifest = Manifest.load(self.dir)
        self._shards = [self._open(i, entry, verify) for i, entry in enumerate(self.manifest.shards)]
        self._starts = np.cumsum([0] + [len(s["seg_offsets"]) - 1 for s in self._shards])
        self.manifest.verify_checksum(self.dir / MANIFEST_NAME)  # last: the specific checks above explain better

    @property
    def seq_len(self) -> int:
        return self.manifest.seq_len

    @property
    def pad_id(self) -> int:
        return self.manifest.pad_id

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, index: int) -> Row:
        n = len(self)
        i = int(index)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"row {index} out of range for {n} rows")
        k = int(np.searchsorted(self._starts, i, side="right")) - 1
        s, r = self._shards[k], i - int(self._starts[k])
        a, b = int(s["seg_offsets"][r]), int(s["seg_offsets"][r + 1])
        return Row(np.array(s["input_ids"][r]), np.array(s["loss_mask"][r]),
                   np.array(s["seg_lens"][a:b], dtype=np.int64), np.array(s["seg_sample"][a:b], dtype=np.int64))

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def max_token_id(self) -> int:
        """The largest token id in any row (-1 for none); reads every shard."""
        return max((int(np.max(s["input_ids"])) for s in self._shards if s["input_ids"].size), default=-1)

    def sample_lengths(self) -> np.ndarray:
        """Lengths of every packed sample, all shards in order (for histograms)."""
        parts = [np.array(s["seg_lens"], dtype=np.int64) for s in self._shards]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def sample_keys(self) -> np.ndarray:
        """One uint64 per packed sample, all shards in order: a hash of its tokens and its length, equal for samples
        of the same tokens (to find eval samples that are training samples too; a collision is ~2^-64 for text that
        is not built to collide). Reads rows in blocks of about 4M tokens (~100 MB of temporaries)."""
        parts = []
        powers = np.cumprod(np.full(self.seq_len, _HASH_BASE, dtype=np.uint64), dtype=np.uint64)
        block = max(1, (1 << 22) // self.seq_len)
        for s in self._shards:
            offsets = np.asarray(s["seg_offsets"], dtype=np.int64)
            for r0 in range(0, offsets.size - 1, block):
                r1 = min(offsets.size - 1, r0 + block)
                lens = np.asarray(s["seg_lens"][offsets[r0]:offsets[r1]], dtype=np.int64)
                if not lens.size:
                    continue
                per_row = np.diff(offsets[r0:r1 + 1]).astype(np.int64)
                rows = np.repeat(np.arange(per_row.size), per_row)
                filled = np.bincount(rows, weights=lens, minlength=per_row.size).astype(np.int64)  # a row's samples
                ids = np.asarray(s["input_ids"][r0:r1])
                tokens = ids[np.arange(self.seq_len)[None, :] < filled[:, None]].astype(np.uint64) + np.uint64(1)
                starts = (np.cumsum(lens) - lens).astype(np.int64)  # samples lie back to back in a row, rows follow
                at = np.arange(tokens.size) - np.repeat(starts, lens)
                hashes = np.add.reduceat(tokens * powers[at], starts, dtype=np.uint64)
                parts.append(hashes * np.uint64(_HASH_BASE) + lens.astype(np.uint64))
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint64)

    def samples_per_row(self) -> np.ndarray:
        """How many samples each row packs, all shards in order."""
        parts = [np.diff(np.asarray(s["seg_offsets"], dtype=np.int64)) for s in self._shards]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def _open(self, index: int, entry: dict, verify: bool) -> dict[str, np.ndarray]:
        mpath = self.dir / MANIFEST_NAME
        name = entry.get("file") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not _SAFE_NAME.match(name) or ".." in name:
            raise ShardError(f"shard name {name!r} is not a plain file name inside the directory", path=mpath,
                             field=f"shards[{index}].file")
        path = self.dir / name
        if path.is_symlink() and path.resolve().parent != self.dir.resolve():
            raise ShardError(f"shard {name!r} is a symlink out of the directory (to {path.resolve()}); copy the file "
                             "in instead", path=mpath, field=f"shards[{index}].file")
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise ShardError("missing shard file listed in manifest.json; prepare the data again", path=path) from None
        if size != entry.get("bytes"):
            raise ShardError(f"size {size} bytes, manifest.json says {entry.get('bytes')} (truncated or replaced)",
                             path=path)
        if verify and sha256_file(path) != entry.get("sha256"):
            raise ShardError("sha256 does not match manifest.json (corrupted or modified)", path=path)
        header = read_header(path)
        expect = {"rows": entry.get("rows"), "seq_len": self.seq_len, "pad_id": self.pad_id}
        for key, want in expect.items():
            if header.get(key) != want:
                raise ShardError(f"header {key}={header.get(key)!r} but manifest.json says {want!r}", path=path)
        return _map_sections(path, header, size, verify)


def _map_sections(path: Path, header: dict, size: int, verify: bool) -> dict[str, np.ndarray]:
    sections, body = _layout(header["rows"], header["seq_len"], header.get("n_segments", -1))
    if header["sections"] != sections or header["data_start"] + body != size:
        raise ShardError(f"section table does not match a {header['rows']}-row shard of {size} bytes", path=path)
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for sec in sections:
        start = header["data_start"] + sec["offset"]
        count = int(np.prod(sec["shape"]))
        itemsize = np.dtype(sec["dtype"]).itemsize
        out[sec["name"]] = mm[start : start + count * itemsize].view(sec["dtype"]).reshape(sec["shape"])
    off, lens = out["seg_offsets"], out["seg_lens"]
    if off[0] != 0 or off[-1] != len(lens) or np.any(np.diff(off.astype(np.int64)) < 1):
        raise ShardError("segment offsets are inconsistent", path=path)
    if verify and len(lens):
        sums = np.add.reduceat(lens.astype(np.int64), off[:-1].astype(np.int64))
        if np.any(sums > header["seq_len"]) or np.any(lens == 0):
            raise ShardError("a row's segment lengths exceed seq_len", path=path)
    return out
