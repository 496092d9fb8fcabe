"""The tokenize stage of `prepare`: chunks of records → rendered, encoded, overlong-handled samples spilled to disk.

Memory stays bounded: a chunk's token ids and masks are appended to two flat files under OUT_DIR/.prepare-tmp and
only a small per-sample table (sample_id, offset, length, loss_tokens; a polars frame per chunk) stays in memory.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from .pack import cut_overlong
from .records import Record, Rejection
from .render import Renderer, RenderError
from .tokenize import Encoder, chunk_frame


class TokenizeStage:
    """Feed it chunks of `Record`s; it writes rejects through `reject(Rejection)` and counts into `counts`."""

    def __init__(self, tokenizer: Any, tmp_dir: Path, *, seq_len: int, overlong: str, train_on_inputs: bool,
                 counts: dict, reject) -> None:
        self.renderer = Renderer(tokenizer, train_on_inputs=train_on_inputs)
        self.encoder = Encoder(tokenizer)
        self.seq_len, self.overlong, self.counts, self.reject = seq_len, overlong, counts, reject
        tmp_dir.mkdir(parents=True, exist_ok=True)
        self.ids_path, self.mask_path = tmp_dir / "ids.u32", tmp_dir / "mask.u8"
        self._ids = open(self.ids_path, "wb")  # noqa: SIM115 - closed in finish()
        self._mask = open(self.mask_path, "wb")  # noqa: SIM115
        self._pos = 0
        self.frames: list = []
        # The Rust tokenizer releases the GIL: chunk k is tokenized in a worker thread while the main thread reads,
        # validates and renders chunk k+1. Results are consumed in order, so the output stays deterministic.
        self._pool = ThreadPoolExecutor(max_workers=1)
        self._pending = None

    def add(self, records: list[Record]) -> None:
        rendered, kept = [], []
        for rec, r in zip(records, self.renderer.render_batch([r.messages for r in records]), strict=True):
            if isinstance(r, RenderError):
                self._reject(rec, r.field, r.message, "render_error")
            else:
                rendered.append(r)
                kept.append(rec)
        job = self._pool.submit(self.encoder.encode_flat, rendered)
        self._drain()
        self._pending = (kept, job)

    def _drain(self) -> None:
        if self._pending is None:
            return
        kept, job = self._pending
        self._pending = None
        ids, mask, lengths = job.result()
        frame = chunk_frame([r.sample_id for r in kept], mask, lengths)
        self._ids.write(ids.tobytes())
        self._mask.write(mask.tobytes())
        self._keep(kept, frame, mask)
        self._pos += len(ids)

    def _keep(self, kept: list[Record], frame, mask: np.ndarray) -> None:
        import polars as pl

        loss = frame["loss_tokens"].to_numpy()
        length = frame["length"].to_numpy()
        for i in np.flatnonzero(loss == 0).tolist():
            self._reject(kept[i], None, "no loss tokens: the template rendered no assistant token", "no_loss_tokens")
        ok = frame.filter((pl.col("loss_tokens") > 0) & (pl.col("length") <= self.seq_len))
        self.counts["valid"] += int((loss > 0).sum())
        pieces = [ok]
        offsets = frame["offset"].to_numpy()
        for i in np.flatnonzero((length > self.seq_len) & (loss > 0)).tolist():
            pieces.append(self._overlong(kept[i], int(offsets[i]), int(length[i]), mask))
        self.frames.append(pl.concat(pieces).with_columns(pl.col("offset") + self._pos))

    def _overlong(self, rec: Record, offset: int, length: int, mask: np.ndarray):
        import polars as pl

        sub = mask[offset : offset + length]
        cuts = cut_overlong(length, sub, self.seq_len, self.overlong)
        self.counts["overlong"] += 1
        where = f"{length} tokens > --max-seq-len {self.seq_len}"
        if not cuts:
            self.counts["dropped"] += 1
            why = "dropped" if self.overlong == "drop" else f"dropped: no loss token left after --overlong {self.overlong}"
            self._reject(rec, None, f"{where}; {why} (use --overlong truncate|split to keep part of it)",
                         "overlong_dropped")
        elif self.overlong == "truncate":
            self.counts["truncated"] += 1
            lost = int(sub[self.seq_len :].sum())
            self._reject(rec, None, f"{where}; truncated to the first {self.seq_len} ({lost} loss tokens cut)",
                         "overlong_truncated")
        else:
            self.counts["split"] += 1
            self._reject(rec, None, f"{where}; split into {len(cuts)} samples of ≤ {self.seq_len} tokens "
                         f"(pieces without loss tokens left out)", "overlong_split")
        return pl.DataFrame({
            "sample_id": np.full(len(cuts), rec.sample_id, dtype=np.uint64),
            "offset": np.array([offset + a for a, _ in cuts], dtype=np.int64),
            "length": np.array([b - a for a, b in cuts], dtype=np.int64),
            "loss_tokens": np.array([int(sub[a:b].sum()) for a, b in cuts], dtype=np.int64),
        }, schema={"sample_id": pl.UInt64, "offset": pl.Int64, "length": pl.Int64, "loss_tokens": pl.Int64})

    def _reject(self, rec: Record, field: str | None, reason: str, code: str) -> None:
        # overlong records are valid (counted under overlong/dropped/truncated/split) but still listed
        counted = not code.startswith("overlong_")
        self.reject(Rejection(rec.path, rec.line, field, reason, rec.raw, code), counted=counted)

    def finish(self):
        """Close the spill files; return (samples table, ids memmap, mask memmap)."""
        import polars as pl

        self._drain()
        self._pool.shutdown()
        self._ids.close()
        self._mask.close()
        schema = {"sample_id": pl.UInt64, "offset": pl.Int64, "length": pl.Int64, "loss_tokens": pl.Int64}
        table = pl.concat(self.frames) if self.frames else pl.DataFrame(schema=schema)
        # np.asarray drops the memmap subclass (its per-slice overhead) but keeps the mapping: no copy in memory
        ids = np.asarray(np.memmap(self.ids_path, dtype=np.uint32, mode="r")) if self._pos else np.zeros(0, np.uint32)
        mask = np.asarray(np.memmap(self.mask_path, dtype=np.uint8, mode="r")) if self._pos else np.zeros(0, np.uint8)
        return table, ids, mask

