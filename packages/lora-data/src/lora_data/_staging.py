"""Where `prepare` writes: a new shard set is built beside the old one and swapped in at the end.

    OUT/.lora-data-staging/   shard-00000.bin ... rejects.jsonl, spill files   (written by this run)
    commit: shards moved into OUT under names no file there has → rejects.jsonl → manifest.json (the commit point)
            → the files the old manifest listed (and only those) removed → the staging dir removed

Until `manifest.json` is replaced, OUT still holds the old set, whole and readable: a failed or killed run changes
nothing a reader sees (a failed run's rejects go to rejects.failed.jsonl beside it). `prepare` removes only files that
a checksummed lora-data manifest in OUT lists, never a user's file; it refuses an input that is one of its output
files, and a manifest.json or rejects file in OUT that lora-data did not write.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from .errors import DataError
from .locks import LOCK_NAME
from .manifest import MANIFEST_NAME, Manifest, fsync_dir

STAGING_NAME = ".lora-data-staging"
REJECTS_NAME = "rejects.jsonl"
FAILED_REJECTS_NAME = "rejects.failed.jsonl"  # a failed run's, beside the shard set it left in place
SPILL_NAME = "spill"  # token ids / masks of the tokenize stage, inside the staging dir
_OUR_SHARD = re.compile(r"^shard(-[a-z])?-\d{5}\.bin$")
_PREFIXES = ("shard", *(f"shard-{c}" for c in "bcdefgh"))


class Staging:
    """The staging dir of output dir `out` (the caller holds `out`'s lock)."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.dir = out / STAGING_NAME

    @property
    def rejects(self) -> Path:
        return self.dir / REJECTS_NAME

    def refuse_inputs(self, paths: list[Path]) -> None:
        """DataError if an input is one of the files a run writes or replaces (same inode, whatever the path)."""
        if not self.out.is_dir():
            return
        outputs = {_inode(self.out / n) for n in (MANIFEST_NAME, REJECTS_NAME, LOCK_NAME)}
        outputs |= {_inode(p) for p in self.out.iterdir() if _OUR_SHARD.match(p.name)}
        if self.dir.is_dir():
            outputs |= {_inode(p) for p in self.dir.rglob("*")}
        for p in paths:
            if str(p) != "-" and _inode(p) in outputs - {None}:
                raise DataError(f"is an output of this prepare (in {self.out}); it would be replaced while being "
                                "read: copy it elsewhere or choose another output directory", path=p)

    def refuse_foreign(self) -> None:
        """DataError where OUT holds a manifest.json or rejects file that lora-data did not write: a run replaces
        those, and a user's file of that name would be lost."""
        if not self.out.is_dir():
            return
        manifest = self.out / MANIFEST_NAME
        if manifest.exists() and _our_manifest(self.out, verified=False) is None:
            raise DataError("was not written by lora-data, and prepare writes its manifest there: prepare into "
                            "another directory, or move the file", path=manifest)
        for name in (REJECTS_NAME, FAILED_REJECTS_NAME):
            if (self.out / name).exists() and not _rejects_file(self.out / name):
                raise DataError("is not a lora-data rejects list, and prepare writes one there: prepare into "
                                "another directory, or move the file", path=self.out / name)

    def failed_rejects(self) -> Path:
        """Where a failed run leaves its rejects: rejects.jsonl, or beside a shard set that stays (whose rejects.jsonl
        is that set's) FAILED_REJECTS_NAME."""
        ours = _our_manifest(self.out, verified=False) is not None
        return self.out / (FAILED_REJECTS_NAME if ours else REJECTS_NAME)

    def begin(self) -> None:
        """Undo a dead run's half-done commit (files its journal moved in, not in the live manifest), then start clean."""
        if self.dir.exists():
            journal = _our_manifest(self.dir)
            live = _our_manifest(self.out)
            keep = {s["file"] for s in live.shards} if live else set()
            for name in {s["file"] for s in journal.shards} if journal else set():
                if name not in keep and _OUR_SHARD.match(name):
                    (self.out / name).unlink(missing_ok=True)
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True)

    def commit(self, manifest: Manifest) -> None:
        """Swap the staged set in (see the module docstring); `manifest.shards` name the staged files."""
        old = _our_manifest(self.out)
        staged = [s["file"] for s in manifest.shards]
        names = self._free_names(len(staged))
        for entry, name in zip(manifest.shards, names, strict=True):
            entry["file"] = name
        manifest.save(self.dir)  # the journal: what this commit moves into OUT (read by `begin` after a crash)
        live_rejects, earlier_rejects = self.out / REJECTS_NAME, self.dir / f"earlier-{REJECTS_NAME}"
        swapped = False
        try:
            for src, name in zip(staged, names, strict=True):
                os.replace(self.dir / src, self.out / name)
            if live_rejects.is_file():  # a second name for the old set's rejects, put back should the swap fail
                _link_or_copy(live_rejects, earlier_rejects)
            os.replace(self.rejects, live_rejects)
            swapped = True
            os.replace(self.dir / MANIFEST_NAME, self.out / MANIFEST_NAME)
        except BaseException:
            for name in names:  # not committed: OUT keeps only what it had
                (self.out / name).unlink(missing_ok=True)
            if swapped:  # this run's back in staging, the old set's back in place
                os.replace(live_rejects, self.rejects)
                if earlier_rejects.exists():
                    os.replace(earlier_rejects, live_rejects)
            raise
        fsync_dir(self.out)
        (self.out / FAILED_REJECTS_NAME).unlink(missing_ok=True)  # an earlier failed run's: this one succeeded
        for entry in old.shards if old else ():
            file = entry.get("file")
            if isinstance(file, str) and _OUR_SHARD.match(file) and file not in names:
                (self.out / file).unlink(missing_ok=True)
        self.discard()

    def keep_rejects(self, where: Path) -> None:
        """After a failed run (e.g. --strict), leave its rejects at `where` (`failed_rejects`) for the user to read."""
        if self.rejects.exists():
            os.replace(self.rejects, where)

    def discard(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def _free_names(self, n: int) -> list[str]:
        for prefix in _PREFIXES:
            names = [f"{prefix}-{i:05d}.bin" for i in range(n)]
            if not any(os.path.lexists(self.out / name) for name in names):
                return names
        raise DataError(f"every shard file name lora-data uses is taken in {self.out}; prepare into an empty "
                        "directory")


def _link_or_copy(src: Path, dst: Path) -> None:
    """`dst` a second name of `src` (a whole copy where hard links fail); never a part of it."""
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:  # a filesystem without hard links
        part = dst.with_name(f".{dst.name}.part")
        shutil.copy2(src, part)
        os.replace(part, dst)


def _inode(p: Path) -> tuple[int, int] | None:
    try:
        st = p.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _rejects_file(p: Path) -> bool:
    """Whether `p` reads as a rejects list: empty, or its first line a rejection (source, line, reason)."""
    try:
        with open(p, encoding="utf-8") as f:
            first = f.readline()
        if not first.strip():
            return True
        row = json.loads(first)
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(row, dict) and {"source", "line", "reason"} <= row.keys()


def _our_manifest(d: Path, *, verified: bool = True) -> Manifest | None:
    """The manifest in `d` if lora-data wrote it (loads, and with `verified` its checksum holds: without, a damaged
    set is still ours to replace); None otherwise."""
    try:
        m = Manifest.load(d)
        if verified:
            m.verify_checksum()
    except DataError:
        return None
    return m if m.created_by.startswith("lora-data") else None
