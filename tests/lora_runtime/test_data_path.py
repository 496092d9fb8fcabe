"""collate on hand-checkable literals; PackedShardDataset splits, order and exact resume; atomic checkpoints."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from lora_runtime import checkpoint
from lora_runtime.collate import IGNORE_INDEX, collate_packed, labels, position_ids
from lora_runtime.dataset import PackedShardDataset
from lora_runtime.errors import CheckpointError
from torch.utils.data import DataLoader


def test_collate_literal():
    row = {"input_ids": np.array([11, 12, 13, 21, 22, 23, 24, 0], np.uint32),
           "loss_mask": np.array([0, 1, 1, 0, 0, 1, 1, 0], np.uint8), "seq_lens": np.array([3, 4])}
    b = collate_packed([row, row])
    assert b["labels"][0].tolist() == [-100, 12, 13, -100, -100, 23, 24, -100]
    assert b["position_ids"][0].tolist() == [0, 1, 2, 0, 1, 2, 3, 0]
    assert b["input_ids"].dtype.is_floating_point is False and b["input_ids"].shape == (2, 8)
    assert b["num_tokens"] == 14


def test_first_token_of_each_sample_is_ignored_even_when_masked_in():
    assert labels(np.array([5, 6, 7, 8]), np.array([1, 1, 1, 1]), [2, 2]).tolist() == [-100, 6, -100, 8]


@pytest.mark.parametrize("seq_len", [4, 7, 16])
@pytest.mark.parametrize("lens", [[1], [3, 1], [2, 1, 1], [1, 1, 1, 1]])
def test_collate_invariants(seq_len, lens):
    pos = position_ids(lens, seq_len)
    assert len(pos) == seq_len and (pos[np.cumsum([0, *lens[:-1]])] == 0).all()
    lab = labels(np.arange(seq_len), np.ones(seq_len), lens)
    assert (lab == IGNORE_INDEX).sum() == len(lens) + (seq_len - sum(lens))


def _first_tokens(ds, epoch=0):
    ds.set_epoch(epoch)
    return [int(r["input_ids"][0]) - 100 for r in ds]


def test_ranks_are_disjoint_and_cover_every_row(toy_shards):
    parts = [_first_tokens(PackedShardDataset(toy_shards, rank=r, world_size=3, seed=1)) for r in range(3)]
    assert len({len(p) for p in parts}) == 1  # same step count on every rank
    flat = [x for p in parts for x in p]
    assert set(flat) == set(range(10)) and len(flat) == 12  # 2 rows repeated to fill the last step


def test_order_is_seeded_per_epoch(toy_shards):
    a, b = PackedShardDataset(toy_shards, seed=5), PackedShardDataset(toy_shards, seed=5)
    assert _first_tokens(a, 0) == _first_tokens(b, 0)
    assert _first_tokens(a, 0) != _first_tokens(a, 1)
    assert _first_tokens(PackedShardDataset(toy_shards, shuffle=False)) == list(range(10))


@pytest.mark.parametrize("workers", [1, 2])
def test_workers_reproduce_the_single_process_order(toy_shards, workers):
    ds = PackedShardDataset(toy_shards, seed=3, micro_batch_size=2)
    want = _first_tokens(ds)
    loader = DataLoader(ds, batch_size=2, num_workers=workers, collate_fn=collate_packed)
    got = [int(t) - 100 for b in loader for t in b["input_ids"][:, 0]]
    assert got == want


def test_resume_state_continues_at_the_exact_row(toy_shards):
    full = PackedShardDataset(toy_shards, seed=2, micro_batch_size=2, grad_accum=1)
    order = [_first_tokens(full, e) for e in range(2)]  # 5 steps per epoch
    resumed = PackedShardDataset(toy_shards, seed=2, micro_batch_size=2, grad_accum=1)
    resumed.load_state_dict(full.state_at(7))  # epoch 1, 2 steps in
    resumed.set_epoch(1)  # what the trainer does at the start of the resumed epoch
    assert [int(r["input_ids"][0]) - 100 for r in resumed] == order[1][4:]
    assert _first_tokens(resumed, 2) == _first_tokens(full, 2)  # later epochs are whole again
    with pytest.raises(CheckpointError, match="micro_batch_size x gradient accumulation"):
        PackedShardDataset(toy_shards, seed=2, micro_batch_size=1).load_state_dict(full.state_at(7))
    # the OOM hint's advice: halve micro_batch_size, double accumulation; the same rows follow
    halved = PackedShardDataset(toy_shards, seed=2, micro_batch_size=1, grad_accum=2)
    halved.load_state_dict(full.state_at(7))
    halved.set_epoch(1)
    assert [int(r["input_ids"][0]) - 100 for r in halved] == order[1][4:]


def test_checkpoint_commit_is_atomic_and_rotates(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (10, 20, 30):
        tmp = checkpoint.staging_dir(root, step)
        (tmp / "adapter_model.safetensors").write_bytes(b"x")
        checkpoint.commit(tmp, step)
    (root / "checkpoint-40").mkdir()  # a crash after mkdir, before the marker
    assert checkpoint.newest_complete(root).name == "checkpoint-30"
    assert checkpoint.rotate(root, 2) == [root / "checkpoint-10"]
    assert [s for s, _ in checkpoint.list_checkpoints(root)] == [20, 30]
    assert not list(root.glob(".tmp-*"))


def test_resume_false_refuses_to_clobber(tmp_path):
    tmp = checkpoint.staging_dir(checkpoint.checkpoints_dir(tmp_path), 5)
    checkpoint.commit(tmp, 5)
    with pytest.raises(checkpoint.CheckpointError, match="resume=False refuses"):
        checkpoint.resume_point(tmp_path, resume=False)
    assert checkpoint.resume_point(tmp_path, resume=True).name == "checkpoint-5"
    assert checkpoint.resume_point(tmp_path / "fresh", resume=False) is None


@pytest.mark.parametrize("resume", [False, True])
def test_a_finished_run_whose_checkpoints_were_deleted_is_not_trained_over(tmp_path, resume):
    (tmp_path / "adapter_model.safetensors").write_bytes(b"the finished adapter")
    with pytest.raises(checkpoint.CheckpointError, match=r"holds a finished run's adapter .* would train again from "
                                                          r"scratch over it"):
        checkpoint.resume_point(tmp_path, resume=resume)
    tmp = checkpoint.staging_dir(checkpoint.checkpoints_dir(tmp_path), 5)
    checkpoint.commit(tmp, 5)  # with its checkpoint, resume=True continues (or finds it finished)
    assert checkpoint.resume_point(tmp_path, resume=True).name == "checkpoint-5"


def test_commit_never_overwrites_a_complete_checkpoint(tmp_path):
    for content in (b"first", b"second"):
        tmp = checkpoint.staging_dir(tmp_path, 3)
        (tmp / "f").write_bytes(content)
        final = checkpoint.commit(tmp, 3)
    assert (final / "f").read_bytes() == b"first"
    assert list(itertools.chain(tmp_path.glob(".tmp*"))) == []


@pytest.mark.parametrize("lens", [[[3, 4], [8]], [[1, 1, 1], [2, 5]], [[6], [1]]])
def test_collated_segment_lengths_equal_what_the_positions_say(lens):
    """The collator's host-side `packed_seq_lengths` (no GPU sync) are exactly the restarts of `position_ids`."""
    import torch
    from lora_runtime.collate import flatten_packed_batch

    rows = [{"input_ids": np.arange(8), "loss_mask": np.ones(8), "seq_lens": np.array(r)} for r in lens]
    batch = collate_packed(rows)
    derived = flatten_packed_batch({k: batch[k] for k in ("input_ids", "position_ids", "labels")})
    assert batch["packed_seq_lengths"].dtype == torch.int32 and batch["packed_seq_lengths"].device.type == "cpu"
    assert batch["packed_seq_lengths"].tolist() == derived["packed_seq_lengths"].tolist()
    given = flatten_packed_batch({k: batch[k] for k in ("input_ids", "position_ids", "labels", "packed_seq_lengths")})
    assert given["packed_seq_lengths"] is batch["packed_seq_lengths"] and given["input_ids"].shape == (1, 16)
