"""Prepare the benchmark shards here on the CPU with lora_data.prepare, for the tokenizer the device's models load.

    python -m benchmarks.gpu.make_shards .gpu

transformers 5 loads a Qwen2-config model dir's tokenizer as Qwen2Tokenizer whatever class was saved, so the
tokenizer dirs carry the model's config.json and the shards are prepared with the tokenizer loaded from there; the
device copies these tokenizer files next to the random weights, and the fingerprints match.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from benchmarks.gpu import common


def tokenizer_dir(out: Path, shape: str) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, Qwen2Config

    spec = dict(common.SHAPES[shape])
    arch = spec.pop("arch")
    spec["rope_parameters"] = {"rope_type": "default", "rope_theta": spec.pop("rope_theta")}
    d = out / f"tok_{shape}"
    d.mkdir(parents=True, exist_ok=True)
    (Qwen2Config if arch == "qwen2" else LlamaConfig)(**spec).save_pretrained(d)
    AutoTokenizer.from_pretrained(out / "tok").save_pretrained(d)
    return d


def main(out_dir: str, shapes=(("qwen1.5b", 2048), ("llama8b", 8192))) -> None:
    import lora_data
    from transformers import AutoTokenizer

    out = Path(out_dir)
    for shape, seq_len in shapes:
        tok_dir = tokenizer_dir(out, shape)
        tok = AutoTokenizer.from_pretrained(tok_dir)
        m = lora_data.prepare(out / "records.jsonl", out / f"shards_{shape}_{seq_len}", tok, max_seq_len=seq_len,
                              verbose=False)
        print(shape, seq_len, type(tok).__name__, lora_data.tokenizer_fingerprint(tok),
              json.dumps({k: getattr(m, k, None) for k in ("packing_efficiency",)}))


def prompt_heavy(out_dir: str, shapes=("qwen1.5b",), seq_len: int = 2048) -> None:
    """The same records with every other conversation's long and short turns swapped (a long prompt and a short
    answer, as in summarisation or retrieval-augmented data) in records_prompts.jsonl, prepared into
    `shards_{shape}_{seq_len}_prompts` for each shape: about half the tokens of a batch carry a target, where the
    chunked loss makes logits for the targets alone."""
    import lora_data
    from transformers import AutoTokenizer

    out = Path(out_dir)
    swapped = out / "records_prompts.jsonl"
    with (out / "records.jsonl").open(encoding="utf-8") as src, swapped.open("w", encoding="utf-8") as dst:
        for i, line in enumerate(src):
            record = json.loads(line)
            turns = [m for m in record["messages"] if m["role"] in ("user", "assistant")] if i % 2 == 0 else []
            for user, assistant in zip(turns[::2], turns[1::2], strict=True):
                user["content"], assistant["content"] = assistant["content"], user["content"]
            dst.write(json.dumps(record, ensure_ascii=False) + "\n")
    for shape in shapes:
        tok = AutoTokenizer.from_pretrained(tokenizer_dir(out, shape))
        lora_data.prepare(swapped, out / f"shards_{shape}_{seq_len}_prompts", tok, max_seq_len=seq_len, verbose=False)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".gpu")
