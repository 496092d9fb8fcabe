"""Best-fit-decreasing packing: literals, then an invariant grid over seq_len × sample count."""

from __future__ import annotations

import numpy as np
import pytest
from lora_data import pack_bfd
from lora_data.pack import cut_overlong, pack


def test_pack_literal():
    assert pack([[1, 2, 3], [4, 5, 6, 7], [8]], seq_len=4) == [[4, 5, 6, 7], [1, 2, 3, 8]]
    assert pack_bfd([3, 4, 1], seq_len=4) == [[1], [0, 2]]


def test_best_fit_not_first_fit():
    # lengths 5, 4, 3, 2 into 8: 5 opens row 0 (room 3), 4 opens row 1 (room 4); 3 best-fits row 0 (room 3,
    # not row 1's 4); 2 goes to row 1.
    assert pack_bfd([5, 4, 3, 2], seq_len=8) == [[0, 2], [1, 3]]


def test_pack_edge_cases():
    assert pack_bfd([], seq_len=4) == []
    assert pack_bfd([4, 4], seq_len=4) == [[0], [1]]
    with pytest.raises(ValueError, match=r"every length must be in 1\.\.4"):
        pack_bfd([5], seq_len=4)
    with pytest.raises(ValueError):
        pack_bfd([0], seq_len=4)


@pytest.mark.parametrize("seq_len", [1, 7, 64, 512])
@pytest.mark.parametrize("n", [1, 10, 300])
@pytest.mark.parametrize("seed", [0, 1])
def test_pack_invariants(seq_len, n, seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, seq_len + 1, size=n)
    samples = []
    start = 0
    for n_tok in lengths.tolist():
        samples.append(list(range(start, start + n_tok)))
        start += n_tok
    bins = pack_bfd(lengths, seq_len)
    rows = pack(samples, seq_len)
    flat = sorted(t for r in rows for t in r)
    assert flat == list(range(start))  # no token lost or duplicated
    assert sorted(i for b in bins for i in b) == list(range(n))  # every sample exactly once
    assert all(len(r) <= seq_len for r in rows)  # no row over length
    for b, r in zip(bins, rows, strict=True):  # boundaries are consistent with the row content
        assert sum(int(lengths[i]) for i in b) == len(r)
        assert r == [t for i in b for t in samples[i]]
    assert len(bins) >= -(-int(lengths.sum()) // seq_len)  # never fewer rows than the volume needs
    # best fit leaves at most one row per distinct room that could have taken a later (shorter) sample:
    # a cheap check is that no two rows could be merged
    loads = sorted(sum(int(lengths[i]) for i in b) for b in bins)
    if len(loads) >= 2:
        assert loads[0] + loads[1] > seq_len


def test_bfd_efficiency_on_chat_like_lengths():
    lengths = np.clip(np.random.default_rng(0).lognormal(5.5, 0.8, 20000).astype(int), 1, 2048)
    bins = pack_bfd(lengths, 2048)
    assert lengths.sum() / (len(bins) * 2048) > 0.99


@pytest.mark.parametrize("policy, mask, expected", [
    ("drop", [1] * 10, []),
    ("truncate", [1] * 10, [(0, 4)]),
    ("truncate", [0] * 6 + [1] * 4, []),  # nothing to learn in the kept part: dropped, and reported
    ("split", [0, 0, 0, 1, 1, 1, 1, 0, 0, 1], [(0, 4), (4, 8), (8, 10)]),
    ("split", [0, 0, 0, 0, 1, 1, 1, 1, 0, 0], [(4, 8)]),  # pieces without loss tokens are left out
])
def test_cut_overlong(policy, mask, expected):
    assert cut_overlong(len(mask), np.array(mask), seq_len=4, policy=policy) == expected
