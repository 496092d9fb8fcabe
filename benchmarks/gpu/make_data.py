"""Build the benchmark's tokenizer and chat records here on the CPU, into a git-ignored folder carried to the GPU.

    python -m benchmarks.gpu.make_data .gpu          # -> .gpu/tok/ (ChatML BPE tokenizer), .gpu/records.jsonl

The records are synthetic chat turns with a long-tailed length spread (lognormal, median ~600 tokens, clipped to
fit a 2048-token row), so packing has real work to do and every peer sees the same text.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(HERE / "tests"))

import _tiny  # noqa: E402

N_RECORDS = 900
SEED = 1234


def records(n: int = N_RECORDS, seed: int = SEED) -> list[dict]:
    """`n` chat records; the assistant turn carries most of the tokens (~1.3 tokens a word with this tokenizer)."""
    rng = random.Random(seed)
    words = _tiny._WORDS.split()
    out = []
    for _ in range(n):
        target = min(1900, max(32, int(rng.lognormvariate(6.4, 0.7))))
        n_q = rng.randint(4, 30)
        n_a = max(2, int(target / 1.3) - n_q - 12)
        q = " ".join(rng.choice(words) for _ in range(n_q)).capitalize() + "?"
        a = " ".join(rng.choice(words) for _ in range(n_a)).capitalize() + "."
        msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        if rng.random() < 0.3:
            msgs.insert(0, {"role": "system", "content": "You are a helpful assistant."})
        out.append({"messages": msgs})
    return out


def main(out_dir: str, n: int = N_RECORDS) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _tiny.build_tokenizer(out / "tok", template="chatml")
    recs = records(n)
    with (out / "records.jsonl").open("w") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out / "tok")
    texts = [tok.apply_chat_template(r["messages"], tokenize=False) for r in recs[:200]]
    lens = [len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]]
    print(f"{len(recs)} records; first 200: mean {sum(lens) / len(lens):.0f} tokens, max {max(lens)}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".gpu")
