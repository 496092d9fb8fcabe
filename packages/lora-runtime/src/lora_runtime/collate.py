"""Packed rows → model inputs: `input_ids`, `labels`, `position_ids` that restart at every packed sample.

One row of seq_len 8 holding sample A (3 tokens) and sample B (4 tokens), then one pad::

                   A0    A1    A2    B0    B1    B2    B3    pad
    input_ids      11    12    13    21    22    23    24     0
    loss_mask       0     1     1     0     0     1     1     0
    labels       -100    12    13  -100  -100    23    24  -100
    position_ids    0     1     2     0     1     2     3     0

- `labels` are IGNORE_INDEX wherever `loss_mask` is 0 (prompts, padding) AND at the first token of every sample
  (B0 above, whose "prediction" would come from A2 of another sample; A0 has no predecessor anyway).
- `position_ids` restart at 0 for every sample; the padding tail is its own pseudo-sample. With no attention mask
  and no KV cache, transformers turns these restarts into a block-diagonal causal mask (SDPA/eager) or varlen
  `cu_seq_lens` (FlashAttention), so B never attends to A. tests/lora_runtime/test_packing.py proves it.
- `num_tokens` counts the real (non-pad) tokens of the batch, for tokens/s; the trainer pops it before forward.
- `packed_seq_lengths` lists every segment of the batch, row after row (pad tails included), as an int32 CPU tensor:
  what a padding-free forward over the flattened batch needs (`flatten_packed_batch`), computed here on the host so
  the GPU never has to be asked for it (a device-to-host sync in every forward). The trainer keeps it on the CPU.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

IGNORE_INDEX = -100  # the one place: torch cross-entropy's ignore_index, used by transformers' causal-LM loss


def position_ids(seq_lens: Sequence[int], seq_len: int) -> np.ndarray:
    """Positions restarting per sample; the padding tail counts from 0 as one more sample.

    >>> position_ids([3, 4], 8).tolist()
    [0, 1, 2, 0, 1, 2, 3, 0]
    """
    parts = [np.arange(n, dtype=np.int64) for n in seq_lens]
    used = int(sum(seq_lens))
    if used < seq_len:
        parts.append(np.arange(seq_len - used, dtype=np.int64))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def labels(input_ids: np.ndarray, loss_mask: np.ndarray, seq_lens: Sequence[int]) -> np.ndarray:
    """`input_ids` where the mask is 1, IGNORE_INDEX elsewhere and at each sample's first token.

    >>> labels(np.array([11, 12, 13, 21, 22, 23, 24, 0]), np.array([0, 1, 1, 0, 0, 1, 1, 0]), [3, 4]).tolist()
    [-100, 12, 13, -100, -100, 23, 24, -100]
    """
    out = np.where(np.asarray(loss_mask) > 0, np.asarray(input_ids, dtype=np.int64), IGNORE_INDEX)
    starts = np.concatenate([[0], np.cumsum(seq_lens)[:-1]]).astype(np.int64) if len(seq_lens) else np.zeros(0, np.int64)
    out[starts] = IGNORE_INDEX
    used = int(sum(seq_lens))
    out[used:] = IGNORE_INDEX
    return out


def collate_packed(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Stack rows (`input_ids`, `loss_mask`, `seq_lens` each) into int64 tensors [batch, seq_len]."""
    import torch

    seq_len = len(rows[0]["input_ids"])
    ids = np.stack([np.asarray(r["input_ids"], dtype=np.int64) for r in rows])
    lab = np.stack([labels(r["input_ids"], r["loss_mask"], r["seq_lens"]) for r in rows])
    pos = np.stack([position_ids(r["seq_lens"], seq_len) for r in rows])
    real = int(sum(int(np.sum(r["seq_lens"])) for r in rows))
    segments = [n for r in rows for n in _segments(r["seq_lens"], seq_len)]
    return {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(lab),
            "position_ids": torch.from_numpy(pos), "num_tokens": real,
            "packed_seq_lengths": torch.tensor(segments, dtype=torch.int32)}


def _segments(seq_lens: Sequence[int], seq_len: int) -> list[int]:
    """A row's samples and its padding tail (one more segment), as `position_ids` restarts mark them."""
    lens = [int(n) for n in seq_lens]
    used = sum(lens)
    return [*lens, seq_len - used] if used < seq_len else lens


def flatten_packed_batch(kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """Rows [b, n] with per-sample `position_ids` → one row [1, b·n] + `packed_seq_lengths` (int32, CPU). Lengths
    the collator computed are kept; only without them are they read off `position_ids` (a sync on a GPU).

    None when there is nothing to do (no position ids, an attention mask, already one row with lengths).

    >>> import torch
    >>> out = flatten_packed_batch({"input_ids": torch.arange(8).view(2, 4),
    ...                             "position_ids": torch.tensor([[0, 1, 0, 1], [0, 1, 2, 0]])})
    >>> out["input_ids"].tolist(), out["packed_seq_lengths"].tolist()
    ([[0, 1, 2, 3, 4, 5, 6, 7]], [2, 2, 3, 1])
    """
    import torch

    ids, pos = kwargs.get("input_ids"), kwargs.get("position_ids")
    if ids is None or pos is None or ids.dim() != 2 or kwargs.get("attention_mask") is not None:
        return None
    given = kwargs.get("packed_seq_lengths")
    if given is not None and ids.shape[0] == 1:
        return None
    out = dict(kwargs)
    out["input_ids"] = ids.reshape(1, -1)
    out["position_ids"] = pos.reshape(1, -1)
    if kwargs.get("labels") is not None:
        out["labels"] = kwargs["labels"].reshape(1, -1)
    if given is not None:
        return out
    flat_pos = pos.reshape(-1)
    starts = torch.nonzero(flat_pos == 0).flatten()
    if starts.numel() == 0 or int(starts[0]) != 0:
        raise ValueError("packed rows: position_ids must start each row at 0 (lora_runtime.collate builds them); "
                         f"got {pos[:, :4].tolist()}")
    ends = torch.cat([starts[1:], starts.new_tensor([flat_pos.numel()])])
    out["packed_seq_lengths"] = (ends - starts).to("cpu", torch.int32)
    return out
