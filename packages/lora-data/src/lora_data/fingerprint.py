"""`tokenizer_fingerprint(tokenizer)`: a sha256 of how a *loaded* tokenizer turns text into ids.

Computed from the object only (never from files on disk), so the runtime can call it on the model's tokenizer and
compare with the manifest. It covers the backend tokenizer's JSON (model, vocab, merges, normalizer, pre-tokenizer,
post-processor, added tokens), the special tokens and their ids, the chat template (or lora-data's documented default
when there is none), and the ids of a fixed probe text with and without special tokens. That last part catches
behaviour set outside the backend JSON: transformers 5 loads a Qwen2 tokenizer class for a Qwen2-config model dir
whatever class was saved, and that can change ids.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from .templates import DEFAULT_CHAT_TEMPLATE

PROBE = "Hello, world! 123  tabs\tand\nnewlines — ünïcödé 日本語 <|im_start|> <|eot_id|>"
FINGERPRINT_CHARS = 16


def _backend_json(tokenizer: Any) -> Any:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a slow tokenizer: its vocabulary is what we can see
        return sorted(tokenizer.get_vocab().items())
    data = json.loads(backend.to_str())
    # padding/truncation are call-time settings transformers writes into the backend; they do not change ids.
    data.pop("padding", None)
    data.pop("truncation", None)
    return data


def template_source(tokenizer: Any) -> str:
    """"tokenizer" if the tokenizer carries a chat template, else "default" (lora-data's DEFAULT_CHAT_TEMPLATE)."""
    return "tokenizer" if getattr(tokenizer, "chat_template", None) else "default"


def fingerprint_parts(tokenizer: Any) -> dict[str, Any]:
    """The inputs of the fingerprint, as a JSON-able dict (useful to diff two tokenizers)."""
    special = {}
    for name in ("bos", "eos", "pad", "unk"):
        tok = getattr(tokenizer, f"{name}_token", None)
        special[name] = [tok, tokenizer.convert_tokens_to_ids(tok) if tok is not None else None]
    return {
        "backend": _backend_json(tokenizer),
        "special": special,
        "all_special": sorted(str(t) for t in getattr(tokenizer, "all_special_tokens", [])),
        "vocab_size": len(tokenizer),
        "chat_template": getattr(tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE,
        "probe": tokenizer(PROBE)["input_ids"],
        "probe_plain": tokenizer(PROBE, add_special_tokens=False)["input_ids"],
    }


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A short sha256 hex digest (16 chars) of `fingerprint_parts(tokenizer)`; equal digests mean equal ids.

    A tokenizer that can answer from a cache keyed by its own files (`lora_data.tokenizer.FastTokenizer`) does.
    """
    cached = getattr(tokenizer, "cached_fingerprint", None)
    return cached() if callable(cached) else compute_fingerprint(tokenizer)


def compute_fingerprint(tokenizer: Any) -> str:
    blob = json.dumps(fingerprint_parts(tokenizer), sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:FINGERPRINT_CHARS]
