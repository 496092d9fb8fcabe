"""Inputs read through Hugging Face `datasets`: a `save_to_disk` folder, parquet, CSV or arrow files, a hub dataset.

A name shaped like `org/name` that is not a local path is a hub dataset: `datasets.load_dataset(name, config,
split=split, streaming=True)` (honours HF_HOME, HF_TOKEN, HF_HUB_OFFLINE; failing to load it is one DataError).

Rows stream into the same validation as JSONL lines; in rejects.jsonl their `line` is the 1-based row number. A
cell that is null (an empty CSV cell, a missing struct field) counts as an absent key, so an Alpaca CSV with an empty
`input` column is valid; inside nested records too (arrow gives every message every field some message has, null
where it has none), except a message's `content`, which may be null. A CSV cell is the text it holds: "NA", "None"
and "4" stay strings (pandas would read them as missing and as a number). `datasets` is optional (`pip install
'lora-data[datasets]'`); gzipped JSONL needs nothing more (`records` reads `.gz` itself). `source_sha256` hashes
a file, or every file of a folder, for the cache key.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import DataError

KINDS = {".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
DISK_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def is_hub_dataset(path: str | Path) -> bool:
    """`org/name` that does not exist locally: a Hugging Face hub dataset (a local path always wins).

    >>> is_hub_dataset("some-org/some-dataset"), is_hub_dataset("./data.jsonl"), is_hub_dataset("data.jsonl")
    (True, False, False)
    """
    s = str(path)
    return bool(_HUB_NAME.fullmatch(s)) and not s.lower().endswith((".jsonl", ".json", ".gz", *KINDS)) \
        and not os.path.lexists(s)


def is_dataset(path: str | Path) -> bool:
    """A save_to_disk folder, a parquet/CSV/arrow file or a hub dataset (read by `datasets`, not line by line)."""
    p = Path(path)
    return p.suffix.lower() in KINDS or (p.is_dir() and any((p / m).is_file() for m in DISK_MARKERS)) \
        or is_hub_dataset(path)


def row_text(row: dict[str, Any]) -> str:
    """A row as the JSON text rejects.jsonl shows and the source hash covers."""
    return json.dumps(row, ensure_ascii=False, default=str)


def iter_rows(path: str | Path, *, split: str | None = None, config: str | None = None) -> Iterator[dict[str, Any]]:
    """Each row as a dict without its null cells, in order.

    `split` picks a hub dataset's split (default "train") or a saved DatasetDict's (default: "train", or its only
    split); `config` is a hub dataset's configuration name.
    """
    try:
        import datasets
    except ImportError:
        raise DataError("reading parquet, CSV, arrow, a saved dataset folder or a hub dataset needs the `datasets` "
                        "package: pip install 'lora-data[datasets]' (or convert to JSONL)", path=path) from None
    p = Path(path)
    if is_hub_dataset(path):
        yield from _hub_rows(datasets, str(path), split or "train", config)
        return
    if p.is_dir():
        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            if split is not None and split not in ds:
                raise DataError(f"no split {split!r}; its splits: {', '.join(ds)}", path=path, field="data_split")
            if split is None and "train" not in ds and len(ds) != 1:
                raise DataError(f"a DatasetDict with splits {', '.join(ds)} and no 'train': pick one with "
                                "--data-split", path=path)
            ds = ds[split or ("train" if "train" in ds else next(iter(ds)))]
    else:
        kind = KINDS[p.suffix.lower()]
        as_text = _csv_as_text(datasets, p) if kind == "csv" else {}
        ds = datasets.load_dataset(kind, data_files=str(p), split="train", streaming=True, **as_text)
    for row in ds:
        yield present(row)


def _csv_as_text(datasets: Any, path: Path) -> dict[str, Any]:
    """load_dataset("csv") options that keep every cell the text it holds: string columns (named by the header), and
    only an empty cell missing."""
    import csv

    with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
        header = next(csv.reader(f), [])
    if twice := sorted({name for name in header if header.count(name) > 1}):
        raise DataError(f"the header names column(s) {', '.join(map(repr, twice))} twice: one would be read in place "
                        "of the other; rename one", path=path, line=1)
    features = datasets.Features({name: datasets.Value("string") for name in header})
    return {"features": features, "keep_default_na": False, "na_values": [""]}


def present(value: Any, *, top: bool = True) -> Any:
    """`value` without its null cells: at the top, and inside nested records every null member but a message's
    `content` (a struct column holds every field any row has).

    >>> present({"messages": [{"role": "user", "content": None, "name": None}], "input": None})
    {'messages': [{'role': 'user', 'content': None}]}
    """
    if isinstance(value, dict):
        return {k: present(v, top=False) for k, v in value.items() if v is not None or (k == "content" and not top)}
    if isinstance(value, list):
        return [present(v, top=False) for v in value]
    return value


def _hub_rows(datasets: Any, name: str, split: str, config: str | None) -> Iterator[dict[str, Any]]:
    what = f"the hub dataset (split {split!r}" + (f", config {config!r})" if config else ")")
    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=True)
        rows = iter(ds)
        first = next(rows, None)
    except Exception as e:  # offline and not cached, unknown or gated repo, unknown split/config, network down
        offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
        hint = (" (HF_HUB_OFFLINE is set: only the local cache under HF_HOME is read; unset it or "
                "save_to_disk the dataset and pass that folder)" if offline else "")
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(f"cannot load {what}{hint}: {reason}", path=name) from None
    if first is None:
        return
    yield present(first)
    for row in rows:
        yield present(row)


def source_sha256(path: str | Path, chunk: int = 1 << 22, *, split: str | None = None,
                  config: str | None = None) -> str:
    """sha256 of a file's bytes; for a folder, of every file's relative name and bytes in sorted order (and the
    split, if given); for a hub dataset, of its rows' JSON texts (streamed: the whole split is read)."""
    if is_hub_dataset(path):
        h = hashlib.sha256()
        for row in iter_rows(path, split=split, config=config):
            h.update(row_text(row).encode())
            h.update(b"\n")
        return h.hexdigest()
    p = Path(path)
    h = hashlib.sha256()
    if p.is_dir() and split is not None:  # another split of the same saved DatasetDict is another source
        h.update(f"\0split={split}\0".encode())
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    for f in files:
        if p.is_dir():
            h.update(f"\0{f.relative_to(p).as_posix()}\0".encode())
        with open(f, "rb") as fh:
            while block := fh.read(chunk):
                h.update(block)
    return h.hexdigest()
