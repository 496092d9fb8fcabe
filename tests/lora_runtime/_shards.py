"""Build small packed shard sets for runtime tests with lora_data.ShardWriter directly (no polars, no prepare)."""

from __future__ import annotations

from pathlib import Path

import _tiny


def encode_chat(tokenizer, record: dict) -> tuple[list[int], list[int]]:
    """(input_ids, loss_mask): the whole conversation, mask 1 on the final assistant answer only."""
    msgs = record["messages"]
    full = tokenizer.apply_chat_template(msgs, tokenize=False)
    prompt = tokenizer.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
    ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    return ids, [0] * n_prompt + [1] * (len(ids) - n_prompt)


def pack_first_fit(samples: list[tuple[list[int], list[int]]], seq_len: int) -> list[list[int]]:
    """Indices of samples per row, first-fit in input order (samples longer than seq_len are skipped)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i, (ids, _) in enumerate(samples):
        if len(ids) > seq_len:
            continue
        for r, free in enumerate(room):
            if len(ids) <= free:
                rows[r].append(i)
                room[r] -= len(ids)
                break
        else:
            rows.append([i])
            room.append(seq_len - len(ids))
    return rows


def write_shards(out_dir: Path, tokenizer, samples, seq_len: int, rows_per_shard: int = 64) -> Path:
    from lora_data import Manifest, ShardWriter, tokenizer_fingerprint

    writer = ShardWriter(out_dir, seq_len=seq_len, pad_id=tokenizer.pad_token_id, rows_per_shard=rows_per_shard)
    tokens = 0
    for row in pack_first_fit(samples, seq_len):
        ids = [t for i in row for t in samples[i][0]]
        mask = [m for i in row for m in samples[i][1]]
        writer.add_row(ids, mask, seq_lens=[len(samples[i][0]) for i in row], sample_ids=row)
        tokens += len(ids)
    infos = writer.close()
    rows = sum(s.rows for s in infos)
    manifest = Manifest(seq_len=seq_len, pad_id=tokenizer.pad_token_id, shards=[s.to_dict() for s in infos],
                        tokenizer={"fingerprint": tokenizer_fingerprint(tokenizer)},
                        packing_efficiency=tokens / (rows * seq_len))
    manifest.counts.update(rows=rows, samples=len(samples), tokens=tokens)
    manifest.save(out_dir)
    return out_dir


def chat_shards(out_dir: Path, model_dir: Path, n: int = 48, seq_len: int = 128, seed: int = 0) -> Path:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    samples = [encode_chat(tok, r) for r in _tiny.chat_records(n, seed=seed)]
    return write_shards(Path(out_dir), tok, samples, seq_len)
