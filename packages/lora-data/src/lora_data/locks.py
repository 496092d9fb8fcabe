"""`locked(dir, what=...)`: one writer per directory at a time, across processes.

An advisory `fcntl.flock` on `dir/.lock`, held by the live process: the OS drops it when the process dies (SIGKILL
included), so a crash never leaves a stale lock behind. The file keeps the holder's pid and purpose, so the second
process is told who is in the way; a `.lock` that holds anything else is the user's own, refused and kept.
Re-entrant within a process (the runtime may hold a cache entry's lock and call `prepare` into it).

>>> import tempfile
>>> d = tempfile.mkdtemp()
>>> with locked(d, what="prepare"):
...     with locked(d, what="prepare"):  # the same process may enter again
...         pass
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from .errors import DataError

LOCK_NAME = ".lock"

_held: dict[str, list] = {}  # resolved dir → [open lock file, depth]
_guard = threading.Lock()


class LockedError(DataError):
    """Another live process holds the directory's lock; the message names it (pid, what it is doing)."""


@contextlib.contextmanager
def locked(path: str | Path, *, what: str = "lora-data") -> Iterator[Path]:
    """Hold `path`'s lock (creating `path` if needed) for the `with` body; LockedError at once if another holds it."""
    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    key = str(d.resolve())
    with _guard:
        if key in _held:
            _held[key][1] += 1
            entry = _held[key]
        else:
            entry = [_acquire(d, what), 1]
            _held[key] = entry
    try:
        yield d
    finally:
        with _guard:
            entry[1] -= 1
            if entry[1] == 0:
                del _held[key]
                entry[0].close()  # closing the descriptor releases the flock


def held_descriptor(path: str | Path) -> int | None:
    """The file descriptor of `path`'s lock while this process holds it, else None. A child process given it
    (`subprocess.Popen(pass_fds=...)`) holds the lock too, until every process that has it closed it or died."""
    with _guard:
        entry = _held.get(str(Path(path).resolve()))
        return entry[0].fileno() if entry else None


def holder(path: str | Path) -> str | None:
    """Who holds `path`'s lock ("pid N (what: ...)"), None where nobody does. It takes a shared lock for an instant
    (flock cannot be asked otherwise): not for a process that holds the lock itself where flock is emulated with POSIX
    locks (NFS), whose close would drop that process's own lock."""
    try:
        with open(Path(path) / LOCK_NAME, encoding="utf-8", errors="replace") as fh:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return fh.read().strip() or "another process"
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
    except OSError:  # no lock file, or a filesystem without flock: nobody known
        pass
    return None


def _acquire(d: Path, what: str):
    lock_path = d / LOCK_NAME
    for _ in range(3):
        d.mkdir(parents=True, exist_ok=True)
        fh = open(lock_path, "a+", encoding="utf-8", errors="replace")  # noqa: SIM115 - kept open while held
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise LockedError(f"in use by {holder}; wait for it to finish or use another directory (lock file "
                              f"{lock_path})", path=d) from None
        except OSError:
            fh.close()
            raise
        try:  # the file locked is still the one at the path: not one its holder removed before letting it go
            if os.stat(lock_path).st_ino == os.fstat(fh.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        fh.close()
    else:
        raise LockedError(f"its lock file {lock_path} keeps being removed by another process", path=d)
    fh.seek(0)
    earlier = fh.read(4096)
    if earlier and not re.match(r"pid \d+ \(", earlier):  # a file of the user's own, not one a lock left
        fh.close()
        raise DataError("not a lock file of lora-data or lora-runtime, and this directory's lock would overwrite it: "
                        "move it, or use another directory", path=lock_path)
    fh.seek(0)
    fh.truncate()
    fh.write(f"pid {os.getpid()} ({what}: {' '.join(sys.argv[:1] + sys.argv[1:4])})")
    fh.flush()
    return fh
