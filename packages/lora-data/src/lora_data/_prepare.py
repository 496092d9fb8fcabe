"""`prepare(inputs, out_dir, tokenizer, max_seq_len=...)`: validate → render → tokenize → pack → shards + manifest.

Deterministic: the same inputs, tokenizer and options give byte-identical shards (`seed` orders the packed rows).
One run per output dir at a time (`locks.locked`); the new set is staged beside the old one and swapped in at the
end (`_staging`), so a failed or killed run leaves the old set as it was.
"""

from __future__ import annotations

import os
import stat
import sys
import traceback
from pathlib import Path
from typing import Any

from ._run import run
from ._stage import default_workers
from ._staging import SPILL_NAME, Staging
from .errors import DataError
from .fingerprint import tokenizer_fingerprint
from .locks import locked
from .manifest import Manifest
from .options import Options
from .records import STDIN
from .rows import is_dataset, is_hub_dataset, source_sha256
from .tokenizer import load_tokenizer


def cache_key(inputs, tokenizer: Any, *, data_split: str | None = None, data_config: str | None = None,
              **options: Any) -> str:
    """Content hash of the inputs' bytes + the tokenizer's fingerprint + every option: equal keys, equal shards.

    The runtime compares it with `Manifest.load(dir).cache_key` to reuse prepared shards. A hub dataset's hash is
    over its rows, so this streams the whole split.
    """
    paths = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    opts = Options.from_kwargs(**options)
    hashes = [source_sha256(p, split=data_split, config=data_config) for p in paths]
    return opts.cache_key(hashes, tokenizer_fingerprint(load_tokenizer(tokenizer)))


def prepare(inputs, output_dir, tokenizer: Any, *, max_seq_len: int, strict: bool = False, progress: bool | None = None,
            verbose: bool = True, data_split: str | None = None, data_config: str | None = None,
            workers: int | None = None, **options: Any) -> Manifest:
    """Prepare `inputs` (a path or a list) into `output_dir`; return the Manifest.

    Inputs: JSONL (plain or gzip; also a FIFO, `-` for stdin), or parquet / CSV / arrow files, `save_to_disk` folders
    and Hugging Face hub dataset names such as `org/name` that are not local paths (read with `datasets`, see `rows`).
    `data_split` (hub default "train"; a saved DatasetDict's: "train" or its only split) and `data_config` (a hub
    dataset's configuration) apply to those inputs.
    `workers`: processes rendering the chat template (default: the CPU cores available; 1 = none); the output is
    byte-identical whatever the number. Not an option of the cache key.

    options: format ("auto"|"messages"|"alpaca"), field_messages/field_instruction/field_input/field_output, overlong
    ("drop"|"truncate"|"split"), packing, train_on_inputs, seed, rows_per_shard. `strict`: any line in rejects.jsonl
    raises DataError and no shards are written. `progress`: a bar on stderr (default: only when stderr is a TTY).
    `verbose`: print the summary (counts, rejects by reason, packing efficiency) on stderr.
    `tokenizer`: a loaded tokenizer, a local directory or a Hugging Face hub id (see `tokenizer.load_tokenizer`).
    """
    opts = Options.from_kwargs(max_seq_len, **options)
    opts.check()
    paths = [Path(inputs)] if isinstance(inputs, (str, Path)) else [Path(p) for p in inputs]
    for p in paths:
        _check_input(p)
    if [str(p) for p in paths].count(STDIN) > 1:
        raise DataError("standard input is given twice; it can be read once", path=STDIN)
    _refuse_repeats(paths)
    out = Path(output_dir)
    staging = Staging(out)
    staging.refuse_inputs(paths)
    staging.refuse_foreign()
    tok = load_tokenizer(tokenizer)
    with locked(out, what="lora-data prepare"):
        staging.begin()
        failed_rejects = staging.failed_rejects()
        try:
            manifest = run(paths, staging.dir, tok, opts, strict=strict, rejects_shown=failed_rejects,
                           progress=sys.stderr.isatty() if progress is None else progress,
                           spill=staging.dir / SPILL_NAME, split=data_split, config=data_config,
                           workers=default_workers() if workers is None else max(1, int(workers)))
            staging.commit(manifest)
        except BaseException as e:
            traceback.clear_frames(e.__traceback__)  # drops the spill memmaps, so discard() frees their space now
            if isinstance(e, DataError):
                staging.keep_rejects(failed_rejects)  # --strict, or nothing trainable: the message points there
            raise
        finally:
            staging.discard()
    if verbose:
        print(f"lora-data prepare: {manifest.summary()}", file=sys.stderr)
    return manifest


def _refuse_repeats(paths: list[Path]) -> None:
    """The same input given twice would be trained twice (a file, a folder, a hub id), or read twice where it can be
    read once (stdin as `-` and as /dev/stdin, a FIFO under two names): refused, naming both arguments."""
    seen: dict[object, int] = {}
    for n, p in enumerate(paths, 1):
        try:
            st = os.fstat(0) if str(p) == STDIN else p.stat()
            key: object = (st.st_dev, st.st_ino)
        except OSError:  # a hub id
            key = str(p)
        if key in seen:
            raise DataError(f"is input {seen[key]} and input {n} too (the same input): its records would be trained "
                            "twice, or read twice where they can be read once; give it once", path=p)
        seen[key] = n


def _check_input(p: Path) -> None:
    """A regular file, a save_to_disk folder, a FIFO / character device (read as a stream), `-` (stdin), or a hub
    dataset name (`org/name`, not a local path; loading it is checked when it is read)."""
    if str(p) == STDIN or is_hub_dataset(p):
        return
    try:
        mode = p.stat().st_mode
    except FileNotFoundError:
        raise DataError("input file not found", path=p) from None
    except OSError as e:
        raise DataError(f"cannot read: {e.strerror}", path=p) from None
    if stat.S_ISDIR(mode) and not is_dataset(p):
        raise DataError("is a directory; pass JSONL files or a folder written by datasets' save_to_disk", path=p)
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISFIFO(mode) or stat.S_ISCHR(mode)):
        raise DataError("not a regular file, FIFO or character device", path=p)
