"""Inputs read through Hugging Face `datasets`: a `save_to_disk` folder, parquet, CSV or arrow files.

Rows stream into the same validation as JSONL lines; in rejects.jsonl their `line` is the 1-based row number. A
cell that is null (an empty CSV cell, a missing struct field) counts as an absent key, so an Alpaca CSV with an empty
`input` column is valid. `datasets` is optional (`pip install 'lora-data[datasets]'`); gzipped JSONL needs nothing
more (`records` reads `.gz` itself). `source_sha256` hashes a file, or every file of a folder, for the cache key.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import DataError

KINDS = {".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
DISK_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


def is_dataset(path: str | Path) -> bool:
    """A save_to_disk folder or a parquet/CSV/arrow file (read by `datasets`, not line by line)."""
    p = Path(path)
    return p.suffix.lower() in KINDS or (p.is_dir() and any((p / m).is_file() for m in DISK_MARKERS))


def iter_rows(path: str | Path) -> Iterator[dict[str, Any]]:
    """Each row as a dict without its null cells, in order."""
    try:
        import datasets
    except ImportError:
        raise DataError("reading parquet, CSV, arrow or a saved dataset folder needs the `datasets` package: "
                        "pip install 'lora-data[datasets]' (or convert to JSONL)", path=path) from None
    p = Path(path)
    if p.is_dir():
        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds and len(ds) != 1:
                raise DataError(f"a DatasetDict with splits {', '.join(ds)} and no 'train': save the split you "
                                "want to prepare (ds['validation'].save_to_disk(...))", path=path)
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    else:
        ds = datasets.load_dataset(KINDS[p.suffix.lower()], data_files=str(p), split="train", streaming=True)
    for row in ds:
        yield {k: v for k, v in row.items() if v is not None}


def source_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    """sha256 of a file's bytes; for a folder, of every file's relative name and bytes in sorted order."""
    p = Path(path)
    h = hashlib.sha256()
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    for f in files:
        if p.is_dir():
            h.update(f"\0{f.relative_to(p).as_posix()}\0".encode())
        with open(f, "rb") as fh:
            while block := fh.read(chunk):
                h.update(block)
    return h.hexdigest()
