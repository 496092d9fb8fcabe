"""prepare's output directory: nothing of the user's removed, inputs never overwritten, the old set intact until the
new one is whole, one writer at a time, a full or read-only disk ends in one error line."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import _tiny
import lora_data
import pytest
from click.testing import CliRunner
from lora_data import DataError, LockedError, ShardReader
from lora_data.cli import cli

SEQ = 128


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return _tiny.write_jsonl(tmp_path_factory.mktemp("in") / "d.jsonl", _tiny.chat_records(60, seed=5))


@pytest.fixture(scope="module")
def other(tmp_path_factory) -> Path:
    return _tiny.write_jsonl(tmp_path_factory.mktemp("in2") / "e.jsonl", _tiny.chat_records(90, seed=6))


def _prep(inp, out, tok, **kw):
    return lora_data.prepare(inp, out, tok, max_seq_len=SEQ, verbose=False, rows_per_shard=4, **kw)


def _cli(*args, **kw):
    return CliRunner().invoke(cli, [str(a) for a in args], **kw)


def _snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file() and p.name != ".lock"}


def test_only_files_listed_in_our_manifest_are_removed(data, other, tmp_path, chatml_tokenizer_dir):
    out = tmp_path / "out"
    first = _prep(data, out, chatml_tokenizer_dir)
    mine = {"shard-backup.bin": b"user data", "notes.txt": b"keep me", "shard-99999.bin": b"not listed anywhere"}
    for name, blob in mine.items():
        (out / name).write_bytes(blob)
    second = _prep(other, out, chatml_tokenizer_dir)
    for name, blob in mine.items():
        assert (out / name).read_bytes() == blob
    old = {s["file"] for s in first.shards}
    assert not any((out / f).exists() for f in old - {s["file"] for s in second.shards})
    assert len(ShardReader(out)) == second.counts["rows"]
    assert not (out / ".lora-data-staging").exists()


def test_a_manifest_lora_data_did_not_write_removes_nothing(data, tmp_path, chatml_tokenizer_dir):
    """Its shard names stay untouched beside a set prepared around them once it is gone; the file itself is not
    replaced: prepare refuses, naming it."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "shard-00000.bin").write_bytes(b"precious")
    (out / "manifest.json").write_text(json.dumps({"format_version": 1, "shards": [{"file": "shard-00000.bin"}]}))
    before = _snapshot(out)
    with pytest.raises(DataError, match=re.escape("manifest.json: was not written by lora-data")):
        _prep(data, out, chatml_tokenizer_dir)
    assert _snapshot(out) == before
    (out / "manifest.json").unlink()
    m = _prep(data, out, chatml_tokenizer_dir)
    assert (out / "shard-00000.bin").read_bytes() == b"precious"  # the new set took names nothing had
    assert "shard-00000.bin" not in {s["file"] for s in m.shards}
    assert len(ShardReader(out)) == m.counts["rows"]


def test_a_rejects_file_lora_data_did_not_write_is_refused(data, tmp_path, chatml_tokenizer_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "rejects.jsonl").write_text("keep me\n")
    with pytest.raises(DataError, match=re.escape("rejects.jsonl: is not a lora-data rejects list")):
        _prep(data, out, chatml_tokenizer_dir)
    assert _snapshot(out) == {"rejects.jsonl": b"keep me\n"}


def test_a_failed_run_keeps_its_rejects_apart_from_the_set_that_stays(data, tmp_path, chatml_tokenizer_dir):
    """--strict fails on a bad line: the earlier set and its own rejects.jsonl stay as they were, the failed run's
    rejects go to rejects.failed.jsonl (named in the error), which the next successful run removes."""
    out = tmp_path / "out"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(data.read_text() + '{"messages": "not a list"}\n')
    _prep(bad, out, chatml_tokenizer_dir)
    before = _snapshot(out)
    with pytest.raises(DataError, match=re.escape(f"in {out / 'rejects.failed.jsonl'}; no shards written")):
        _prep(bad, out, chatml_tokenizer_dir, strict=True)
    after = _snapshot(out)
    bad_line = len(data.read_text().splitlines()) + 1
    assert f'"line": {bad_line}'.encode() in after.pop("rejects.failed.jsonl") and after == before
    _prep(data, out, chatml_tokenizer_dir)
    assert not (out / "rejects.failed.jsonl").exists()


def test_a_swap_that_fails_at_the_manifest_puts_the_earlier_rejects_back(data, tmp_path, chatml_tokenizer_dir,
                                                                         monkeypatch):
    """The commit replaces rejects.jsonl just before manifest.json: should the manifest's rename fail, the set that
    stays gets its own rejects.jsonl back."""
    import lora_data._staging as staging

    out = tmp_path / "out"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(data.read_text() + '{"messages": "not a list"}\n')
    _prep(data, out, chatml_tokenizer_dir)
    before = _snapshot(out)
    real = os.replace

    def replace(src, dst):
        if Path(dst) == out / "manifest.json":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(staging.os, "replace", replace)
    with pytest.raises(OSError, match="No space left"):
        _prep(bad, out, chatml_tokenizer_dir)
    monkeypatch.undo()
    assert _snapshot(out) == before and len(ShardReader(out)) > 0 and not (out / ".lora-data-staging").exists()


@pytest.mark.parametrize("name", ["rejects.jsonl", "manifest.json"])
def test_an_input_that_is_an_output_file_is_refused_before_anything_is_written(name, data, tmp_path,
                                                                              chatml_tokenizer_dir):
    out = tmp_path / "out"
    _prep(data, out, chatml_tokenizer_dir)
    inp = out / name
    if name == "rejects.jsonl":
        inp.write_bytes(data.read_bytes())
    link = tmp_path / "alias.jsonl"
    os.link(inp, link)  # the same file under another name is refused too
    before = _snapshot(out)
    for path in (inp, link):
        res = _cli("prepare", path, out, "--tokenizer", chatml_tokenizer_dir, "--max-seq-len", SEQ)
        assert res.exit_code == 1 and res.output.count("\n") == 1, res.output
        assert res.output.startswith(f"error: {path}: is an output of this prepare")
    assert _snapshot(out) == before


def test_a_failed_rerun_leaves_the_old_set_whole(data, other, tmp_path, chatml_tokenizer_dir, monkeypatch):
    out = tmp_path / "out"
    _prep(data, out, chatml_tokenizer_dir)
    before = _snapshot(out)
    import lora_data.shards

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(lora_data.shards.os, "fsync", full)
    res = _cli("prepare", other, out, "--tokenizer", chatml_tokenizer_dir, "--max-seq-len", SEQ)
    assert res.exit_code == 1 and "Traceback" not in res.output and res.output.count("\n") == 1, res.output
    assert res.output.startswith("error: ") and "No space left on device (the disk is full" in res.output
    monkeypatch.undo()
    assert _snapshot(out) == before and len(ShardReader(out)) > 0
    assert not (out / ".lora-data-staging").exists()


KILL_AT_COMMIT = textwrap.dedent("""
    import os, sys
    import lora_data, lora_data._staging as staging
    real = os.replace
    def replace(src, dst):
        if str(dst).endswith("manifest.json") and ".lora-data-staging" not in str(dst):
            os.kill(os.getpid(), 9)  # killed after the new shards moved in, before the manifest swap
        return real(src, dst)
    staging.os.replace = replace
    lora_data.prepare(sys.argv[1], sys.argv[2], sys.argv[3], max_seq_len=int(sys.argv[4]), rows_per_shard=4,
                      verbose=False)
""")


def test_a_rerun_killed_mid_swap_leaves_the_old_set_and_the_next_run_cleans_up(data, other, tmp_path,
                                                                                chatml_tokenizer_dir):
    out = tmp_path / "out"
    first = _prep(data, out, chatml_tokenizer_dir)
    proc = subprocess.run([sys.executable, "-c", KILL_AT_COMMIT, str(other), str(out), str(chatml_tokenizer_dir),
                           str(SEQ)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert lora_data.Manifest.load(out).checksum == first.checksum and len(ShardReader(out)) == first.counts["rows"]
    strays = {p.name for p in out.glob("shard-*.bin")} - {s["file"] for s in first.shards}
    assert strays  # the dead run's shards, listed in its journal
    second = _prep(other, out, chatml_tokenizer_dir)
    names = {p.name for p in out.iterdir()}
    assert names == {s["file"] for s in second.shards} | {"manifest.json", "rejects.jsonl", ".lock"}


HOLD = textwrap.dedent("""
    import sys, time
    from lora_data import locked
    with locked(sys.argv[1], what="holder"):
        print("held", flush=True)
        time.sleep(120)
""")


def test_a_second_prepare_into_the_same_dir_fails_at_once_naming_the_other(data, tmp_path, chatml_tokenizer_dir):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        res = _cli("prepare", data, out, "--tokenizer", chatml_tokenizer_dir, "--max-seq-len", SEQ)
        assert res.exit_code == 1 and res.output.count("\n") == 1, res.output
        assert res.output.startswith(f"error: {out}: in use by pid {holder.pid} (holder")
        with pytest.raises(LockedError), lora_data.locked(out):
            pass
    finally:
        holder.kill()  # SIGKILL: the OS drops the lock, nothing stale is left
        holder.wait()
    assert _prep(data, out, chatml_tokenizer_dir).counts["rows"] > 0


def test_the_lock_is_reentrant_within_a_process(data, tmp_path, chatml_tokenizer_dir):
    out = tmp_path / "out"
    with lora_data.locked(out, what="runtime cache entry"):
        assert _prep(data, out, chatml_tokenizer_dir).counts["rows"] > 0


def test_fifo_and_stdin_inputs_are_read(data, tmp_path, chatml_tokenizer_dir):
    want = _prep(data, tmp_path / "file", chatml_tokenizer_dir)
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_bytes(data.read_bytes()))
    writer.start()
    got = _prep(fifo, tmp_path / "fifo", chatml_tokenizer_dir)
    writer.join()
    assert got.counts == want.counts and got.sources[0]["sha256"] == want.sources[0]["sha256"]
    res = _cli("prepare", "-", tmp_path / "stdin", "--tokenizer", chatml_tokenizer_dir, "--max-seq-len", SEQ,
               "--rows-per-shard", 4, input=data.read_bytes())
    assert res.exit_code == 0, res.output
    assert lora_data.Manifest.load(tmp_path / "stdin").counts == want.counts


def test_a_directory_or_missing_input_is_one_clear_error(tmp_path, chatml_tokenizer_dir):
    for path, why in ((tmp_path, "is a directory"), (tmp_path / "nope.jsonl", "input file not found")):
        with pytest.raises(lora_data.DataError, match=why):
            _prep(path, tmp_path / "out", chatml_tokenizer_dir)


@pytest.fixture
def small_fs(tmpfs):
    """A 2 MiB tmpfs (the shared `tmpfs` fixture: skipped where mounting is not permitted)."""
    return tmpfs("2m")


def test_a_real_full_disk_and_a_read_only_one_end_in_one_error_line(small_fs, tmp_path, chatml_tokenizer_dir):
    big = _tiny.write_jsonl(tmp_path / "big.jsonl", _tiny.chat_records(3000, seed=7))
    out = small_fs / "out"
    res = _cli("prepare", big, out, "--tokenizer", chatml_tokenizer_dir, "--max-seq-len", 1024, "--no-packing")
    assert res.exit_code == 1 and "Traceback" not in res.output and res.output.count("\n") == 1, res.output
    assert "No space left on device (the disk is full" in res.output
    assert not (out / "manifest.json").exists() and not (out / ".lora-data-staging").exists()
    assert os.statvfs(small_fs).f_bfree > 0.9 * os.statvfs(small_fs).f_blocks  # nothing partial left behind
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    res = _cli("prepare", big, small_fs / "other", "--tokenizer", chatml_tokenizer_dir, "--max-seq-len", 1024)
    assert res.exit_code == 1 and res.output.count("\n") == 1 and "Read-only file system" in res.output, res.output


def test_a_lock_file_removed_as_it_is_taken_is_taken_again_at_its_path(tmp_path, monkeypatch):
    """The holder of a directory's lock may remove the directory as it lets go: a process that opened the lock file
    before that removal must not hold a lock on the removed file (a third would then take the path's) but retry."""
    import fcntl

    from lora_data import locks

    real, calls = fcntl.flock, []

    def flock(fd, op):
        if not calls:
            (tmp_path / ".lock").unlink()  # removed between this process's open and its flock
        calls.append(op)
        return real(fd, op)

    monkeypatch.setattr(locks.fcntl, "flock", flock)
    with locks.locked(tmp_path, what="t"):
        assert len(calls) == 2
        with open(tmp_path / ".lock") as other, pytest.raises(BlockingIOError):
            real(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # the lock held is the one at the path


def test_a_lock_file_of_the_users_own_is_never_overwritten(tmp_path):
    """A `.lock` left by an earlier lora-data or training process is taken over; a file of the user's own that
    happens to be named so is refused, kept as it was."""
    from lora_data import locks

    (tmp_path / ".lock").write_text("pid 1 (lora-data prepare: lora-cli prepare d.jsonl out)")
    with locks.locked(tmp_path, what="t"):
        pass
    (tmp_path / ".lock").write_text("build cache: do not delete")
    with pytest.raises(DataError, match=r"\.lock: not a lock file of lora-data or lora-runtime"), locks.locked(
            tmp_path, what="t"):
        pass
    assert (tmp_path / ".lock").read_text() == "build cache: do not delete"
    (tmp_path / ".lock").write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(DataError, match=r"not a lock file"), locks.locked(tmp_path, what="t"):
        pass
    assert (tmp_path / ".lock").read_bytes() == b"\xff\xfe\x00binary"


def test_gzip_bytes_on_stdin_or_a_fifo_are_decompressed(data, tmp_path, chatml_tokenizer_dir):
    """`zcat`-less pipes (`cat data.jsonl.gz | lora-data prepare -`): the bytes are gzip's, read as such."""
    import gzip

    want = _prep(data, tmp_path / "file", chatml_tokenizer_dir)
    packed = gzip.compress(data.read_bytes())
    res = _cli("prepare", "-", tmp_path / "stdin", "--tokenizer", chatml_tokenizer_dir, "--max-seq-len", SEQ,
               "--rows-per-shard", 4, input=packed)
    assert res.exit_code == 0, res.output
    assert lora_data.Manifest.load(tmp_path / "stdin").counts == want.counts
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_bytes(packed))
    writer.start()
    got = _prep(fifo, tmp_path / "fifo", chatml_tokenizer_dir)
    writer.join()
    assert got.counts == want.counts


def test_the_same_file_given_twice_is_refused(tmp_path, chatml_tokenizer_dir):
    """It trained twice, without a word (also through another spelling of the path, or a hard link); stdin as `-`
    and as /dev/stdin was read twice, the second time empty."""
    data = tmp_path / "chat.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n')
    (tmp_path / "other.jsonl").write_bytes(data.read_bytes())  # the same records in another file: two inputs
    os.link(data, tmp_path / "linked.jsonl")
    for again in (tmp_path / "." / "chat.jsonl", tmp_path / "linked.jsonl"):
        res = _cli("prepare", data, tmp_path / "other.jsonl", again, tmp_path / "out", "--tokenizer",
                   chatml_tokenizer_dir, "--max-seq-len", SEQ)
        assert res.exit_code == 1, res.output
        assert f"{again}: is input 1 and input 3 too (the same input): its records would be trained twice" in res.output
    for twice in (["org/chat-set", "org/chat-set"], ["-", "/dev/stdin"]):  # a hub id; stdin under two names
        res = _cli("prepare", *twice, tmp_path / "out", "--tokenizer", chatml_tokenizer_dir, "--max-seq-len", SEQ,
                   input=b"")
        assert res.exit_code == 1 and f"{twice[1]}: is input 1 and input 2 too (the same input)" in res.output, res.output
    assert not (tmp_path / "out").exists()


def test_stdin_given_twice_is_refused(tmp_path, chatml_tokenizer_dir):
    res = _cli("prepare", "-", "-", tmp_path / "out", "--tokenizer", chatml_tokenizer_dir, "--max-seq-len", SEQ,
               input=b"")
    assert res.exit_code != 0 and "standard input is given twice" in res.output, res.output
    assert not (tmp_path / "out").exists()
