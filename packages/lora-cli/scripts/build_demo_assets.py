"""Rebuild the assets that `lora-cli demo` ships: sample dataset, tokenizer files and a tiny model config.

    uv run python packages/lora-cli/scripts/build_demo_assets.py

Everything is deterministic and offline: the dataset is generated from the tables below, the tokenizer is a byte-level
BPE trained with the `tokenizers` library on that dataset, and `config.json` is a 2-layer Llama-style config whose
weights `lora-cli demo` creates at run time from a fixed seed (so no weights are committed). The outputs land in
src/lora_cli/demo/ and are committed; rerunning this script must reproduce them byte for byte.
"""

from __future__ import annotations

import json
from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parents[1] / "src" / "lora_cli" / "demo"

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Greece": "Athens", "Austria": "Vienna", "Poland": "Warsaw", "Sweden": "Stockholm", "Norway": "Oslo",
    "Finland": "Helsinki", "Denmark": "Copenhagen", "Ireland": "Dublin", "Hungary": "Budapest", "Egypt": "Cairo",
    "Japan": "Tokyo", "China": "Beijing", "India": "Delhi", "Kenya": "Nairobi", "Peru": "Lima",
    "Chile": "Santiago", "Cuba": "Havana", "Canada": "Ottawa", "Russia": "Moscow", "Turkey": "Ankara",
}

QUESTIONS = [
    "What is the capital of {c}?",
    "Which city is the capital of {c}?",
    "Name the capital of {c}.",
    "Tell me the capital city of {c}.",
    "capital of {c}?",
    "Do you know the capital of {c}?",
    "I am traveling to {c}. What is its capital?",
    "What's the capital of {c}?",
]

SYSTEM = "You are a geography tutor. Answer in one sentence."

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]


def demo_records() -> list[dict]:
    """Every (country, phrasing) pair once: 25 × 8 = 200 chat records, a system turn on every other one.

    >>> demo_records()[0]["messages"][-1]
    {'role': 'assistant', 'content': 'The capital of France is Paris.'}
    """
    records = []
    for q, template in enumerate(QUESTIONS):
        for i, (country, capital) in enumerate(CAPITALS.items()):
            msgs = [{"role": "system", "content": SYSTEM}] if (i + q) % 2 == 0 else []
            msgs += [
                {"role": "user", "content": template.format(c=country)},
                {"role": "assistant", "content": f"The capital of {country} is {capital}."},
            ]
            records.append({"messages": msgs})
    return records


def build_tokenizer(out: Path, texts: list[str]) -> tuple[int, int, int]:
    """Train a byte-level BPE on `texts` and save it as a `PreTrainedTokenizerFast` with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|im_end|>",
                                   bos_token=None, chat_template=CHATML_TEMPLATE)
    fast.save_pretrained(out)
    return len(fast), fast.pad_token_id, fast.eos_token_id


def build_config(out: Path, vocab_size: int, pad_id: int, eos_id: int) -> None:
    """A 2-layer Llama-style config (~0.2 M parameters): big enough to memorise 25 capitals, small enough for a CPU.

    `initializer_range=0.1` (not 0.02): LoRA leaves the random lm_head frozen, and with std 0.02 its logits stay so
    flat that the loss cannot fall below ~4.3 even when every greedy answer is right. Measured with r=16, lr 3e-3,
    16 records per step: 0.02 → loss 6.3 → 4.36 in 400 steps; 0.1 → 6.7 → 0.11 in 250 steps (12 s on 2 cores).
    """
    from transformers import LlamaConfig

    LlamaConfig(
        vocab_size=vocab_size, hidden_size=96, intermediate_size=192, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=pad_id, eos_token_id=eos_id, bos_token_id=None, tie_word_embeddings=False, initializer_range=0.1,
    ).save_pretrained(out)


def main() -> None:
    DEMO_DIR.mkdir(parents=True, exist_ok=True)
    records = demo_records()
    with (DEMO_DIR / "capitals.jsonl").open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    texts = [m["content"] for r in records for m in r["messages"]] + ["system", "user", "assistant"]
    tok_dir = DEMO_DIR / "model"
    vocab, pad_id, eos_id = build_tokenizer(tok_dir, texts)
    build_config(tok_dir, vocab, pad_id, eos_id)
    sizes = {p.name: p.stat().st_size for p in sorted(DEMO_DIR.rglob("*")) if p.is_file()}
    print(json.dumps({"records": len(records), "vocab_size": vocab, "bytes": sizes}, indent=1))


if __name__ == "__main__":
    main()
