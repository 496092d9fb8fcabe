"""Rendered texts → token ids + loss masks, a chunk at a time, with the tokenizer's batch API.

Each text is tokenized once, whole, without adding special tokens (the template already wrote BOS where the model
wants it: adding more would double it), exactly as `apply_chat_template(tokenize=True)` does.

A token carries loss when its characters overlap a rendered span. For byte-level BPE tokenizers (GPT-2 style:
Llama-3, Qwen, ...) a token always stands for the same bytes, so its byte offsets are a cumulative sum over a
table of token byte lengths: vectorized, and no per-token offset objects. Records where that cannot be trusted (a
normalizer changed the text; byte counts disagree) and tokenizers of other kinds use the tokenizer's offsets.

    text   <|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\nYo<|im_end|>\\n
    span                                                          [Yo<|im_end|>]
    mask   0           0   0 0 0         0 0           0        0 1  1         0
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain
from typing import Any

import numpy as np

from .errors import DataError
from .render import Rendered, Renderer


def _byte_spans(r: Rendered) -> list[tuple[int, int]]:
    if r.text.isascii():
        return list(r.spans)
    enc = lambda n: len(r.text[:n].encode("utf-8"))  # noqa: E731
    return [(enc(a), enc(b)) for a, b in r.spans]


class Encoder:
    """Tokenize rendered records in batches; `encode_flat` returns concatenated ids, mask and per-record lengths."""

    def __init__(self, tokenizer: Any) -> None:
        self.backend: Any = getattr(tokenizer, "backend_tokenizer", None)
        if self.backend is None:
            raise DataError(f"{type(tokenizer).__name__} has no fast (Rust) backend; lora-data needs a tokenizer.json "
                            "(save the tokenizer with a fast class, e.g. PreTrainedTokenizerFast)", field="tokenizer")
        from tokenizers import decoders, models

        self.byte_level = isinstance(self.backend.decoder, decoders.ByteLevel) and isinstance(self.backend.model,
                                                                                               models.BPE)
        self.normalizer = self.backend.normalizer
        self._batch = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        if self.byte_level:
            size = self.backend.get_vocab_size(with_added_tokens=True)
            table = np.zeros(max(size, 1), dtype=np.int64)
            for token, i in self.backend.get_vocab(with_added_tokens=False).items():
                table[i] = len(token)  # ByteLevel: one character per byte
            for i, added in self.backend.get_added_tokens_decoder().items():
                table[i] = len(added.content.encode("utf-8"))
            self._table = table

    def encode(self, rendered: Sequence[Rendered]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        ids, mask, lengths = self.encode_flat(rendered)
        cuts = np.cumsum(lengths)[:-1]
        return np.split(ids, cuts), np.split(mask, cuts)

    def encode_flat(self, rendered: Sequence[Rendered]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids uint32 [total], loss_mask uint8 [total], lengths int64 [n]) for `rendered`, in order."""
        if not rendered:
            return np.zeros(0, np.uint32), np.zeros(0, np.uint8), np.zeros(0, np.int64)
        texts = [r.text for r in rendered]
        if not self.byte_level:
            return self._by_offsets(rendered)
        encodings = self._batch(texts, add_special_tokens=False)
        id_lists = [e.ids for e in encodings]
        lengths = np.fromiter(map(len, id_lists), dtype=np.int64, count=len(id_lists))
        ids = np.fromiter(chain.from_iterable(id_lists), dtype=np.uint32, count=int(lengths.sum()))
        tok_bytes = self._table[ids]
        ends = np.cumsum(tok_bytes)
        rec_end_tok = np.cumsum(lengths)
        got = np.diff(np.concatenate([[0], ends[rec_end_tok - 1]])) if len(ids) else np.zeros(len(texts), np.int64)
        want = np.fromiter((len(t.encode("utf-8")) for t in texts), dtype=np.int64, count=len(texts))
        ok = got == want
        if self.normalizer is not None:
            ok &= np.array([self.normalizer.normalize_str(t) == t for t in texts])
        if not ok.all():  # rare: fall back to offsets for the records whose bytes we cannot trust
            return self._merge_fallback(rendered, id_lists, ok)
        base = np.concatenate([[0], np.cumsum(want)[:-1]])
        mask = self._mask_from_bytes(rendered, base, ends - tok_bytes, ends)
        return ids, mask, lengths

    @staticmethod
    def _mask_from_bytes(rendered, base, starts, ends) -> np.ndarray:
        """Tokens overlapping any span: the first token ending after the span start up to the last starting before
        its end; a +1/−1 difference array turns all [a, b) ranges into the mask at once."""
        span_lo, span_hi = [], []
        for r, b in zip(rendered, base, strict=True):
            for lo, hi in _byte_spans(r):
                if hi > lo:
                    span_lo.append(b + lo)
                    span_hi.append(b + hi)
        diff = np.zeros(len(starts) + 1, dtype=np.int64)
        if span_lo:
            a = np.searchsorted(ends, np.asarray(span_lo), side="right")
            z = np.searchsorted(starts, np.asarray(span_hi), side="left")
            np.add.at(diff, a, 1)
            np.add.at(diff, z, -1)
        return (np.cumsum(diff[:-1]) > 0).astype(np.uint8)

    def _by_offsets(self, rendered: Sequence[Rendered]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        encodings = self.backend.encode_batch([r.text for r in rendered], add_special_tokens=False)
        ids, masks = [], []
        for r, e in zip(rendered, encodings, strict=True):
            off = np.asarray(e.offsets, dtype=np.int64).reshape(-1, 2)
            m = np.zeros(len(off), dtype=bool)
            for lo, hi in r.spans:
                m |= (off[:, 0] < hi) & (off[:, 1] > lo) & (off[:, 1] > off[:, 0])
            ids.append(np.asarray(e.ids, dtype=np.uint32))
            masks.append(m.astype(np.uint8))
        lengths = np.array([len(i) for i in ids], dtype=np.int64)
        return np.concatenate(ids), np.concatenate(masks), lengths

    def _merge_fallback(self, rendered, id_lists, ok):
        good = [i for i in range(len(rendered)) if ok[i]]
        bad = [i for i in range(len(rendered)) if not ok[i]]
        parts: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        if good:
            ids, mask, lengths = self.encode_flat([rendered[i] for i in good])
            for i, a, m in zip(good, *self._split(ids, mask, lengths), strict=True):
                parts[i] = (a, m)
        ids, mask, lengths = self._by_offsets([rendered[i] for i in bad])
        for i, a, m in zip(bad, *self._split(ids, mask, lengths), strict=True):
            parts[i] = (a, m)
        order = [parts[i] for i in range(len(rendered))]
        lengths = np.array([len(a) for a, _ in order], dtype=np.int64)
        return np.concatenate([a for a, _ in order]), np.concatenate([m for _, m in order]), lengths

    @staticmethod
    def _split(ids, mask, lengths):
        cuts = np.cumsum(lengths)[:-1]
        return np.split(ids, cuts), np.split(mask, cuts)


def render(record_or_messages: Any, tokenizer: Any, *, train_on_inputs: bool = False) -> tuple[list[int], list[int]]:
    """One record (or message list) → (input_ids, loss_mask) lists, via the same path as `prepare`.

    >>> ids, mask = render([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}], tok)  # doctest: +SKIP
    >>> tok.decode([i for i, m in zip(ids, mask) if m])                                                          # doctest: +SKIP
    'Yo<|im_end|>'
    """
    messages = getattr(record_or_messages, "messages", record_or_messages)
    context = getattr(record_or_messages, "context", None)
    rendered = Renderer(tokenizer, train_on_inputs=train_on_inputs).render(messages, context=context)
    ids, mask = Encoder(tokenizer).encode([rendered])
    return ids[0].tolist(), mask[0].tolist()
