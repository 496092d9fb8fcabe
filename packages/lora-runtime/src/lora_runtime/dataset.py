"""`PackedShardDataset`: stream packed rows from memory-mapped shards, split by rank and dataloader worker.

Order of one epoch (N rows, world W, micro batch B, accumulation A; `step_rows` = W x B x A rows per optimizer step):

1. permute 0..N-1 with `numpy.random.default_rng([seed, epoch])` (identity when `shuffle=False`);
2. extend the order by wrapping around to a multiple of `step_rows`, so every rank runs the same whole number of
   optimizer steps (the few repeated rows are logged by the loop; no row is dropped; an eval set, `mask_repeats`,
   serves its repeats with an all-zero loss mask, so each eval row counts once);
3. rank r takes every W-th row starting at r (disjoint across ranks);
4. the rank's rows are cut into micro batches; dataloader worker w serves batches w, w + n_workers, ... so the
   DataLoader (in order) yields exactly the single-process sequence.

Toy: N=5, W=2, B=1, A=1, no shuffle → order [0 1 2 3 4 0] → rank 0: [0 2 4], rank 1: [1 3 0].

`state_dict()` / `load_state_dict()` carry (epoch, offset): a resumed run starts at the very row the interrupted
one would have read next, without reading the skipped rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from lora_data import DataError
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from lora_runtime.errors import CheckpointError


class PackedShardDataset(IterableDataset):
    """Rows of a prepared shard directory as dicts {input_ids, loss_mask, seq_lens} (numpy arrays)."""

    def __init__(self, shards: Any, *, rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True,
                 micro_batch_size: int = 1, grad_accum: int = 1, verify: bool = True,
                 mask_repeats: bool = False) -> None:
        from lora_data import ShardReader

        self.reader = shards if isinstance(shards, ShardReader) else ShardReader(Path(shards), verify=verify)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if len(self.reader) == 0:
            raise DataError("the shard set has no rows; nothing to train on", path=self.reader.dir)
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.micro_batch_size, self.grad_accum = micro_batch_size, grad_accum
        self.mask_repeats = mask_repeats  # eval: rows served twice to fill the last batch carry no loss the 2nd time
        self.epoch, self.offset = 0, 0
        self._resume: dict[str, int] | None = None

    def most_segments(self, rows: int | None = None) -> int:
        """A bound on the segments a pass of `rows` rows (default: this dataset's micro batch) gives the collator's
        `packed_seq_lengths` (samples and each row's padding tail, counted for a full row too), whichever rows it
        draws; a set of fewer rows than a pass serves some twice in it."""
        rows = self.micro_batch_size if rows is None else rows
        counts = np.resize(np.sort(self.reader.samples_per_row())[::-1], rows)
        return int(counts.sum()) + rows

    @property
    def step_rows(self) -> int:
        """Rows consumed by one optimizer step over all ranks."""
        return self.world_size * self.micro_batch_size * self.grad_accum

    def epoch_rows(self) -> int:
        """Rows per epoch over all ranks: N rounded up to a whole number of optimizer steps."""
        n = len(self.reader)
        return -(-n // self.step_rows) * self.step_rows

    def repeated_rows(self) -> int:
        """How many rows each epoch serves twice to fill the last optimizer step."""
        return self.epoch_rows() - len(self.reader)

    def steps_per_epoch(self) -> int:
        return self.epoch_rows() // self.step_rows

    def __len__(self) -> int:
        """Rows this rank serves per epoch (the same on every rank)."""
        return self.epoch_rows() // self.world_size

    def order(self, epoch: int) -> np.ndarray:
        """Row indices this rank reads in `epoch`, before the resume offset."""
        n = len(self.reader)
        perm = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        full = np.resize(perm, self.epoch_rows())  # np.resize wraps around
        return full[self.rank :: self.world_size]

    def set_epoch(self, epoch: int) -> None:
        """Called by the trainer before each epoch; applies a loaded resume offset to its epoch only."""
        self.epoch, self.offset = int(epoch), 0
        if self._resume is not None and self._resume["epoch"] == self.epoch:
            self.offset = self._resume["offset"]
            self._resume = None

    def __iter__(self):
        rows = self.order(self.epoch)
        b = self.micro_batch_size
        batches = range(self.offset // b, -(-len(rows) // b))
        info = get_worker_info()
        if info is not None:
            batches = batches[info.id :: info.num_workers]
        n = len(self.reader)
        for k in batches:
            for j in range(k * b, min((k + 1) * b, len(rows))):
                row = self.reader[int(rows[j])]
                repeat = self.mask_repeats and self.rank + j * self.world_size >= n  # its place in the wrapped order
                mask = np.zeros_like(row.loss_mask) if repeat else row.loss_mask
                yield {"input_ids": row.input_ids, "loss_mask": mask, "seq_lens": row.seq_lens}

    # ------------------------------------------------------------------ exact resume
    def state_at(self, global_step: int) -> dict[str, int]:
        """The data position after `global_step` optimizer steps (what a checkpoint at that step stores)."""
        spe = self.steps_per_epoch()
        return {"epoch": global_step // spe, "offset": (global_step % spe) * self.micro_batch_size * self.grad_accum,
                **self._identity()}

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset, **self._identity()}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at `state`; refuses a state recorded with other data, seed or batch layout (the order would differ).
        Another world size with the same rows per optimizer step reads the same rows each step: offsets rescale."""
        state = _rescaled(state, self.world_size, self.micro_batch_size * self.grad_accum)
        diff = {k: (state.get(k), v) for k, v in self._identity().items() if state.get(k) != v}
        if diff:
            detail = ", ".join(f"{k}: checkpoint {a} vs now {b}" for k, (a, b) in diff.items())
            raise CheckpointError(f"cannot resume the data order exactly ({detail}); resume with the same data, "
                                  "seed, world size and rows per step (micro_batch_size x gradient accumulation: "
                                  "lowering micro_batch_size with the same effective_batch_size is fine), or start "
                                  "a new ckpt_output_dir")
        self._resume = {"epoch": int(state["epoch"]), "offset": int(state["offset"])}
        self.epoch, self.offset = self._resume["epoch"], self._resume["offset"]  # set_epoch(epoch) re-applies it once

    def _identity(self) -> dict[str, int]:
        # The order depends on micro x accum, not on each: an OOM'd run may resume with micro halved, accum doubled.
        return {"rows": len(self.reader), "seed": self.seed, "shuffle": int(self.shuffle), "world_size": self.world_size,
                "rows_per_rank_step": self.micro_batch_size * self.grad_accum}


def _rescaled(state: dict[str, int], world: int, rows_per_rank_step: int) -> dict[str, int]:
    """`state` as a run of `world` ranks would have written it, when both read the same rows per optimizer step
    (2 ranks x 2 rows at offset 6 == 1 rank x 4 rows at offset 12); else unchanged (load_state_dict refuses it)."""
    old_world, old_rows = state.get("world_size"), state.get("rows_per_rank_step")
    if not old_world or not old_rows or old_world == world or old_world * old_rows != world * rows_per_rank_step:
        return state
    steps, rest = divmod(int(state["offset"]), old_rows)
    if rest:  # a step boundary is where every checkpoint is taken; anything else is not ours to reinterpret
        return state
    return {**state, "world_size": world, "rows_per_rank_step": rows_per_rank_step, "offset": steps * rows_per_rank_step}


class EpochDataLoader(DataLoader):
    """A DataLoader whose `set_epoch` reaches the dataset (the HF Trainer calls it before every epoch)."""

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)  # type: ignore[attr-defined]  # a PackedShardDataset
