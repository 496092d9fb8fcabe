"""Corruption: a flipped byte or a truncation in a shard, a manifest, a checkpoint file or the final adapter is
caught before use, with an error naming the file. Seeded flips (offset and bit mask), so every run tries the same."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import _tiny
import pytest
from lora_data import ShardError, ShardReader
from lora_runtime import checkpoint

SEED = 8


def flip(path: Path, offset: int, mask: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    path.write_bytes(bytes(data))


def truncate(path: Path, size: int) -> None:
    path.write_bytes(path.read_bytes()[:size])


@pytest.fixture
def shard_dir(tmp_path) -> Path:
    """3 shards of packed rows (the last one partial) and their manifest."""
    rng = random.Random(SEED)
    rows = []
    for _ in range(12):
        lens = [rng.randint(1, 10) for _ in range(rng.randint(1, 3))]
        ids = [rng.randrange(1, 1000) for _ in range(sum(lens))]
        rows.append((ids, [rng.randint(0, 1) for _ in ids], lens))
    d = _tiny.write_shards(tmp_path / "shards", rows, seq_len=32, rows_per_shard=5, fingerprint="f" * 16)
    ShardReader(d)  # whole before any damage
    return d


def test_flipped_or_truncated_shards_are_caught_naming_the_file(shard_dir, counts):
    rng = random.Random(SEED)
    pristine = {p.name: p.read_bytes() for p in shard_dir.iterdir()}
    shards = sorted(shard_dir.glob("shard-*.bin"))
    cases = [("flip", rng.choice(shards), None) for _ in range(45)] + [("cut", s, None) for s in shards for _ in range(3)]
    for kind, path, _ in cases:
        size = path.stat().st_size
        if kind == "flip":
            flip(path, rng.randrange(size), rng.randrange(1, 256))
        else:
            truncate(path, rng.choice([0, 7, 15, rng.randrange(size)]))
        with pytest.raises(ShardError) as e:
            ShardReader(shard_dir)
        assert str(path) in str(e.value), e.value
        path.write_bytes(pristine[path.name])
    counts.add("corruptions_caught_shard", len(cases))


def test_flipped_or_truncated_manifest_is_caught_naming_the_file(shard_dir, counts):
    rng = random.Random(SEED)
    path = shard_dir / "manifest.json"
    pristine = path.read_bytes()
    caught = harmless = 0
    for i in range(60):
        if i % 6 == 5:
            truncate(path, rng.randrange(len(pristine)))
        else:
            flip(path, rng.randrange(len(pristine)), rng.randrange(1, 256))
        try:
            ShardReader(shard_dir)
        except ShardError as e:  # ManifestError is one
            assert "manifest.json" in str(e), e
            caught += 1
        else:  # only a flip that leaves the JSON meaning unchanged (space ↔ tab) may pass
            assert json.loads(path.read_bytes()) == json.loads(pristine)
            harmless += 1
        path.write_bytes(pristine)
    assert caught >= 55
    counts.add("corruptions_caught_manifest", caught)
    counts.add("manifest_flips_meaning_unchanged", harmless)


@pytest.fixture
def run_copy(trials, tmp_path) -> Path:
    """A copy of the uninterrupted run's output dir: final adapter (sealed) and checkpoints 5 and 6."""
    out = tmp_path / "run"
    shutil.copytree(trials["reference"]["out"], out)
    return out


@pytest.mark.slow  # trains (the session's trials)
def test_flipped_or_truncated_checkpoint_file_is_caught_before_resuming(run_copy, counts):
    rng = random.Random(SEED)
    ckpt = run_copy / "checkpoints" / "checkpoint-6"
    assert checkpoint.resume_point(run_copy, resume=True) == ckpt
    files = sorted(p for p in ckpt.iterdir() if p.name != checkpoint.MARKER)
    assert {"adapter_model.safetensors", "optimizer.pt", "trainer_state.json", "data_state.json"} <= {
        p.name for p in files}
    n = 0
    for path in files:
        pristine = path.read_bytes()
        for kind in ("flip", "flip", "cut"):
            if kind == "flip":
                flip(path, rng.randrange(len(pristine)), rng.randrange(1, 256))
            else:
                truncate(path, rng.randrange(len(pristine)))
            with pytest.raises(checkpoint.CheckpointError) as e:
                checkpoint.resume_point(run_copy, resume=True)
            assert str(e.value).startswith(f"{path}: ") and "checkpoint-5" in str(e.value), e.value  # fix named
            path.write_bytes(pristine)
            n += 1
    marker = ckpt / checkpoint.MARKER
    truncate(marker, marker.stat().st_size // 2)
    with pytest.raises(checkpoint.CheckpointError, match="COMPLETE: unreadable"):
        checkpoint.resume_point(run_copy, resume=True)
    counts.add("corruptions_caught_checkpoint", n + 1)


@pytest.mark.slow  # trains (the session's trials)
def test_flipped_or_truncated_adapter_is_caught_before_a_merge(run_copy, trials, counts):
    from lora_runtime.merge import merge_adapter

    rng = random.Random(SEED)
    assert (run_copy / checkpoint.ADAPTER_SUMS).is_file()
    n = 0
    for name in checkpoint.ADAPTER_FILES:
        path = run_copy / name
        pristine = path.read_bytes()
        for kind in ("flip", "flip", "flip", "cut"):
            if kind == "flip":  # most of a safetensors file is tensor data: a flip there loads without complaint
                flip(path, rng.randrange(len(pristine)), rng.randrange(1, 256))
            else:
                truncate(path, rng.randrange(len(pristine)))
            with pytest.raises(checkpoint.CheckpointError) as e:
                merge_adapter(run_copy, trials["reference"]["out"], run_copy / "merged")
            assert str(e.value).startswith(f"{path}: "), e.value
            assert not (run_copy / "merged").exists()
            path.write_bytes(pristine)
            n += 1
    checkpoint.check_adapter(run_copy)  # restored: passes
    counts.add("corruptions_caught_adapter", n)
