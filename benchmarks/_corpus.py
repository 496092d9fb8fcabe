"""A generated chat corpus with a realistic length spread, and the tokenizer the data-prep benchmark uses.

Lengths follow a log-normal spread like public SFT mixes: most conversations are a few hundred tokens, a long tail
reaches a few thousand; a third have a system turn, a quarter are multi-turn. Deterministic for a given seed.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

# ChatML with `{% generation %}` markers: TRL's assistant_only_loss needs them; lora-data ignores them (they render
# nothing), so both paths render identical text.
CHATML_GENERATION_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _words(rng: random.Random, vocab: list[str], median: float, cap: int) -> str:
    n = max(1, min(cap, int(rng.lognormvariate(0, 0.9) * median)))
    return " ".join(rng.choice(vocab) for _ in range(n))


def write_corpus(path: str | Path, n: int, *, seed: int = 0, vocab: list[str]) -> Path:
    """Write `n` chat records to `path` (JSONL); assistant answers ≈ 120 words median, capped at 900."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            msgs = []
            if i % 3 == 0:
                msgs.append({"role": "system", "content": "You are a helpful assistant. " + _words(rng, vocab, 8, 60)})
            for _ in range(1 + (rng.random() < 0.25) + (rng.random() < 0.1)):
                msgs.append({"role": "user", "content": _words(rng, vocab, 30, 300).capitalize() + "?"})
                msgs.append({"role": "assistant", "content": _words(rng, vocab, 120, 900) + "."})
            f.write(json.dumps({"messages": msgs}) + "\n")
    return Path(path)


def build_bench_tokenizer(out_dir: str | Path) -> Path:
    """The tests' tiny byte-level BPE tokenizer (vocab 1000), with the generation-marked ChatML template."""
    import _tiny
    from transformers import AutoTokenizer

    path = _tiny.build_tokenizer(out_dir, template="chatml")
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = CHATML_GENERATION_TEMPLATE
    tok.save_pretrained(path)
    return Path(path)


# --- real English text: Python docstrings as chat records, and a tokenizer with a ~150k vocabulary ---------------

DOC_MODULES = ("numpy", "numpy.linalg", "numpy.random", "numpy.fft", "numpy.ma", "jinja2", "click", "jsonschema")
_SKIP = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo"}
QUESTIONS = ("What does {} do?", "Explain {} to me.", "How do I use {}?", "I keep running into {}. What is it for?",
             "Can you describe {} briefly, with its arguments?")


def docstrings() -> list[tuple[str, str]]:
    """(qualified name, docstring) of the documented public functions, classes and methods of the stdlib and a few
    installed packages (numpy, jinja2, click, jsonschema): ≈3,600 English texts, ≈2.3 MB, cut at 1,200 chars."""
    import importlib
    import inspect
    import sys
    import warnings

    out, seen = [], set()

    def add(qual: str, obj: object) -> None:
        doc = inspect.getdoc(obj) or ""
        if len(doc) >= 80 and doc not in seen:
            seen.add(doc)
            out.append((qual, doc[:1200]))

    names = [m for m in sorted(sys.stdlib_module_names) if not m.startswith("_") and m not in _SKIP]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for mod_name in [*names, *DOC_MODULES]:
            try:
                mod = importlib.import_module(mod_name)
            except Exception:  # platform-specific or optional modules
                continue
            for name in sorted(dir(mod)):
                obj = getattr(mod, name, None)
                if name.startswith("_") or not callable(obj):
                    continue
                add(f"{mod_name}.{name}", obj)
                if inspect.isclass(obj):
                    for attr in sorted(vars(obj)):
                        if not attr.startswith("_"):
                            add(f"{mod_name}.{name}.{attr}", getattr(obj, attr, None))
    return out


def write_docstring_corpus(path: str | Path, n: int, *, seed: int = 0, docs: list | None = None) -> Path:
    """`n` chat records asking about a documented name, answered with its docstring: a third with a system turn, a
    quarter with 2-3 exchanges. Deterministic for a given seed and Python/package versions."""
    docs = docs if docs is not None else docstrings()
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            msgs = [{"role": "system", "content": "You are a helpful Python assistant."}] if i % 3 == 0 else []
            for _ in range(1 + (rng.random() < 0.25) + (rng.random() < 0.1)):
                name, doc = docs[rng.randrange(len(docs))]
                msgs.append({"role": "user", "content": rng.choice(QUESTIONS).format(name)})
                msgs.append({"role": "assistant", "content": doc})
            f.write(json.dumps({"messages": msgs}, ensure_ascii=False) + "\n")
    return Path(path)


def build_vocab_tokenizer(out_dir: str | Path, texts: list[str], vocab_size: int = 151_643) -> Path:
    """A byte-level BPE trained on `texts` (Qwen2's pre-tokenizer regex), its vocabulary padded to `vocab_size` with
    unreachable entries (the corpus yields fewer merges), ChatML with `{% generation %}` markers; saved as a
    tokenizer directory transformers loads with its generic backend."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    split = Regex(r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(split, behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainer=trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    state = json.loads(tok.to_str())
    vocab = state["model"]["vocab"]
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyzĠ"
    while len(vocab) < vocab_size - 3:
        vocab.setdefault("".join(rng.choice(letters) for _ in range(rng.randint(6, 12))), len(vocab))
    full = Tokenizer.from_str(json.dumps(state))
    full.add_special_tokens([AddedToken(t, special=True) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")])
    fast = PreTrainedTokenizerFast(tokenizer_object=full, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=CHATML_GENERATION_TEMPLATE)
    fast.save_pretrained(out_dir)
    return Path(out_dir)
