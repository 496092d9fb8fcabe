"""Checkpoints under `<ckpt_output_dir>/checkpoints/checkpoint-<step>/`, written atomically.

Write protocol (rank 0 commits, after every rank has written its files into the staging dir):

    checkpoints/.tmp-checkpoint-40/   ← every file written here, then fsync'd
    checkpoints/.tmp-checkpoint-40/COMPLETE   ← marker: step + file list with sizes and sha256, fsync'd last
    rename → checkpoints/checkpoint-40/   ← atomic on POSIX; the parent dir is fsync'd

A directory without COMPLETE (a crash between rename and nothing, or someone's copy) is never resumed from, and
the checkpoint resumed from is checked against its marker first (`verify`: a truncated or flipped file is an error
naming it). An existing complete checkpoint is never overwritten. `rotate` keeps the newest `keep` complete ones;
it renames a checkpoint out of the `checkpoint-<step>` namespace before deleting it, so a crash mid-delete never
leaves a half-deleted directory that still looks complete.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from lora_data.locks import holder
from lora_data.manifest import fsync_dir as _fsync_dir  # a module global, so fault-injection tests can patch it
from lora_data.shards import sha256_file

from lora_runtime.errors import CheckpointError

MARKER = "COMPLETE"
ADAPTER_SUMS = "adapter_checksums.json"  # next to the final adapter: sizes + sha256, checked before a merge
ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"
ADAPTER_FILES = [ADAPTER_WEIGHTS, ADAPTER_CONFIG]
SUBDIR = "checkpoints"
CONFIG_NAME = "lora_sft_config.json"  # the run's config + its resolved batch plan, in the run dir and every checkpoint
_NAME = re.compile(r"^checkpoint-(\d+)$")


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
    found = newest_complete(root) if resume else None
    adapter = Path(ckpt_output_dir) / ADAPTER_FILES[0]
    if adapter.is_file() and found is None:  # a finished run whose checkpoints were deleted (to free space, say)
        why = "resume=False" if not resume else "with no checkpoint to resume from, a run"
        raise CheckpointError(f"{ckpt_output_dir} holds a finished run's adapter ({adapter.name}); {why} would "
                              "train again from scratch over it: choose another ckpt_output_dir, or move the adapter out")
    if not resume:
        return None
    if found is not None:
        verify(found)
    return found


OUTPUT_LOCK_ENV = "LORA_SFT_OUTPUT_LOCKED"  # set (to its pid) by the process holding the output dir's lock


LOCK_WHAT = "training"  # the output lock's holder says so (lora_data.locks): a directory a run made
# what a run writes at the top of its output dir, beside the final adapter's and the tokenizer's own files
RUN_FILES = {CONFIG_NAME, "metrics.jsonl", "loss.png", "README.md", SUBDIR, "merged", ADAPTER_SUMS, "config.json",
             "chat_template.jinja", "chat_template.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
             "vocab.txt", "merges.txt", "spiece.model"}
RUN_PREFIXES = ("adapter_", "tokenizer")


def check_output_dir(ckpt_output_dir: str | Path, model_path: str | Path | None = None) -> None:
    """Refuse an output dir a run would write into at a user's cost: a file, the base model's own directory (its
    adapter_config.json would turn every later load of the model into base + adapter), or a directory that no
    training run made (no run record, complete or staged checkpoint, or training lock) holding files a run writes
    (its README.md, a tokenizer, metrics.jsonl, ...). A new or empty directory, a run's (to resume or replace), or
    one holding only other files passes."""
    from lora_data.locks import LOCK_NAME

    out = Path(ckpt_output_dir)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"ckpt_output_dir {out} is a file, not a directory; pass a directory for the run")
    if not out.is_dir():
        return
    if model_path is not None and Path(model_path).is_dir() and out.resolve() == Path(model_path).resolve():
        raise CheckpointError(f"ckpt_output_dir {out} is the base model's directory (model_path): the adapter written "
                              "there would make every later load of it base + adapter; pass another directory")
    lock = out / LOCK_NAME
    ours = checkpoints_dir(out)  # a `checkpoints` folder is a run's only where it holds a run's saves
    if (out / CONFIG_NAME).is_file() or list_checkpoints(ours) or any(ours.glob(".tmp-checkpoint-*")) or (
            lock.is_file() and f"({LOCK_WHAT}:" in lock.read_text(encoding="utf-8", errors="replace")):
        return  # a run's: resumed or replaced as the resume options say
    clashes = sorted(p.name for p in out.iterdir() if p.name in RUN_FILES or p.name.startswith(RUN_PREFIXES))
    if clashes:
        raise CheckpointError(f"ckpt_output_dir {out} holds {', '.join(clashes)}, which a run writes, and no "
                              "training run made it: pass a new or empty directory, or move those files out")


@contextlib.contextmanager
def output_lock(ckpt_output_dir: str | Path, model_path: str | Path | None = None) -> Iterator[None]:
    """One training run per output dir: an advisory flock on `<dir>/.lock` (lora_data.locked) held by the live
    process, released by the OS when it dies, so a SIGKILL never leaves a stale lock. A second run fails at once with
    lora_data.LockedError naming the holder's pid. Taken by global rank 0 (or by lora-cli's launcher for its torchrun,
    which passes OUTPUT_LOCK_ENV on to the workers). A dir this call created and left with only the lock is removed.
    First, `check_output_dir`: CheckpointError for a directory a run must not write into."""
    from lora_data import locked

    from lora_runtime.distributed import dist_env

    if os.environ.get(OUTPUT_LOCK_ENV) or not dist_env().is_main:
        yield
        return
    check_output_dir(ckpt_output_dir, model_path)
    out = Path(ckpt_output_dir)
    created = not out.exists()
    os.environ[OUTPUT_LOCK_ENV] = str(os.getpid())
    try:
        with locked(out, what=LOCK_WHAT):
            try:
                yield
            finally:  # under the lock: a run that takes it once released must not lose its dir (and lock) to this
                if created and out.is_dir() and {p.name for p in out.iterdir()} <= {".lock"}:
                    shutil.rmtree(out, ignore_errors=True)
    finally:
        os.environ.pop(OUTPUT_LOCK_ENV, None)


def resume_checkpoint(config: Any) -> Path | None:
    """The checkpoint a run of `config` resumes from: `resume_from` when given (verified; CheckpointError where
    ckpt_output_dir holds later checkpoints, or, for another dir's checkpoint, a run of its own), else
    `resume_point`. Later checkpoints saved by a run started from the same `resume_from` are this run's: the same
    call continues from the newest."""
    if config.resume_from and config.resume:
        if continued(config) is not None:  # this run's own, stopped: the same call goes on
            return resume_point(config.ckpt_output_dir, resume=True)
        found = verify(config.resume_from)
        step = saved_step(found)
        later = [p.name for s, p in list_checkpoints(checkpoints_dir(config.ckpt_output_dir)) if s > step]
        if later:  # its steps trained again would be saved under names those hold: kept, the new ones dropped
            raise CheckpointError(
                f"resume_from={found} is step {step}, but {checkpoints_dir(config.ckpt_output_dir)} already holds "
                f"later checkpoints ({', '.join(later)}): the resumed run would keep those in place of its own saves "
                "of the same steps, and a later resume would continue the old run. Drop resume_from to continue from "
                f"{later[-1]} (resume=True), pass a new ckpt_output_dir, or move those checkpoints out")
        if found.resolve().parent != checkpoints_dir(config.ckpt_output_dir).resolve() and (
                held := _another_run(config.ckpt_output_dir, step)):
            raise CheckpointError(
                f"resume_from={found} is another run's checkpoint (step {step}), but {config.ckpt_output_dir} holds a "
                f"run of its own ({held}): its metrics, checkpoints and adapter would be mixed with this run's or "
                "replaced by them. Pass a new ckpt_output_dir, or drop resume_from to continue the run there")
        return found
    return resume_point(config.ckpt_output_dir, resume=config.resume)


def continued(config: Any) -> Path | None:
    """The newest complete checkpoint of ckpt_output_dir where a run started from `resume_from` saved it: the same
    call after a stop goes on from it, also where `resume_from` is gone since (rotated away by save_total_limit)."""
    newest = newest_complete(checkpoints_dir(config.ckpt_output_dir))
    wanted = _resolved(config.resume_from)
    return newest if newest is not None and _resumed_from(newest) == wanted else None


def _resolved(path: str) -> Path:
    """A path as given by a user or a record (~ expanded), absolute, links followed: what two spellings share."""
    return Path(os.path.expanduser(path)).resolve()


def _json_key(path: Path, key: str) -> Any:
    """`key` of the JSON object in `path`; None where the file, the object or the key is missing or unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8")).get(key)
    except (OSError, ValueError, AttributeError):
        return None


def _resumed_from(ckpt: Path) -> Path | None:
    """The `resume_from` the run that saved `ckpt` was started with, resolved (None: none, or unreadable)."""
    value = _json_key(ckpt / CONFIG_NAME, "resume_from")
    return _resolved(value) if isinstance(value, str) else None


def _another_run(out: str | Path, step: int) -> str:
    """What of a run other than one resumed from another dir's checkpoint at `step` `out` holds: its checkpoints (this
    run's are all later), or metrics rows up to `step` (this run's only row there is its `resumed_at` marker)."""
    from lora_runtime.metrics import _whole_lines

    held = [p.name for _, p in list_checkpoints(checkpoints_dir(out))]
    try:  # a last row torn by a kill is dropped, as MetricsWriter drops it on resume
        rows = [json.loads(line) for line in _whole_lines(Path(out) / "metrics.jsonl")]
    except (OSError, ValueError):
        rows = []
    logged = [r["step"] for r in rows if isinstance(r, dict) and isinstance(r.get("step"), int) and r["step"] <= step
              and "resumed_at" not in r]
    if logged:
        held.append(f"metrics.jsonl rows of steps {logged[0]}-{logged[-1]}")
    return ", ".join(held)


def verify(path: str | Path, marker_name: str = MARKER, fix: str | None = None) -> Path:
    """Check every file the marker lists (size, then sha256); CheckpointError naming the first bad file."""
    path = Path(path)
    fix = fix or _fix(path)
    try:
        marker = json.loads((path / marker_name).read_text(encoding="utf-8"))
        files, sizes, digests = marker["files"], marker.get("bytes", {}), marker.get("sha256", {})
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path / marker_name}: unreadable ({e}); {fix}") from None
    for name in files:
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{f}: listed in {marker_name} but missing; {fix}")
        if name in sizes and f.stat().st_size != sizes[name]:
            raise CheckpointError(f"{f}: {f.stat().st_size} bytes, {marker_name} says {sizes[name]} (truncated or "
                                  f"replaced); {_edited(f, path / marker_name, fix)}")
        if name in digests and sha256_file(f) != digests[name]:
            raise CheckpointError(f"{f}: sha256 does not match {marker_name} (corrupted or modified); "
                                  f"{_edited(f, path / marker_name, fix)}")
    return path


def _edited(f: Path, seal_file: Path, fix: str) -> str:
    """The way out for a final adapter's JSON file (adapter_config.json: a base path fixed after the model moved)
    that still parses: it may have been edited on purpose, which removing the seal accepts. Never for a checkpoint,
    whose COMPLETE marker is what makes it one to resume from."""
    if seal_file.name != ADAPTER_SUMS or f.suffix != ".json":
        return fix
    try:
        json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return fix
    return f"if you edited it yourself, remove {seal_file} to take the adapter as it is now; else {fix}"


def seal(out_dir: str | Path, names: list[str], written: list[str] | None = None, step: int | None = None) -> Path:
    """Write ADAPTER_SUMS (sizes + sha256 of `names` present in `out_dir`) for `check_adapter`, with `written`: the
    names the final save wrote (the adapter's and the tokenizer's own files), and `step`: the optimizer step the
    adapter holds (each kept from an earlier seal if None)."""
    out = Path(out_dir)
    files = [n for n in names if (out / n).is_file()]
    if written is None:
        written = final_files(out)
    if step is None:
        step = sealed_step(out)
    return write_json_atomic(out / ADAPTER_SUMS, {"files": files, "bytes": {n: (out / n).stat().st_size for n in files},
                                                  "sha256": {n: sha256_file(out / n) for n in files},
                                                  **({"written": written} if written is not None else {}),
                                                  **({"step": step} if step is not None else {})})


def final_files(out_dir: str | Path) -> list[str] | None:
    """The names (files and folders) the final adapter's save wrote into `out_dir`, as its seal records them; None for
    a seal without them (an earlier version's) or no seal."""
    written = _json_key(Path(out_dir) / ADAPTER_SUMS, "written")
    return [str(n) for n in written] if isinstance(written, list) else None


def sealed_step(out_dir: str | Path) -> int | None:
    """The optimizer step of the final adapter in `out_dir`, as its seal records it (None: no seal, or an earlier
    version's)."""
    step = _json_key(Path(out_dir) / ADAPTER_SUMS, "step")
    return step if isinstance(step, int) else None


FINAL_STAGING = ".tmp-final-adapter"
FINAL_INCOMPLETE = ".final-adapter-incomplete"  # from the start of a final save until its seal


def write_final_adapter(out_dir: str | Path, save: Callable[[Path], Any], tokenizer: Any,
                        step: int | None = None) -> Path:
    """The final adapter (`save(dir)`) and the tokenizer are written into a staging dir, moved into `out_dir` file by
    file, fsynced, and sealed (ADAPTER_SUMS) last.

    FINAL_INCOMPLETE is written before anything else is touched (and an earlier seal removed) and removed after the
    seal: a run killed or failing meanwhile leaves it, and `check_adapter` refuses the directory, which may still
    hold the adapter of an earlier run, so a merge never takes that one for this run's. A failed write (a full disk)
    removes the staging dir and raises OSError(ENOSPC) with the reason, measured before the cleanup freed space."""
    out = Path(out_dir)
    write_json_atomic(out / FINAL_INCOMPLETE, {"started": time.time()})
    (out / ADAPTER_SUMS).unlink(missing_ok=True)
    tmp = out / FINAL_STAGING
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        entries = sorted(tmp.iterdir())
        written = [f.name for f in entries]
        for f in entries:  # a folder too (transformers writes named chat templates into one)
            for file in [f] if f.is_file() else [p for p in f.rglob("*") if p.is_file()]:
                _fsync_file(file)
            if f.is_dir() and (out / f.name).is_dir():
                shutil.rmtree(out / f.name)  # an earlier save's: os.replace takes no non-empty folder's place
            os.replace(f, out / f.name)
        tmp.rmdir()
        _fsync_dir(out)
    except Exception as e:
        reason = disk_full_reason(e, out)
        shutil.rmtree(tmp, ignore_errors=True)
        if reason is not None:
            raise OSError(errno.ENOSPC, reason) from e
        raise
    sealed = seal(out, ADAPTER_FILES, written, step)
    (out / FINAL_INCOMPLETE).unlink()
    return sealed


def check_adapter(adapter_dir: str | Path) -> None:
    """Before loading an adapter: a checkpoint is checked against COMPLETE, a final adapter against ADAPTER_SUMS,
    and an adapter with neither (another tool's, or one torn by a kill during the final save, which comes before the
    seal) must at least be whole: its config parses and its safetensors holds what its header promises."""
    d = Path(adapter_dir)
    if (d / MARKER).is_file():
        verify(d)
    elif (d / FINAL_INCOMPLETE).is_file():
        raise CheckpointError(f"{d}: the final adapter's save did not finish ({FINAL_INCOMPLETE} is there); any "
                              f"adapter files in it may be an earlier run's or torn; "
                              f"{_merge_instead(d, 'run the same train command again')}")
    elif (d / ADAPTER_SUMS).is_file():
        newest = newest_complete(checkpoints_dir(d))
        verify(d, ADAPTER_SUMS, "restore it from a backup" + (f", or use the adapter in {newest}" if newest else ""))
        step = sealed_step(d)
        if newest is not None and step is not None and saved_step(newest) > step:
            if live := holder(d):
                raise CheckpointError(f"{d}: its final adapter is of step {step}, and a run is training on there "
                                      f"({live}): wait for it to finish, or merge its newest complete checkpoint "
                                      f"({newest})")
            raise CheckpointError(f"{d}: its final adapter is of step {step}, but the run trained on to step "
                                  f"{saved_step(newest)} and stopped before writing its own: "
                                  f"{_merge_instead(d, '')}")
    else:
        _check_unsealed(d)


def holds_an_adapter(adapter_dir: str | Path) -> bool:
    """An adapter's files are there (whole or torn), or the run dir's complete checkpoints are: `check_adapter` then
    names what is wrong and what to merge instead, where a plain "no adapter here" would not."""
    d = Path(adapter_dir)
    return any((d / name).is_file() for name in ADAPTER_FILES) or newest_complete(checkpoints_dir(d)) is not None


def _merge_instead(d: Path, otherwise: str) -> str:
    """What to do about a run dir whose final adapter cannot be used: its newest complete checkpoint, if any."""
    newest = newest_complete(checkpoints_dir(d))
    if newest is None:
        return otherwise
    return (f"merge the newest complete checkpoint instead ({newest}), or run the same train command again to write "
            "the final adapter anew")


def _check_unsealed(d: Path) -> None:
    fix = _merge_instead(d, "train it again or restore it from a backup")
    torn = "the adapter is incomplete (as a run stopped during its final save leaves it)"
    config = d / ADAPTER_FILES[1]
    try:
        if not isinstance(json.loads(config.read_text(encoding="utf-8")), dict):
            raise ValueError("not a JSON object")
    except FileNotFoundError:
        raise CheckpointError(f"{config}: missing; {torn}; {fix}") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{config}: unreadable ({e}); {torn}; {fix}") from None
    weights = d / ADAPTER_FILES[0]
    if weights.is_file() and (problem := _safetensors_problem(weights)):
        raise CheckpointError(f"{weights}: {problem}; {torn}; {fix}")


def _safetensors_problem(path: Path) -> str | None:
    """What is wrong with a safetensors file's framing (8-byte header length, JSON header, tensor data as long as
    the header's offsets say), or None. Reads the header only."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or 8 + n > size:
            return f"truncated ({size:,} bytes, too short for its header)"
        try:
            header = json.loads(f.read(n))
            end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
            return f"unreadable header ({e})"
    if size - 8 - n != end:
        return f"truncated or padded ({size - 8 - n:,} bytes of tensor data, its header says {end:,})"
    return None


def _fix(path: Path) -> str:
    older = [p for s, p in list_checkpoints(path.parent) if p != path]
    then = f"resume falls back to {older[-1].name}" if older else "the run starts from scratch"
    return f"delete {path} (then {then}) or restore it from a backup"


def is_disk_full(e: BaseException) -> bool:
    """ENOSPC / EDQUOT, also from libraries that raise a plain Exception with the OS's words (the tokenizers
    library's Rust save: `Exception("No space left on device (os error 28)")`)."""
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(e)
    return any(words in text for words in (os.strerror(errno.ENOSPC), os.strerror(errno.EDQUOT),
                                           f"os error {errno.ENOSPC})", f"os error {errno.EDQUOT})"))


LOW_SPACE_BYTES = 1 << 20  # a write that failed with less than this left on its filesystem failed for want of space


def disk_full_reason(e: BaseException, where: str | Path) -> str | None:
    """Why the failed write `e` under `where` means a full disk, else None.

    Either ENOSPC / EDQUOT somewhere in its cause / context chain (`is_disk_full`), or, because torch.save's zip
    writer loses the errno on its way up ("[enforce fail at inline_container.cc] unexpected pos 84736 vs 84624", with
    "basic_ios::clear: iostream error" as its context), any failure on a filesystem with less than LOW_SPACE_BYTES
    left. The original error stays in the reason, so nothing it said is hidden."""
    seen: set[int] = set()
    link: BaseException | None = e
    while link is not None and id(link) not in seen:
        if is_disk_full(link):
            return str(getattr(link, "strerror", None) or link)
        seen.add(id(link))
        link = link.__cause__ or link.__context__
    try:
        st = os.statvfs(where)
    except OSError:
        return None
    free = st.f_bavail * st.f_frsize
    if free >= LOW_SPACE_BYTES:
        return None
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{free:,} bytes left on the filesystem; the save failed with {type(e).__name__}: {first}"


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
    write_json_atomic(tmp / MARKER, {"step": step, "files": files,
                                     "bytes": {n: (tmp / n).stat().st_size for n in files},
                                     "sha256": {n: sha256_file(tmp / n) for n in files}})
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
    for p in removed:  # out of the checkpoint-<step> namespace first: a crash mid-delete leaves no "complete" husk
        trash = p.with_name(f".deleting-{p.name}")
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(p, trash)
    _fsync_dir(Path(root))
    leftovers = [p for p in Path(root).glob(".deleting-checkpoint-*")]
    leftovers += [p for p in Path(root).glob(".tmp-checkpoint-*") if step_of(p) < complete[-1][0]]  # crashed saves
    for p in leftovers:
        shutil.rmtree(p, ignore_errors=True)
    return removed


def saved_step(ckpt: str | Path) -> int:
    """The step a complete checkpoint holds, as its marker records it (a copy under any name keeps it)."""
    try:
        return int(json.loads((Path(ckpt) / MARKER).read_text(encoding="utf-8"))["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return step_of(ckpt)


def step_of(path: str | Path) -> int:
    """The step in a `checkpoint-<step>` (or `.tmp-checkpoint-<step>`) name; -1 for any other name.

    >>> step_of("out/checkpoints/checkpoint-40"), step_of(".tmp-checkpoint-7"), step_of("adapter")
    (40, 7, -1)
    """
    tail = Path(path).name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else -1


def recorded_step(out_dir: str | Path) -> int | None:
    """The step CONFIG_NAME was written at (`resolved.step`; None where it says none, as older records)."""
    resolved = _json_key(Path(out_dir) / CONFIG_NAME, "resolved")
    step = resolved.get("step") if isinstance(resolved, dict) else None
    return step if isinstance(step, int) else None


def run_record(config: Any, plan: Any, **resolved: Any) -> dict[str, Any]:
    """What CONFIG_NAME holds: the config as given (secrets redacted), and under `resolved` the batch plan
    (`BatchPlan.to_dict()`) and whatever else the run decided (backend, versions, a shard dir's `prepared` options)."""
    from lora_runtime.config import redacted

    return {**redacted(config.to_dict()), "resolved": {**plan.to_dict(), **resolved}}


def write_json_atomic(path: str | Path, obj: object) -> Path:
    """Write JSON to a temp file, fsync, rename over `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=True, default=str)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk (or a kill's KeyboardInterrupt) leaves no half-written temp file behind
        tmp.unlink(missing_ok=True)
        raise
    return path


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


# ---------------------------------------------------------------------------------------------- changed settings
# What a checkpoint fixes: the adapter's shape and init, the base model, what the optimizer state means, and the
# data and its order. Every other setting may change on resume (max_steps, num_epochs, the learning-rate schedule,
# logging / eval / save cadence, save_total_limit, ...): it is applied, and logged as changed.
FIXED = ("model_path", "lora_r", "lora_alpha", "target_modules", "use_rslora", "use_dora", "init_lora_weights",
         "rank_pattern", "alpha_pattern", "loftq_config", "load_in_4bit", "load_in_8bit", "bnb_4bit_quant_type",
         "bnb_4bit_compute_dtype", "bnb_4bit_use_double_quant", "optim", "weight_decay", "adam_beta1", "adam_beta2",
         "adam_epsilon", "seed", "max_seq_len", "sample_packing", "dataset_type", "field_messages",
         "field_instruction", "field_input", "field_output", "train_on_inputs", "overlong", "chat_template",
         "eval_split_ratio")
# Not compared: where the run lives, how it is launched, and the batch split (its product is compared instead).
_NOT_COMPARED = ("ckpt_output_dir", "data_path", "data_output_dir", "resume", "resume_from", "micro_batch_size",
                 "gradient_accumulation_steps", "effective_batch_size", "nproc_per_node", "nnodes", "node_rank",
                 "rdzv_id", "rdzv_endpoint", "master_addr", "master_port", "backend")


def model_identity(model_path: str | Path) -> str | None:
    """A local model directory's identity, whatever the path it is reached by: sha256 over its config.json and, per
    weight file, its name, size and 16 slices of 64 KiB spread through it (another checkpoint of the same
    architecture differs there; a 140 GB model costs 16 reads a file). None for a hub id (its name is compared)."""
    import hashlib

    directory = Path(model_path)
    if not directory.is_dir():
        return None
    digest = hashlib.sha256()
    config = directory / "config.json"
    digest.update(config.read_bytes() if config.is_file() else b"")
    for weights in sorted(p for p in directory.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file()):
        size = weights.stat().st_size
        digest.update(f"{weights.name}:{size}".encode())
        with open(weights, "rb") as f:
            for k in range(16):
                f.seek(size * k // 16)
                digest.update(f.read(65536))
    return digest.hexdigest()[:20]


def data_identity(manifest: Any) -> str | None:
    """The shards' cache key (source bytes + tokenizer + options), else the manifest's own checksum."""
    return getattr(manifest, "cache_key", None) or getattr(manifest, "checksum", None)


def check_resume(ckpt: Path, config: Any, plan: Any, dataset: Any) -> list[str]:
    """Compare `config` with the one `ckpt` was trained with. A fixed setting that differs is a ConfigError (one
    issue per setting: both values and how to start fresh); returns the changed settings ("name: old → new")."""
    import dataclasses

    from lora_runtime.config import USER_PATH_FIELDS, ConfigError, redacted

    try:
        saved = json.loads((Path(ckpt) / "lora_sft_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    resolved = saved.pop("resolved", {}) if isinstance(saved, dict) else {}
    defaults = {f.name: f.default for f in dataclasses.fields(config)}
    fresh = ("; it cannot change on resume: pass the checkpoint's value to continue that run, or start fresh with the "
             "new one in a new `ckpt_output_dir` (resume=False refuses a dir that already has checkpoints)")
    issues, changed = [], []
    trained_on = resolved.get("model")  # a local model's identity (absent for a hub id, and in older checkpoints)
    for name, new in redacted(config.to_dict()).items():
        old = saved.get(name, defaults.get(name))
        if name in USER_PATH_FIELDS and isinstance(old, str):  # recorded before ~ was expanded on construction
            old = os.path.expanduser(old)
        if name == "model_path" and trained_on is not None:  # the model itself, whatever the path to it
            if model_identity(new) != trained_on:
                issues.append(f"`model_path` {new!r} is not the model {ckpt} was trained with (then {old!r}): its "
                              f"config.json or weights differ{fresh}")
            continue
        if name in _NOT_COMPARED or _same(old, new, unordered=name == "target_modules"):
            continue
        if name in FIXED:
            issues.append(f"`{name}` is {new!r} now but {ckpt} was trained with {old!r}{fresh}")
        else:
            changed.append(f"{name}: {old!r} → {new!r}")
    data = data_identity(dataset.reader.manifest)
    if resolved.get("data") and resolved["data"] != data:
        from lora_runtime.data import cache_root

        earlier = cache_root(config) / str(resolved["data"])[:20]  # where raw JSONL's shards of that key were cached
        before = saved.get("data_path") if isinstance(saved.get("data_path"), str) else None
        same = before is not None and _resolved(before) == _resolved(config.data_path)
        # the same file prepared anew: an edit, or another lora-data; another path: other data
        kept = ("; if the file is unchanged, lora-data now prepares it differently (an upgrade)" + (
            f": pass data_path={earlier}, the shards that run trained on, to continue it"
            if (earlier / "manifest.json").is_file() and not config.eval_split_ratio else "")) if same else ""
        was = f"{before}: " if before is not None and not same else ""
        issues.append(f"the data {config.data_path} is other than {ckpt} was trained on ({was}shards "
                      f"{str(resolved['data'])[:12]}, now {str(data)[:12]}){kept}{fresh}")
    rows = resolved.get("effective_batch_size")  # absent in older checkpoints: the dataset's state check guards them
    if isinstance(rows, int) and rows != plan.effective:
        issues.append(f"rows per optimizer step (micro_batch_size x gradient accumulation x processes) are "
                      f"{plan.effective} now but {ckpt} was trained with {rows}; they fix the data order: pass "
                      f"`effective_batch_size`={rows} to continue that run, or start fresh in a new `ckpt_output_dir`")
    if issues:
        raise ConfigError(issues)
    return changed


def _same(a: Any, b: Any, unordered: bool = False) -> bool:
    """Equal values, a tuple and a list alike; with `unordered`, lists of names in any order (PEFT matches
    target_modules as a set)."""
    def norm(v: Any) -> Any:
        v = list(v) if isinstance(v, tuple) else v
        return sorted(v, key=str) if unordered and isinstance(v, list) else v

    return norm(a) == norm(b)
