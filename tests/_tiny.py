"""Tiny, deterministic tokenizers and models built offline, saved to disk, and loaded back through `from_pretrained`.

Nothing here downloads anything. The tokenizer is a byte-level BPE trained with the `tokenizers` library on a fixed
corpus (about half a second); the models are 2-layer Llama / Qwen2 configs with random weights from a fixed seed.
"""

from __future__ import annotations

import json
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

LLAMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|pad|>",
]

_WORDS = (
    "the a an of to and in is it that for on with as was at by be this are from or have not but what all were "
    "when we there can which their said if do will each about how up out them then she many some so these would "
    "other into has more her two like him see time could no make than first been its who now people my made over "
    "did down only way find use may water long little very after words called just where most know get through "
    "back much before go good new write our used me man too any day same right look think also around another came "
    "come work three word must because does part even place well such here take why things help put years different "
    "away again off went old number great tell men say small every found still between name should home big give "
    "air line set own under read last never us left end along while might next sound below saw something thought "
    "both few those always looked show large often together asked house don't world going want school important "
    "until form food keep children feet land side without boy once animal life enough took sometimes four head "
    "above kind began almost live page got earth need far hand high year mother light parts country father let "
    "night following picture being study second eyes soon times story boys since white days ever paper hard near "
    "sentence better best across during today others however sure means knew it's try told young miles sun ways "
    "thing whole hear example heard several change answer room sea against top turned learn point city play toward "
    "five using himself usually hello assistant user system question model train data loss token python code "
    "function return value list number sum add multiply capital france paris germany berlin color red blue green"
)


def corpus() -> list[str]:
    """A fixed English-ish corpus with digits and punctuation, so every byte pattern in the tests tokenizes sanely."""
    words = _WORDS.split()
    lines = []
    for i in range(400):
        k = (i * 7) % len(words)
        chunk = words[k : k + 12] + words[: (i % 5)]
        lines.append(" ".join(chunk).capitalize() + f". {i} + {i % 13} = {i + i % 13}!?")
    return lines


def build_tokenizer(out_dir: str | Path, *, template: str = "chatml", vocab_size: int = 1000) -> Path:
    """Train a byte-level BPE tokenizer and save it as a `PreTrainedTokenizerFast` with a chat template.

    template: "chatml" (Qwen-style, eos `<|im_end|>`), "llama3" (Llama-3-style, bos `<|begin_of_text|>`,
    eos `<|eot_id|>`), or "none" (no chat template: lora-data's documented default applies).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    kwargs: dict = {"pad_token": "<|pad|>"}
    if template == "chatml":
        kwargs |= {"eos_token": "<|im_end|>", "bos_token": None, "chat_template": CHATML_TEMPLATE}
    elif template == "llama3":
        kwargs |= {"eos_token": "<|eot_id|>", "bos_token": "<|begin_of_text|>", "chat_template": LLAMA3_TEMPLATE}
    elif template == "none":
        kwargs |= {"eos_token": "<|endoftext|>", "bos_token": None}
    else:
        raise ValueError(f"template must be chatml, llama3 or none; got {template!r}")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)
    fast.save_pretrained(out)
    return out


def build_model(out_dir: str | Path, *, arch: str = "llama", tokenizer_dir: str | Path | None = None, seed: int = 0,
                hidden_size: int = 64, num_layers: int = 2, tied: bool = False) -> Path:
    """Build a 2-layer `arch` ("llama" or "qwen2") causal LM with random weights, save it (and the tokenizer) to `out_dir`.
    `tied`: the output embeddings share the input embeddings' weight (tie_word_embeddings, as small Qwen2.5s ship).

    The result loads with `AutoModelForCausalLM.from_pretrained(out_dir)` and `AutoTokenizer.from_pretrained(out_dir)`.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir is None:
        tokenizer_dir = build_tokenizer(out / "_tokenizer", template="chatml" if arch == "qwen2" else "llama3")
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    common = dict(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        raise ValueError(f"arch must be llama or qwen2; got {arch!r}")
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def write_shards(out_dir: str | Path, rows: list, *, seq_len: int, rows_per_shard: int = 4096,
                 fingerprint: str = "toy", **manifest) -> Path:
    """A shard set written with lora-data's own writer from `rows` of (input_ids, loss_mask, seq_lens), pad id 0,
    and its manifest (`manifest`: more of its fields, e.g. packing_efficiency)."""
    from lora_data import Manifest, ShardWriter

    w = ShardWriter(out_dir, seq_len=seq_len, pad_id=0, rows_per_shard=rows_per_shard)
    for ids, mask, lens in rows:
        w.add_row(ids, mask, seq_lens=lens)
    Manifest(seq_len=seq_len, pad_id=0, shards=[s.to_dict() for s in w.close()], tokenizer={"fingerprint": fingerprint},
             **manifest).save(out_dir)
    return Path(out_dir)


def write_jsonl(path: str | Path, records: list) -> Path:
    """Write `records` one per line; a `str` entry is written verbatim (for broken lines)."""
    p = Path(path)
    with p.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(r if isinstance(r, str) else json.dumps(r, ensure_ascii=False))
            f.write("\n")
    return p


def chat_records(n: int, seed: int = 0) -> list[dict]:
    """`n` deterministic chat records with a realistic spread of lengths (some with a system turn, some multi-turn)."""
    import random

    rng = random.Random(seed)
    words = _WORDS.split()
    out = []
    for i in range(n):
        msgs = []
        if i % 3 == 0:
            msgs.append({"role": "system", "content": "You are a helpful assistant."})
        for _ in range(1 + (i % 4 == 0)):
            q = " ".join(rng.choice(words) for _ in range(rng.randint(3, 20)))
            a = " ".join(rng.choice(words) for _ in range(rng.randint(2, 40)))
            msgs += [{"role": "user", "content": q.capitalize() + "?"}, {"role": "assistant", "content": a + "."}]
        out.append({"messages": msgs})
    return out
