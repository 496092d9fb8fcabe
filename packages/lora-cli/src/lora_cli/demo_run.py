"""`lora-cli demo`: the whole pipeline on shipped assets, on the CPU, in about a minute.

    runs/demo/
      base-model/    the tiny Llama-style model, random weights from seed 0 (config + tokenizer from lora_cli/demo/model)
      shards/        capitals.jsonl prepared by lora-data (manifest.json, rejects.jsonl, shards)
      run/           lora_sft's output: adapter, metrics.jsonl, loss.png, checkpoints/

Then it prints the loss on the training answers before → after and, for a few training prompts, the base model's greedy answer next to the
trained model's.
"""

from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path
from typing import Any

import click
from lora_runtime.collate import IGNORE_INDEX

MARKER = ".lora-cli-demo"
MODEL_SEED = 0
PROMPTS = ["What is the capital of France?", "Which city is the capital of Japan?", "Name the capital of Kenya."]


def demo_assets() -> Path:
    """The package's demo/ directory (model config + tokenizer, capitals.jsonl, demo.yaml)."""
    return Path(str(resources.files("lora_cli") / "demo"))


def demo_options() -> dict[str, Any]:
    from lora_cli.options import load_config_file

    return load_config_file(demo_assets() / "demo.yaml")


def fresh_run_dir(out: Path) -> Path:
    """Create `out`, or recreate it when an earlier demo made it; refuse to delete anything else."""
    if out.exists():
        if not (out / MARKER).exists():
            raise FileExistsError(f"{out} exists and was not made by `lora-cli demo`; pass --out to another directory")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text("created by lora-cli demo; deleted and recreated by the next demo run\n")
    return out


def build_base_model(out: Path) -> Path:
    """Random weights from the shipped config with a fixed seed, saved with the shipped tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = demo_assets() / "model"
    torch.manual_seed(MODEL_SEED)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src))
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    click.echo(f"[1/4] base model: {n / 1e6:.2f} M parameters, random weights (seed {MODEL_SEED}) → {out}")
    return out


def prepare_data(model_dir: Path, out: Path, max_seq_len: int) -> Path:
    import lora_data

    data = demo_assets() / "capitals.jsonl"
    manifest = lora_data.prepare(data, out, model_dir, max_seq_len=max_seq_len)
    click.echo(f"[2/4] data: {data.name} → {out} ({_summary(manifest)})")
    return out


def _summary(manifest: Any) -> str:
    counts = getattr(manifest, "counts", None)
    eff = getattr(manifest, "packing_efficiency", None)
    parts = []
    if isinstance(counts, dict):
        parts += [f"{k} {counts[k]}" for k in ("valid", "rejected", "rows") if k in counts]
    if eff is not None:
        parts.append(f"packing efficiency {eff:.3f}")
    return ", ".join(parts) or "prepared"


def train(model_dir: Path, shards: Path, out: Path, options: dict[str, Any]) -> Any:
    import lora_runtime

    click.echo(f"[3/4] training a LoRA adapter on the CPU → {out}")
    return lora_runtime.lora_sft(model_path=str(model_dir), data_path=str(shards), ckpt_output_dir=str(out), **options)


def greedy_answers(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int = 16) -> list[str]:
    import torch

    answers = []
    model.eval()
    for prompt in prompts:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        answers.append(tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return answers


def answer_batch(tokenizer: Any, records: list[dict]) -> dict[str, Any]:
    """Records → one right-padded batch {input_ids, attention_mask, labels}, labels IGNORE_INDEX off the assistant tokens.

    Rendered and masked by lora-data's own renderer and encoder, so "answer tokens" mean what they mean in training.
    """
    import torch
    from lora_data.render import Renderer
    from lora_data.tokenize import Encoder

    renderer = Renderer(tokenizer)
    ids, masks = Encoder(tokenizer).encode([renderer.render(r["messages"]) for r in records])
    width = max(len(i) for i in ids)
    batch = {"input_ids": torch.full((len(ids), width), tokenizer.pad_token_id),
             "attention_mask": torch.zeros((len(ids), width), dtype=torch.long),
             "labels": torch.full((len(ids), width), IGNORE_INDEX)}
    for row, (i, m) in enumerate(zip(ids, masks, strict=True)):
        t = torch.from_numpy(i.astype("int64"))
        batch["input_ids"][row, : len(t)] = t
        batch["attention_mask"][row, : len(t)] = 1
        batch["labels"][row, : len(t)] = torch.where(torch.from_numpy(m.astype(bool)), t, IGNORE_INDEX)
    return batch


def answer_loss(model: Any, batch: dict[str, Any]) -> float:
    """Mean cross-entropy over the answer tokens of `batch` (one forward pass)."""
    import torch

    model.eval()
    with torch.no_grad():
        return float(model(**batch).loss)


def evaluate(model_dir: Path, adapter_dir: Path, prompts: list[str]) -> dict[str, Any]:
    """Answer loss on the training records and greedy answers to `prompts`, for the base and the trained model."""
    import json

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    records = [json.loads(line) for line in (demo_assets() / "capitals.jsonl").read_text().splitlines()]
    tok = AutoTokenizer.from_pretrained(model_dir)
    batch = answer_batch(tok, records)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    before = (answer_loss(base, batch), greedy_answers(base, tok, prompts))
    trained = PeftModel.from_pretrained(base, adapter_dir)
    after = (answer_loss(trained, batch), greedy_answers(trained, tok, prompts))
    return {"loss_before": before[0], "loss_after": after[0], "records": len(records),
            "generations": list(zip(prompts, before[1], after[1], strict=True))}


def run_demo(out_dir: Path, max_steps: int | None = None) -> dict[str, Any]:
    """The four steps above; returns what it printed (paths, losses, generations) for tests."""
    options = demo_options()
    if max_steps is not None:
        options["max_steps"] = max_steps
    run = fresh_run_dir(out_dir)
    model_dir = build_base_model(run / "base-model")
    shards = prepare_data(model_dir, run / "shards", options["max_seq_len"])
    result = train(model_dir, shards, run / "run", options)
    ev = evaluate(model_dir, Path(result.adapter_dir), PROMPTS)
    click.echo(f"[4/4] done: {result.steps} steps in {result.wall_time_s:.0f} s. Loss on the {ev['records']} "
               f"training answers: {ev['loss_before']:.3f} (base) → {ev['loss_after']:.3f} (trained)")
    click.echo(f"  adapter:   {result.adapter_dir}")
    click.echo(f"  metrics:   {result.metrics_path}")
    plot = Path(result.metrics_path).with_name("loss.png")
    click.echo(f"  loss plot: {plot if plot.exists() else '(not written)'}")
    for prompt, before, after in ev["generations"]:
        click.echo(f"\n  prompt:  {prompt}\n  base:    {before!r}\n  trained: {after!r}")
    return {**ev, "result": result}
