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
