"""The unsloth backend: its pure pieces on the CPU (batch flattening, the gradient-checkpointing decision), and on a
CUDA GPU with unsloth installed, end to end through `lora_sft`: the model learns with only LoRA moving, the adapter
reloads with plain PEFT (in a process that never imported unsloth) to the same logits, and resume continues the run.
The GPU tests skip, saying why, where there is no CUDA or no unsloth; they ran on an H200.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lora_runtime.batching import GIB, plan_batch, unsloth_footprint
from lora_runtime.collate import flatten_packed_batch

QWEN15 = SimpleNamespace(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True)
LLAMA8 = SimpleNamespace(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)


def test_flatten_rows_into_one_padding_free_row():
    ids = torch.tensor([[11, 12, 13, 21, 22, 23, 24, 0], [31, 32, 33, 34, 35, 41, 42, 43]])
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 0], [0, 1, 2, 3, 4, 0, 1, 2]])
    labels = torch.where(ids > 0, ids, -100)
    out = flatten_packed_batch({"input_ids": ids, "position_ids": pos, "labels": labels, "num_items_in_batch": 9})
    assert out["input_ids"].tolist() == [ids.flatten().tolist()]
    assert out["labels"].tolist() == [labels.flatten().tolist()]
    assert out["position_ids"].tolist() == [pos.flatten().tolist()]
    assert out["packed_seq_lengths"].tolist() == [3, 4, 1, 5, 3]
    assert out["packed_seq_lengths"].dtype == torch.int32 and out["packed_seq_lengths"].device.type == "cpu"
    assert out["num_items_in_batch"] == 9


@pytest.mark.parametrize("kwargs", [
    {"input_ids": torch.zeros(2, 4, dtype=torch.long)},  # no position ids
    {"input_ids": torch.zeros(2, 4, dtype=torch.long), "position_ids": torch.zeros(2, 4, dtype=torch.long),
     "attention_mask": torch.ones(2, 4)},  # a padding mask: not a packed batch
])
def test_flatten_leaves_other_batches_alone(kwargs):
    assert flatten_packed_batch(kwargs) is None


def test_flatten_refuses_rows_not_starting_at_position_zero():
    with pytest.raises(ValueError, match="position_ids must start each row at 0"):
        flatten_packed_batch({"input_ids": torch.zeros(1, 4, dtype=torch.long),
                              "position_ids": torch.tensor([[3, 4, 0, 1]])})


@pytest.mark.parametrize(("model", "seq_len", "micro", "free_gib", "on"), [
    (QWEN15, 2048, 8, 139, False),  # 16k tokens ≈ 30 GiB of activations: fits an H200
    (QWEN15, 2048, 8, 24, True),  # a 24 GB card: recompute (some layers)
    (LLAMA8, 8192, 1, 139, False),  # 8B at 8k context, one row: ≈ 36 GiB + 15 GiB weights
    (LLAMA8, 8192, 8, 139, True),  # 64k tokens of 8B activations do not fit
])
def test_auto_gradient_checkpointing_follows_free_memory(model, seq_len, micro, free_gib, on):
    choice = plan_batch(unsloth_footprint(model, False), seq_len=seq_len, budget=free_gib * GIB, micro=micro,
                        gc="auto", quota=None, rows_per_rank=micro)
    assert (choice.recomputed > 0) is on and ("auto → off" not in choice.reason) is on and "GiB of" in choice.reason


@pytest.mark.parametrize("requested", [True, False])
def test_explicit_gradient_checkpointing_is_obeyed(requested):
    choice = plan_batch(unsloth_footprint(QWEN15, False), seq_len=2048, budget=1 * GIB, micro=8, gc=requested,
                        quota=None, rows_per_rank=8)
    assert choice.recomputed == (QWEN15.num_hidden_layers if requested else 0)


# ---------------------------------------------------------------------------------------------------- on a GPU
gpu = pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("unsloth") is None,
                         reason="needs a CUDA GPU and unsloth (pip install 'lora-runtime[gpu]')")
RUN = dict(backend="unsloth", lora_r=16, lora_alpha=32, learning_rate=5e-3, warmup_steps=2, max_steps=24,
           micro_batch_size=2, gradient_accumulation_steps=2, save_steps=8, save_total_limit=3, seed=0,
           logging_steps=1, max_seq_len=128)
PROBE = [[5, 17, 123, 400, 9, 77, 301, 64]]


def _losses(result):
    from lora_runtime.metrics import read_metrics

    return [r["loss"] for r in read_metrics(result.metrics_path) if "loss" in r]


def _train(model_dir, shards, out, **extra):
    from lora_runtime import lora_sft
    from transformers import TrainerCallback

    seen: dict = {}

    class Capture(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            seen["before"] = {n: p.detach().clone() for n, p in model.named_parameters()}

        def on_train_end(self, args, state, control, model=None, **kw):
            seen["after"] = {n: p.detach().clone() for n, p in model.named_parameters()}
            model.eval()
            with torch.no_grad():
                ids = torch.tensor(PROBE, device="cuda")
                seen["logits"] = model(input_ids=ids, use_cache=False).logits.float().cpu()
            model.train()

    cbs = [Capture(), *extra.pop("callbacks", [])]
    return lora_sft(str(model_dir), str(shards), str(out), **{**RUN, **extra}, callbacks=cbs), seen


@pytest.fixture(scope="module")
def unsloth_run(tmp_path_factory, tiny_llama_dir, llama_shards):
    return _train(tiny_llama_dir, llama_shards, tmp_path_factory.mktemp("unsloth_run"))


@gpu
@pytest.mark.slow
def test_unsloth_learns_and_only_lora_moves(unsloth_run):
    result, seen = unsloth_run
    losses = _losses(result)
    assert result.backend == "unsloth" and len(losses) == 24
    assert sum(losses[-4:]) / 4 < losses[0] - 0.3, losses
    lora = [n for n in seen["before"] if "lora_" in n]
    assert lora
    for n, before in seen["before"].items():
        changed = not torch.equal(before, seen["after"][n])
        assert changed == (n in lora), f"{n}: {'changed' if changed else 'unchanged'}"


@gpu
@pytest.mark.slow
def test_unsloth_adapter_reloads_with_plain_peft(unsloth_run, tiny_llama_dir, tmp_path):
    """A fresh process without unsloth: base (fp32, CPU) + adapter gives the trained model's logits (bf16 there)."""
    result, seen = unsloth_run
    _assert_plain_peft_reloads(result, seen, tiny_llama_dir, tmp_path)
    assert json.loads((Path(result.adapter_dir) / "adapter_config.json").read_text())["r"] == 16


@gpu
@pytest.mark.slow
def test_unsloth_pissa_adapter_is_saved_for_the_original_base(tiny_llama_dir, llama_shards, tmp_path):
    """PiSSA rewrites the base; the final adapter is a plain LoRA of rank 2r on the original base, which plain PEFT
    (and vLLM) reads as trained."""
    result, seen = _train(tiny_llama_dir, llama_shards, tmp_path / "run", init_lora_weights="pissa", max_steps=8)
    _assert_plain_peft_reloads(result, seen, tiny_llama_dir, tmp_path)
    cfg = json.loads((Path(result.adapter_dir) / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["init_lora_weights"]) == (32, True)


def _assert_plain_peft_reloads(result, seen, base_dir, tmp_path):
    """A fresh process without unsloth: base (fp32, CPU) + adapter gives the trained model's logits (bf16 there)."""
    script = (
        "import json, sys, torch\n"
        "from peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n"
        f"base = AutoModelForCausalLM.from_pretrained({str(base_dir)!r}).eval()\n"
        f"ids = torch.tensor({PROBE})\n"
        "with torch.no_grad():\n"
        "    plain = base(input_ids=ids).logits\n"
        f"    model = PeftModel.from_pretrained(base, {str(result.adapter_dir)!r}).eval()\n"
        "    tuned = model(input_ids=ids).logits\n"
        "    assert 'unsloth' not in sys.modules\n"
        f"torch.save({{'plain': plain, 'tuned': tuned}}, {str(tmp_path / 'logits.pt')!r})\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)
    got = torch.load(tmp_path / "logits.pt")
    ref = seen["logits"]
    err = float((got["tuned"] - ref).norm() / ref.norm())
    effect = float((got["tuned"] - got["plain"]).norm() / ref.norm())
    assert err < 3e-2 and err < 0.25 * effect, {"err": err, "adapter_effect": effect}


@gpu
@pytest.mark.slow
def test_unsloth_resume_continues_the_same_run(unsloth_run, tiny_llama_dir, llama_shards, tmp_path):
    """Stop at step 10 (checkpoint at 8... and 10), resume to 24: the losses after the resume match the uninterrupted
    run's within GPU non-determinism (flash-attention backward accumulates in a varying order)."""
    from transformers import TrainerCallback

    class StopAt10(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 10:
                control.should_save = True
                control.should_training_stop = True
            return control

    out = tmp_path / "interrupted"
    first, _ = _train(tiny_llama_dir, llama_shards, out, callbacks=[StopAt10()])
    assert first.steps == 10
    resumed, _ = _train(tiny_llama_dir, llama_shards, out)
    assert resumed.steps == 24
    want, got = _losses(unsloth_run[0]), _losses(resumed)
    assert len(got) == 24
    assert got == pytest.approx(want, rel=2e-2), {"want": want, "got": got}
