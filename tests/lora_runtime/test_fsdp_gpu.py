"""FSDP2 on one CUDA GPU (world size 1, a 1-rank NCCL group): it trains in bf16 with fp32 gradient reduction, saves,
stops, resumes, and its loss curve matches the DDP path (same backend, same rows) within bf16 tolerance. A smoke test:
the multi-GPU scaling measurement is a benchmark, not this."""

from __future__ import annotations

import pytest
import torch
from lora_runtime import lora_sft
from lora_runtime.distributed import teardown
from lora_runtime.metrics import read_metrics

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
RUN = dict(backend="peft", lora_r=16, lora_alpha=32, learning_rate=5e-3, warmup_steps=2, max_steps=8,
           micro_batch_size=2, gradient_accumulation_steps=2, save_steps=4, save_total_limit=None, seed=0,
           logging_steps=1, max_seq_len=128)


def _losses(out):
    return [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]


def test_fsdp_on_one_gpu_trains_saves_resumes_and_matches_ddp(tiny_llama_dir, llama_shards, tmp_path, capsys):
    import _runs
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ddp = lora_sft(str(tiny_llama_dir), str(llama_shards), str(tmp_path / "ddp"), **RUN, sharding="ddp")
    out = tmp_path / "fsdp"
    try:
        first = lora_sft(str(tiny_llama_dir), str(llama_shards), str(out), **RUN, sharding="fsdp",
                         callbacks=[_runs.StopAt(4)])
        log = capsys.readouterr().out
        second = lora_sft(str(tiny_llama_dir), str(llama_shards), str(out), **RUN, sharding="fsdp")
        log += capsys.readouterr().out
    finally:
        teardown()
    assert "sharding: FSDP2 over 1 rank(s), 2 decoder layers + root; bf16 compute, fp32 gradient reduction" in log
    assert first.steps == 4 and first.adapter_dir is None and second.steps == 8
    assert f"resuming from {out / 'checkpoints' / 'checkpoint-4'}" in log
    fsdp_losses, ddp_losses = _losses(out), _losses(tmp_path / "ddp")
    assert len(fsdp_losses) == len(ddp_losses) == 8
    assert fsdp_losses == pytest.approx(ddp_losses, rel=2e-2)  # bf16 compute on both sides, in other op orders
    assert fsdp_losses[-1] < fsdp_losses[0]
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, out)  # the gathered adapter is a plain PEFT adapter
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in model.named_parameters())
    assert ddp.backend == second.backend == "peft"
