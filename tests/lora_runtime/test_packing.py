"""THE proof that packing does not leak attention: a packed row's per-token loss equals each sample run alone.

Runs the real training path: the peft backend's loader (SDPA, use_cache off), LoRA with non-zero adapters, and
`collate_packed`; a control with position ids that do NOT restart shows the comparison can fail.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lora_runtime.collate import IGNORE_INDEX, collate_packed
from lora_runtime.config import LoraSftConfig

SEQ_LEN = 48
LENGTHS = (11, 17, 9)  # 37 tokens + 11 padding


def _model(model_dir, attn: str):
    from lora_runtime.backends.peft import PeftBackend
    from lora_runtime.batching import fixed_plan

    cfg = LoraSftConfig(str(model_dir), "unused", "unused", lora_r=4, init_lora_weights="gaussian", seed=1)
    backend = PeftBackend()
    plan = fixed_plan(cfg, 1, micro=1)
    model, _ = backend.load(cfg, plan)
    if attn != "sdpa":
        model.set_attn_implementation(attn)
    model = backend.add_lora(model, cfg, plan)
    # gaussian init still leaves B at zero; give B values so the adapters change the outputs
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    return model.eval()


def _samples():
    rng = np.random.default_rng(0)
    return [rng.integers(10, 900, size=n) for n in LENGTHS]


def _token_losses(logits, labels):
    """Per-position loss of predicting labels[t+1] from logits[t] (nan where ignored)."""
    lp = torch.nn.functional.cross_entropy(logits[:-1].float(), labels[1:], reduction="none",
                                           ignore_index=IGNORE_INDEX)
    return torch.where(labels[1:] == IGNORE_INDEX, torch.nan, lp)


def _packed_row(samples, position_ids=None):
    ids = np.concatenate(samples)
    row = {"input_ids": np.pad(ids, (0, SEQ_LEN - len(ids)), constant_values=7),
           "loss_mask": np.pad(np.ones(len(ids), np.uint8), (0, SEQ_LEN - len(ids))),
           "seq_lens": np.array(LENGTHS)}
    batch = collate_packed([row])
    batch.pop("num_tokens")
    if position_ids is not None:
        batch["position_ids"] = position_ids
    return batch


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_row_loss_equals_samples_alone(arch, attn, tiny_llama_dir, tiny_qwen2_dir):
    model = _model(tiny_llama_dir if arch == "llama" else tiny_qwen2_dir, attn)
    samples = _samples()
    batch = _packed_row(samples)
    with torch.no_grad():
        packed = model(**batch).logits[0]
    start = 0
    for s in samples:
        ids = torch.as_tensor(s, dtype=torch.long)[None]
        with torch.no_grad():
            alone = model(input_ids=ids, position_ids=torch.arange(len(s))[None]).logits[0]
        got = packed[start : start + len(s)]
        torch.testing.assert_close(got, alone, atol=2e-5, rtol=1e-4)
        # per-token loss inside the sample, and the first token of the sample is never a target
        lab = batch["labels"][0, start : start + len(s)]
        assert lab[0] == IGNORE_INDEX
        torch.testing.assert_close(_token_losses(got, lab), _token_losses(alone, ids[0].clone().masked_fill(
            torch.arange(len(s)) == 0, IGNORE_INDEX)), atol=2e-5, rtol=1e-4, equal_nan=True)
        start += len(s)
    # padding is never a target
    assert (batch["labels"][0, start:] == IGNORE_INDEX).all()


def test_control_without_position_restart_leaks(tiny_llama_dir):
    """Same row with continuous position ids: the 2nd sample sees the 1st, so its logits differ. The test can fail."""
    model = _model(tiny_llama_dir, "sdpa")
    samples = _samples()
    leaky = _packed_row(samples, position_ids=torch.arange(SEQ_LEN)[None])
    with torch.no_grad():
        packed = model(**leaky).logits[0]
        s = samples[1]
        alone = model(input_ids=torch.as_tensor(s)[None], position_ids=torch.arange(len(s))[None]).logits[0]
    assert (packed[LENGTHS[0] : LENGTHS[0] + len(s)] - alone).abs().max() > 1e-2


def test_flattening_for_flash_varlen_keeps_every_token_loss(tiny_llama_dir):
    """flash_attention_2 is varlen only for one row, so the peft backend flattens [b, n] → [1, b·n] first; the hook
    must leave each token's loss unchanged (checked here on SDPA, which handles both shapes)."""
    from lora_runtime.backends.base import flatten_hook

    model = _model(tiny_llama_dir, "sdpa")
    rows = [_packed_row(_samples()), _packed_row(_samples()[::-1])]
    batch = {k: torch.cat([r[k] for r in rows]) for k in ("input_ids", "labels", "position_ids")}
    with torch.no_grad():
        plain = model(**batch).logits.reshape(1, -1, model.config.vocab_size)
        handle = model.register_forward_pre_hook(flatten_hook(keep_seq_lengths=False), with_kwargs=True)
        flat = model(**batch)
        handle.remove()
    assert flat.logits.shape[:2] == (1, 2 * SEQ_LEN)
    torch.testing.assert_close(flat.logits, plain, atol=2e-5, rtol=0)
