"""`load_tokenizer(name)`: the tokenizer `prepare` renders and encodes with, without importing torch where it can.

`name` is a loaded tokenizer (returned as is), a local directory, or a Hugging Face hub id (its tokenizer files are
fetched with `huggingface_hub`, which honours HF_HOME, HF_TOKEN and HF_HUB_OFFLINE).

transformers 5 builds some tokenizers with a class of its own (e.g. `Qwen2Tokenizer` for a Qwen2 model directory)
whose pipeline differs from `tokenizer.json`, and `import transformers` costs seconds because it imports torch. So:

- a directory transformers would load with its generic backend (a `tokenizer.json`, a generic or no
  `tokenizer_class`, no model `config.json`), holding nothing else transformers reads into it
  (`_READ_BY_TRANSFORMERS_ONLY`, a special token `tokenizer.json` lacks), is loaded here with the `tokenizers`
  library alone;
- any other directory is loaded once with `AutoTokenizer` (exactly what the runtime does), and what it built (the
  backend JSON, special tokens, chat template) is cached under a hash of the directory's tokenizer files and the
  transformers version; later loads of the same files read the cache, without transformers or torch.

Either way the result has the same `tokenizer_fingerprint` as `AutoTokenizer.from_pretrained(name)`: a cache entry
is written only after that was checked.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from importlib import metadata
from pathlib import Path
from typing import Any

from .errors import DataError

FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
         "chat_template.json", "added_tokens.json", "config.json", "vocab.json", "merges.txt", "tokenizer.model")
GENERIC = (None, "TokenizersBackend", "PreTrainedTokenizerFast")
SPECIAL = ("bos", "eos", "unk", "pad")
# files transformers reads into a generic tokenizer that `FastTokenizer.from_files` does not: such a directory is
# loaded by transformers (once; cached)
_READ_BY_TRANSFORMERS_ONLY = ("special_tokens_map.json", "added_tokens.json", "chat_template.json",
                              "additional_chat_templates")
FINGERPRINT_SCHEME = 1  # bump when fingerprint_parts changes: cached fingerprints are then recomputed


def load_tokenizer(tokenizer: Any):
    """A loaded tokenizer as is; a directory or hub id → a tokenizer (see the module docstring)."""
    if not isinstance(tokenizer, (str, Path)):
        return tokenizer
    directory = resolve(str(tokenizer))
    config = _read_json(directory / "tokenizer_config.json")
    model = _read_json(directory / "config.json")
    if (directory / "tokenizer.json").is_file() and config.get("tokenizer_class") in GENERIC and not model and not any(
            (directory / name).exists() for name in _READ_BY_TRANSFORMERS_ONLY):
        fast = FastTokenizer.from_files(directory, config, name_or_path=str(tokenizer))
        if all(fast.convert_tokens_to_ids(t) is not None for t in fast.all_special_tokens):
            return fast  # else transformers adds a special token tokenizer.json lacks: loaded (and cached) by it
    key = _files_key(directory)
    cached = _read_json(cache_dir() / f"{key}.json")
    if cached:
        return FastTokenizer(cached, name_or_path=str(tokenizer))
    tok = _auto_tokenizer(directory, str(tokenizer))
    _store(key, tok)
    return tok


def resolve(name: str) -> Path:
    """A local directory, or the local snapshot of hub repo `name` (downloaded unless HF_HUB_OFFLINE is set)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.is_file() and path.name in FILES:  # a file of the tokenizer (its tokenizer.json): the directory holding it
        return path.parent
    if path.exists() or name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise DataError(f"tokenizer directory not found: {name} (pass a local directory or a hub id such as "
                        "Qwen/Qwen2.5-1.5B-Instruct)", field="tokenizer")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        return Path(snapshot_download(name, allow_patterns=[*FILES, "additional_chat_templates/*"]))
    except HFValidationError as e:
        raise DataError(f"not a local directory nor a valid hub id: {name} ({e})", field="tokenizer") from None
    except Exception as e:  # offline and not cached, unknown repo, gated without HF_TOKEN, network down
        offline = " (HF_HUB_OFFLINE is set: only the local cache under HF_HOME is read)" if _offline() else ""
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"cannot get the tokenizer of hub repo {name!r}{offline}: {reason}",
                        field="tokenizer") from None


class FastTokenizer:
    """The part of a transformers fast tokenizer that lora-data uses, over a `tokenizers.Tokenizer` (no torch)."""

    def __init__(self, state: dict[str, Any], *, name_or_path: str = "") -> None:
        from tokenizers import Tokenizer

        self.backend_tokenizer = Tokenizer.from_str(state["backend"])
        self._state = state
        self._fingerprint: tuple[str, str] | None = None  # (state digest, fingerprint)
        self.name_or_path = name_or_path
        self.chat_template = state.get("chat_template")
        self.class_name = state.get("class", "TokenizersBackend")  # the transformers class that loads the same
        self.all_special_tokens = list(state.get("all_special", []))
        self._special = {k: state["special"].get(k) for k in SPECIAL}
        self._len = state.get("len")

    @classmethod
    def from_files(cls, directory: Path, config: dict, *, name_or_path: str) -> FastTokenizer:
        """A directory with tokenizer.json that transformers loads with its generic backend."""
        special = {k: _content(config.get(f"{k}_token")) for k in SPECIAL}
        extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
        extra = list(extra.values()) if isinstance(extra, dict) else list(extra)
        template = config.get("chat_template")
        if (directory / "chat_template.jinja").is_file():
            template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
        if isinstance(template, list):  # [{"name": ..., "template": ...}]
            template = {t["name"]: t["template"] for t in template}
        state = {"backend": (directory / "tokenizer.json").read_text(encoding="utf-8"), "special": special,
                 "class": config.get("tokenizer_class") or "TokenizersBackend",
                 "chat_template": template,
                 "all_special": sorted({v for v in special.values() if v} | {c for c in map(_content, extra) if c})}
        return cls(state, name_or_path=name_or_path)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if name.endswith("_token_id") and name.removesuffix("_token_id") in SPECIAL:
            return self.convert_tokens_to_ids(self._special[name.removesuffix("_token_id")])
        if name.endswith("_token") and name.removesuffix("_token") in SPECIAL:
            return self._special[name.removesuffix("_token")]
        raise AttributeError(name)

    @property
    def special_tokens_map(self) -> dict[str, str]:
        return {f"{k}_token": v for k, v in self._special.items() if v is not None}

    @property
    def added_tokens_decoder(self) -> dict:
        return self.backend_tokenizer.get_added_tokens_decoder()

    def __len__(self) -> int:
        return self._len if self._len is not None else self.backend_tokenizer.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        return self.backend_tokenizer.get_vocab(with_added_tokens=True)

    def convert_tokens_to_ids(self, token: str | None) -> int | None:
        return None if token is None else self.backend_tokenizer.token_to_id(token)

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": self.backend_tokenizer.encode(text, add_special_tokens=add_special_tokens).ids}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self(text, add_special_tokens)["input_ids"]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.backend_tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def cached_fingerprint(self) -> str:
        """`tokenizer_fingerprint(self)`, cached in memory and on disk under a hash of this tokenizer's state."""
        from .fingerprint import compute_fingerprint

        state = {**self._state, "chat_template": self.chat_template, "special": self._special,
                 "versions": [_version("tokenizers"), FINGERPRINT_SCHEME]}
        digest = hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()[:32]
        if self._fingerprint is None or self._fingerprint[0] != digest:
            path, fingerprint = cache_dir() / f"fp-{digest}", None
            with contextlib.suppress(OSError, UnicodeDecodeError):
                fingerprint = path.read_text(encoding="ascii").strip() or None
            if fingerprint is None:
                fingerprint = compute_fingerprint(self)
                _write_atomic(path, fingerprint)
            self._fingerprint = (digest, fingerprint)
        return self._fingerprint[1]

    def state(self) -> dict[str, Any]:
        return {"backend": self.backend_tokenizer.to_str(), "special": self._special, "class": self.class_name,
                "chat_template": self.chat_template, "all_special": self.all_special_tokens, "len": len(self)}


def cache_dir() -> Path:
    """LORA_DATA_TOKENIZER_CACHE, else $XDG_CACHE_HOME (or ~/.cache)/lora-sft/tokenizers."""
    if os.environ.get("LORA_DATA_TOKENIZER_CACHE"):
        return Path(os.environ["LORA_DATA_TOKENIZER_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lora-sft" / "tokenizers"


def _files_key(directory: Path) -> str:
    h = hashlib.sha256(f"transformers {_version('transformers')} tokenizers {_version('tokenizers')}".encode())
    for name in FILES:
        p = directory / name
        if p.is_file():
            h.update(f"\0{name}\0{p.stat().st_size}\0".encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:32]


def _store(key: str, tok: Any) -> None:
    """Cache what transformers built, if a FastTokenizer made from it fingerprints the same (else nothing)."""
    from .fingerprint import tokenizer_fingerprint

    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        return
    state = {"backend": backend.to_str(), "chat_template": tok.chat_template, "len": len(tok),
             "class": type(tok).__name__,
             "special": {k: _content(getattr(tok, f"{k}_token", None)) for k in SPECIAL},
             "all_special": [str(t) for t in tok.all_special_tokens]}
    if tokenizer_fingerprint(FastTokenizer(state)) != tokenizer_fingerprint(tok):
        return
    _write_atomic(cache_dir() / f"{key}.json", json.dumps(state, ensure_ascii=False))


def _write_atomic(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError:  # a read-only home: no cache, same result
        pass


def lacks_tokenizer(directory: Path) -> bool:
    """A local directory with no file a tokenizer loads from (a weights-only save)."""
    return directory.is_dir() and not any(p.name.startswith("tokenizer") or p.suffix in (".model", ".tiktoken")
                                          or p.name in ("vocab.json", "vocab.txt") for p in directory.iterdir())


def _auto_tokenizer(directory: Path, name: str):
    from transformers import AutoTokenizer

    if lacks_tokenizer(directory):
        raise DataError(f"no tokenizer in {name}: no tokenizer.json, tokenizer_config.json or vocabulary file; pass "
                        "the model's directory (or hub id) the tokenizer was saved with", field="tokenizer")
    try:
        tok = AutoTokenizer.from_pretrained(str(directory))
    except (OSError, ValueError) as e:
        raise DataError(f"cannot load a tokenizer from {name}: {e}", field="tokenizer") from None
    if str(directory) != name:
        tok.name_or_path = name
    return tok


def _content(token: Any) -> str | None:
    if token is None or isinstance(token, str):
        return token
    if isinstance(token, dict):
        return token.get("content")
    return str(token)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "none"


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
