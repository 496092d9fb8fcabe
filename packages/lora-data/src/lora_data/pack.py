"""Best-fit-decreasing packing of samples into rows of `seq_len` tokens, and the overlong policies.

>>> pack([[1, 2, 3], [4, 5, 6, 7], [8]], seq_len=4)
[[4, 5, 6, 7], [1, 2, 3, 8]]
>>> pack_bfd([3, 4, 1], seq_len=4)       # the same, as sample indices per row
[[1], [0, 2]]

Longest first; each sample goes to the open row with the least room that still fits it (ties: the most recently
opened such row), else a new row. Rows keep their samples' boundaries, so `seq_lens` of row 1 above is [3, 1].
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Sequence

import numpy as np

OVERLONG = ("drop", "truncate", "split")


def pack_bfd(lengths: Sequence[int] | np.ndarray, seq_len: int) -> list[list[int]]:
    """Bins of sample indices, in the order the bins were opened. Every length must be in 1..seq_len."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and (lengths.min() < 1 or lengths.max() > seq_len):
        raise ValueError(f"every length must be in 1..{seq_len}; got {int(lengths.min())}..{int(lengths.max())}")
    order = np.argsort(-lengths, kind="stable")  # longest first; equal lengths keep input order
    bins: list[list[int]] = []
    by_room: dict[int, list[int]] = {}  # remaining room → bins with exactly that room (a stack)
    rooms: list[int] = []  # sorted distinct rooms that have at least one bin
    for idx in order.tolist():
        n = int(lengths[idx])
        k = bisect_left(rooms, n)
        if k < len(rooms):
            room = rooms[k]
            stack = by_room[room]
            b = stack.pop()
            if not stack:
                del by_room[room]
                rooms.pop(k)
        else:
            room, b = seq_len, len(bins)
            bins.append([])
        bins[b].append(idx)
        left = room - n
        if left > 0:
            if left not in by_room:
                by_room[left] = []
                insort(rooms, left)
            by_room[left].append(b)
    return bins


def pack(samples: Sequence[Sequence[int]], seq_len: int) -> list[list[int]]:
    """Token lists → packed rows (concatenated tokens, no padding); see the module docstring."""
    return [[t for i in b for t in samples[i]] for b in pack_bfd([len(s) for s in samples], seq_len)]


def cut_overlong(length: int, loss_mask: np.ndarray, seq_len: int, policy: str) -> list[tuple[int, int]]:
    """The [start, end) pieces of an overlong sample to keep under `policy` (pieces without loss tokens dropped).

    >>> cut_overlong(10, np.array([0, 0, 0, 1, 1, 1, 1, 0, 0, 1]), seq_len=4, policy="split")
    [(0, 4), (4, 8), (8, 10)]
    >>> cut_overlong(10, np.array([0] * 6 + [1] * 4), seq_len=4, policy="truncate")
    []
    """
    if policy == "drop":
        return []
    if policy == "truncate":
        pieces = [(0, seq_len)]
    elif policy == "split":
        pieces = [(a, min(a + seq_len, length)) for a in range(0, length, seq_len)]
    else:
        raise ValueError(f"overlong must be one of {', '.join(OVERLONG)}; got {policy!r}")
    return [(a, b) for a, b in pieces if loss_mask[a:b].any()]
