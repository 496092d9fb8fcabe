"""The tokenize stage of `prepare`: chunks of records → rendered, encoded, overlong-handled samples spilled to disk.

Memory stays bounded: a chunk's token ids and masks are appended to two flat files in the staging dir and only a
small per-sample table (sample_id, offset, length, loss_tokens: four numpy columns per chunk) stays in memory.
"""

from __future__ import annotations

import os
import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataError
from .manifest import NOT_REJECTED
from .pack import cut_overlong
from .records import Record, Rejection
from .render import Rendered, Renderer, RenderError
from .tokenize import Encoder

LIMITED_IN_A_ROW = 5  # then the template, not the data, is at fault: stop with one error
_RENDERER: Renderer | None = None  # in a render worker: the parent's Renderer, inherited through fork


def default_workers() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _render_chunk(batch: list[list[dict]], contexts: list[dict]) -> list:
    """In a worker: render a chunk; (text, spans, left_out) or (None, message, field, code) per record (cheap to
    pickle)."""
    assert _RENDERER is not None
    return [(r.text, r.spans, r.left_out) if isinstance(r, Rendered) else (None, r.message, r.field, r.code)
            for r in _RENDERER.render_batch(batch, contexts)]


def _unpack(item: tuple) -> Rendered | RenderError:
    return Rendered(*item) if item[0] is not None else RenderError(item[1], field=item[2], code=item[3])
COLUMNS = {"sample_id": np.uint64, "offset": np.int64, "length": np.int64, "loss_tokens": np.int64}
Table = dict[str, np.ndarray]  # one column per COLUMNS key, all of one length


def chunk_table(sample_ids: list[int], mask: np.ndarray, lengths: np.ndarray) -> Table:
    """The per-record table of one encoded chunk: sample_id, offset (into the flat arrays), length, loss_tokens.

    >>> t = chunk_table([7, 9], np.array([0, 1, 1, 0, 0], np.uint8), np.array([3, 2]))
    >>> t["offset"].tolist(), t["loss_tokens"].tolist()
    ([0, 3], [2, 0])
    >>> len(chunk_table([], np.zeros(0, np.uint8), np.zeros(0, np.int64))["offset"])  # a chunk where all failed
    0
    >>> chunk_table([1, 2], np.array([1, 1], np.uint8), np.array([2, 0]))["loss_tokens"].tolist()  # an empty one last
    [2, 0]
    """
    ends = np.cumsum(lengths).astype(np.int64)
    offsets = ends - lengths
    loss_before = np.concatenate([[0], np.cumsum(mask, dtype=np.int64)])
    loss = loss_before[ends] - loss_before[offsets]
    return _table(sample_id=sample_ids, offset=offsets, length=lengths, loss_tokens=loss)


def _table(**columns) -> Table:
    return {k: np.asarray(columns[k], dtype=t).reshape(-1) for k, t in COLUMNS.items()}


def _concat(tables: list[Table]) -> Table:
    return {k: np.concatenate([t[k] for t in tables]) if tables else np.zeros(0, t_) for k, t_ in COLUMNS.items()}


class TokenizeStage:
    """Feed it chunks of `Record`s; it writes rejects through `reject(Rejection)` and counts into `counts`.

    With `workers` > 1 (Linux), chunks are rendered (template + span location) in that many forked processes while
    the main process reads and validates the next ones and a thread tokenizes (the Rust tokenizer uses every core).
    Chunks are consumed in order and the rejects of the reading stage (`reject_read`) are queued between them, so
    shards, manifest and rejects.jsonl are byte-identical whatever the number of workers.
    """

    def __init__(self, tokenizer: Any, tmp_dir: Path, *, seq_len: int, overlong: str, train_on_inputs: bool,
                 counts: dict, reject, workers: int = 1) -> None:
        self.renderer = Renderer(tokenizer, train_on_inputs=train_on_inputs)
        self.encoder = Encoder(tokenizer)
        self.seq_len, self.overlong, self.counts, self.reject = seq_len, overlong, counts, reject
        tmp_dir.mkdir(parents=True, exist_ok=True)
        self.ids_path, self.mask_path = tmp_dir / "ids.u32", tmp_dir / "mask.u8"
        self._ids = open(self.ids_path, "wb")  # noqa: SIM115 - closed in finish()
        self._mask = open(self.mask_path, "wb")  # noqa: SIM115
        self._pos = 0
        self._limited = 0  # records in a row whose render ran past the template's time limit
        self.tables: list[Table] = []
        # The Rust tokenizer releases the GIL: chunk k is tokenized in a worker thread while the main thread reads,
        # validates and renders chunk k+1. Results are consumed in order, so the output stays deterministic.
        self._pool = ThreadPoolExecutor(max_workers=1)
        self._pending: tuple[list, list, Any] | None = None
        # fork: the workers inherit the renderer (Linux); a daemonic process (a pool's worker) may not have children
        import multiprocessing

        forkable = sys.platform.startswith("linux") and not multiprocessing.current_process().daemon
        self.workers = workers if forkable else 1
        self._procs: Any = None  # a multiprocessing Pool, started with the second chunk (one chunk needs none)
        self._queue: deque = deque()  # ("rejects", [Rejection]) | ("chunk", records, AsyncResult), in input order
        self._chunks = 0

    def reject_read(self, r: Rejection) -> None:
        """A reading/validation reject: written now, or after the chunks still rendering (to keep the order)."""
        if not self._queue:
            self.reject(r)
        elif self._queue[-1][0] == "rejects":
            self._queue[-1][1].append(r)
        else:
            self._queue.append(("rejects", [r]))

    def add(self, records: list[Record]) -> None:
        self._chunks += 1
        if self.workers > 1 and self._chunks == 2:
            self._start_workers()
        if self._procs is None:
            self._process(records, self.renderer.render_batch([r.messages for r in records],
                                                              [r.context for r in records]))
            return
        work = ([r.messages for r in records], [r.context for r in records])
        self._queue.append(("chunk", records, self._procs.apply_async(_render_chunk, work)))
        while sum(e[0] == "chunk" for e in self._queue) > self.workers + 1:
            self._pop()

    def _pop(self) -> None:
        entry = self._queue.popleft()
        if entry[0] == "rejects":
            for r in entry[1]:
                self.reject(r)
        else:
            self._process(entry[1], [_unpack(x) for x in entry[2].get()])

    def _start_workers(self) -> None:
        global _RENDERER
        import multiprocessing

        if self._pending is not None:
            self._pending[2].result()  # fork with the tokenize thread idle (its result is consumed later, in order)
        _RENDERER = self.renderer
        env = os.environ.get("TOKENIZERS_PARALLELISM")
        os.environ["TOKENIZERS_PARALLELISM"] = env or "true"  # the workers never tokenize: no fork warning
        try:
            self._procs = multiprocessing.get_context("fork").Pool(self.workers)
        finally:
            _RENDERER = None
            if env is None:
                del os.environ["TOKENIZERS_PARALLELISM"]

    def close(self) -> None:
        """Stop the render workers and the tokenize thread (also after an error)."""
        if self._procs is not None:
            self._procs.terminate()
            self._procs.join()
            self._procs = None
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _process(self, records: list[Record], results: list[Rendered | RenderError]) -> None:
        rendered, kept = [], []
        for rec, r in zip(records, results, strict=True):
            if isinstance(r, RenderError):
                self._reject(rec, r.field, r.message, r.code)
                self._limited = self._limited + 1 if r.code == "render_limit" else 0
                if self._limited == LIMITED_IN_A_ROW:
                    raise DataError(f"{r.message} on {LIMITED_IN_A_ROW} records in a row; it does not finish in "
                                    "time: fix the chat template", path=rec.path, line=rec.line)
            else:
                self._limited = 0
                rendered.append(r)
                kept.append(rec)
        job = self._pool.submit(self.encoder.encode_flat, rendered)
        self._drain()
        self._pending = (kept, [r.left_out for r in rendered], job)

    def _drain(self) -> None:
        if self._pending is None:
            return
        kept, left_out, job = self._pending
        self._pending = None
        ids, mask, lengths = job.result()
        table = chunk_table([r.sample_id for r in kept], mask, lengths)
        self._ids.write(ids.tobytes())
        self._mask.write(mask.tobytes())
        self._keep(kept, table, mask, left_out)
        self._pos += len(ids)

    def _keep(self, kept: list[Record], table: Table, mask: np.ndarray, left_out: list[tuple[str, ...]]) -> None:
        loss, length, offsets = table["loss_tokens"], table["length"], table["offset"]
        for i in np.flatnonzero(loss == 0).tolist():
            self._reject(kept[i], None, "no loss tokens: the template rendered no assistant token", "no_loss_tokens")
        self.counts["valid"] += int((loss > 0).sum())
        ok = (loss > 0) & (length <= self.seq_len)
        pieces = [{k: v[ok] for k, v in table.items()}]
        trained = set(np.flatnonzero(ok).tolist())
        for i in np.flatnonzero((length > self.seq_len) & (loss > 0)).tolist():
            pieces.append(self._overlong(kept[i], int(offsets[i]), int(length[i]), mask))
            if len(pieces[-1]["length"]):
                trained.add(i)
        for i in sorted(i for i in trained if left_out[i]):  # trained without it: listed, as a record cut to length is
            self.counts["reasoning_not_trained"] = self.counts.get("reasoning_not_trained", 0) + 1
            self._reject(kept[i], left_out[i][0], f"the chat template leaves this reasoning out of the text "
                         f"({len(left_out[i])} turn(s)): it is not trained, the rest of the record is (where the "
                         "template writes the last turn's only, a record ending with the turn trains it; else pass "
                         "a chat_template= that writes it)", "reasoning_not_trained")
        merged = _concat(pieces)
        order = np.argsort(merged["offset"], kind="stable")  # input order: an overlong record's pieces in its place
        merged = {k: v[order] for k, v in merged.items()}
        merged["offset"] += self._pos
        self.tables.append(merged)

    def _overlong(self, rec: Record, offset: int, length: int, mask: np.ndarray) -> Table:
        sub = mask[offset : offset + length]
        cuts = cut_overlong(length, sub, self.seq_len, self.overlong)
        self.counts["overlong"] += 1
        where = f"{length} tokens > --max-seq-len {self.seq_len}"
        if not cuts:
            self.counts["dropped"] += 1
            hint = {"drop": "dropped (use --overlong truncate|split to keep part of it)",
                    "truncate": "dropped: no loss token in its first --max-seq-len tokens (--overlong split keeps "
                                "the pieces that have one)"}.get(self.overlong, "dropped: no piece holds a loss token")
            self._reject(rec, None, f"{where}; {hint}", "overlong_dropped")
        elif self.overlong == "truncate":
            self.counts["truncated"] += 1
            lost = int(sub[self.seq_len :].sum())
            self._reject(rec, None, f"{where}; truncated to the first {self.seq_len} ({lost} loss tokens cut)",
                         "overlong_truncated")
        else:
            self.counts["split"] += 1
            self._reject(rec, None, f"{where}; split into {len(cuts)} samples of ≤ {self.seq_len} tokens "
                         f"(pieces without loss tokens left out)", "overlong_split")
        return _table(sample_id=[rec.sample_id] * len(cuts), offset=[offset + a for a, _ in cuts],
                      length=[b - a for a, b in cuts], loss_tokens=[int(sub[a:b].sum()) for a, b in cuts])

    def _reject(self, rec: Record, field: str | None, reason: str, code: str) -> None:
        # overlong records and those with reasoning left out are valid (counted on their own) but still listed
        counted = not code.startswith(NOT_REJECTED)
        self.reject(Rejection(rec.path, rec.line, field, reason, rec.raw, code), counted=counted)

    def finish(self) -> tuple[Table, np.ndarray, np.ndarray]:
        """Close the spill files; return (samples table, ids memmap, mask memmap)."""
        while self._queue:
            self._pop()
        self._drain()
        self.close()
        self._ids.close()
        self._mask.close()
        # np.asarray drops the memmap subclass (its per-slice overhead) but keeps the mapping: no copy in memory
        ids = np.asarray(np.memmap(self.ids_path, dtype=np.uint32, mode="r")) if self._pos else np.zeros(0, np.uint32)
        mask = np.asarray(np.memmap(self.mask_path, dtype=np.uint8, mode="r")) if self._pos else np.zeros(0, np.uint8)
        return _concat(self.tables), ids, mask
