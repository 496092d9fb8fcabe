"""Checkpoints under `<ckpt_output_dir>/checkpoints/checkpoint-<step>/`, written atomically.

Write protocol (rank 0 commits, after every rank has written its files into the staging dir):

    checkpoints/.tmp-checkpoint-40/   ← every file written here, then fsync'd
    checkpoints/.tmp-checkpoint-40/COMPLETE   ← marker: step + file list, fsync'd last
    rename → checkpoints/checkpoint-40/   ← atomic on POSIX; the parent dir is fsync'd

A directory without COMPLETE (a crash between rename and nothing, or someone's copy) is never resumed from.
An existing complete checkpoint is never overwritten. `rotate` keeps the newest `keep` complete ones.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

MARKER = "COMPLETE"
SUBDIR = "checkpoints"
_NAME = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(RuntimeError):
    """The output directory's checkpoints cannot be used as asked (message says what to do)."""


def checkpoints_dir(ckpt_output_dir: str | Path) -> Path:
    return Path(ckpt_output_dir) / SUBDIR


def list_checkpoints(root: str | Path, *, complete_only: bool = True) -> list[tuple[int, Path]]:
    """(step, path) of checkpoint dirs in `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir() and (not complete_only or (p / MARKER).is_file()):
            found.append((int(m.group(1)), p))
    return sorted(found)


def newest_complete(root: str | Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def resume_point(ckpt_output_dir: str | Path, *, resume: bool) -> Path | None:
    """The checkpoint to resume from, None for a fresh start; refuses to clobber when `resume=False`."""
    root = checkpoints_dir(ckpt_output_dir)
    existing = list_checkpoints(root, complete_only=False)
    if existing and not resume:
        raise CheckpointError(
            f"{root} already holds {len(existing)} checkpoint(s) (newest: {existing[-1][1].name}); resume=False refuses "
            "to overwrite them: pass resume=True to continue that run, or choose another ckpt_output_dir")
    return newest_complete(root) if resume else None


def staging_dir(root: str | Path, step: int) -> Path:
    """A fresh (emptied) staging dir for the checkpoint of `step`."""
    tmp = Path(root) / f".tmp-checkpoint-{step}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit(tmp: str | Path, step: int) -> Path:
    """fsync every file of `tmp`, write the marker, rename to `checkpoint-<step>`; returns the final path."""
    tmp = Path(tmp)
    final = tmp.parent / f"checkpoint-{step}"
    if (final / MARKER).is_file():  # the same step again (e.g. a resumed run's final save): keep the earlier one
        shutil.rmtree(tmp)
        return final
    if final.exists():  # an incomplete leftover from a crash
        shutil.rmtree(final)
    files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
    for name in files:
        _fsync_file(tmp / name)
    write_json_atomic(tmp / MARKER, {"step": step, "files": files})
    _fsync_dir(tmp)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    return final


def rotate(root: str | Path, keep: int | None) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints (and older incomplete ones); returns what was removed."""
    if not keep:
        return []
    complete = list_checkpoints(root)
    if not complete:
        return []
    removed = [p for _, p in complete[:-keep]]
    newest_kept = complete[-keep][0] if len(complete) >= keep else complete[0][0]
    removed += [p for s, p in list_checkpoints(root, complete_only=False) if s < newest_kept and not (p / MARKER).exists()]
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed


def write_json_atomic(path: str | Path, obj: object) -> Path:
    """Write JSON to a temp file, fsync, rename over `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
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
