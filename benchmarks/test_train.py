"""GPU training benchmarks, the memory-budget rows of the frontier scenario as a regression gate: one optimizer step
of our unsloth backend at each budget (8, 16, 24, 40 GiB and the whole card) and of the peft backend (its compiled
path, which kernels="auto" takes there: lora_runtime.compiled) at 24 and 40 GiB and on the whole card, with
selective_recompute="pointwise" and activation_offload=True at 16 and 24 GiB, and with "most" and offload at 8 GiB,
on packed rows of 2048 tokens (Qwen2.5-1.5B shape, random bf16 weights, LoRA r=16 alpha=32 on the 7 projections,
AdamW), timed by pytest-benchmark (8 rounds after 3 warm-up steps).

A budget case is what `lora_sft(max_memory_gib=B)` trains with: the config goes through `batching.resolve` (the memory
plan picks micro batch and checkpointing for B), the process is capped at B with
`torch.cuda.set_per_process_memory_fraction`, and the backend seam loads the model (`load` → `add_lora`) and steps on
`collate_packed` rows, exactly what the trainer feeds, minus the Trainer. extra_info carries tokens/s (real tokens),
the plan (micro batch, checkpointing), peak memory (`peak_alloc_gib`, which the gate compares), card and versions.
Skipped, with the reason, without CUDA (and the unsloth cases without unsloth).

Unsloth patches transformers on import, so run the two backends in separate processes:
    pytest benchmarks/test_train.py -k unsloth --benchmark-enable --benchmark-json new_unsloth.json
    pytest benchmarks/test_train.py -k peft --benchmark-enable --benchmark-json new_peft.json
The gate against the kept baselines of the same card (benchmarks/baselines/, recorded with the same commands: the
unsloth cases on an H200, the peft cases on an H100):
    python -m benchmarks.compare benchmarks/baselines/train_h200_unsloth.json new_unsloth.json \
        --max-slowdown 10% --max-memory-increase 5%
    python -m benchmarks.compare benchmarks/baselines/train_h100_peft.json new_peft.json
"""

from __future__ import annotations

import importlib.util
from importlib import metadata

import numpy as np
import pytest

SEQ_LEN = 2048
BUDGETS = (8, 16, 24, 40, None)  # GiB; None = the whole card
# (backend, budget, options): the peft backend also with its memory levers (pointwise recomputation and activation
# offload, opt-in) under 16 and 24 GiB
LEVERS = {"selective_recompute": "pointwise", "activation_offload": True}
MOST = {"selective_recompute": "most", "activation_offload": True}
CASES = ([("unsloth", b, {}) for b in BUDGETS] + [("peft", b, {}) for b in (24, 40, None)]
         + [("peft", b, LEVERS) for b in (16, 24)] + [("peft", 8, MOST)])
IDS = [f"{backend}-{'card' if b is None else f'{b}gib'}"
       + {"": "", "pointwise": "-pw-offload", "most": "-most-offload"}[options.get("selective_recompute", "")]
       for backend, b, options in CASES]


def packed_rows(n_rows: int, seed: int = 0) -> list[dict]:
    """Rows of SEQ_LEN holding whole samples of lognormal length (median ~600 tokens) until the next does not fit:
    ~73% real tokens, the same rows for every run at a given micro batch (seeded)."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n_rows):
        lens: list[int] = []
        while True:
            n = int(np.clip(rng.lognormal(6.4, 0.7), 32, SEQ_LEN))
            if sum(lens) + n > SEQ_LEN:
                break
            lens.append(n)
        used = sum(lens)
        ids = np.zeros(SEQ_LEN, dtype=np.int64)
        ids[:used] = rng.integers(10, 900, used)
        mask = np.zeros(SEQ_LEN, dtype=np.uint8)
        mask[:used] = 1
        rows.append({"input_ids": ids, "loss_mask": mask, "seq_lens": lens})
    return rows


@pytest.mark.gpu
@pytest.mark.parametrize(("backend", "budget_gib", "options"), CASES, ids=IDS)
def test_train_step(benchmark, bench_model_dir, backend, budget_gib, options):
    import dataclasses
    import gc

    import torch
    from lora_runtime.backends import select_backend
    from lora_runtime.batching import resolve
    from lora_runtime.config import LoraSftConfig

    from benchmarks.gpu import common

    if backend == "unsloth" and importlib.util.find_spec("unsloth") is None:
        pytest.skip("unsloth is not installed (pip install 'lora-runtime[gpu]')")
    budget = {}
    if budget_gib is not None:
        if "max_memory_gib" not in {f.name for f in dataclasses.fields(LoraSftConfig)}:
            pytest.skip("this lora_runtime has no max_memory_gib")
        budget = {"max_memory_gib": budget_gib}
    cfg = LoraSftConfig(str(bench_model_dir), "unused", "unused", backend=backend, max_seq_len=SEQ_LEN, lora_r=16,
                        lora_alpha=32, resume=False, **budget, **options)
    gc.collect()  # the previous case's model and optimizer must not count against this budget
    torch.cuda.empty_cache()
    left_over = torch.cuda.memory_allocated() / 1024**3
    fraction = common.cap_memory(budget_gib)
    impl, _ = select_backend(backend)
    plan = resolve(cfg, impl, rows=10**6)
    model, _tok = impl.load(cfg, plan)
    model = impl.add_lora(model, cfg, plan)
    try:
        _time_steps(benchmark, model, plan, budget_gib, fraction, left_over, options)
    finally:  # CUDA graphs' memory pool goes with the case (loop.train does the same after training)
        from lora_runtime.compiled import release

        release(model)


def _time_steps(benchmark, model, plan, budget_gib, fraction, left_over, options) -> None:
    import torch
    from lora_runtime.collate import collate_packed

    micro = plan.micro
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4, fused=True)
    batches = [collate_packed(packed_rows(micro, seed=s)) for s in range(4)]
    graphs = getattr(model, "cuda_graphs", False)
    if graphs:  # as loop.train sets it: every pass padded alike, one graph shape
        model.graph_segments = max(len(b["packed_seq_lengths"]) for b in batches)
    state = {"i": 0, "tokens": 0}

    def step():
        batch = dict(batches[state["i"] % len(batches)])
        state["i"] += 1
        state["tokens"] += batch.pop("num_tokens")
        inputs = {k: v.cuda(non_blocking=True) for k, v in batch.items()}
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**inputs).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()

    torch.cuda.reset_peak_memory_stats()  # under CUDA graphs the peak counts from the first step, which records them
    for _ in range(3):  # compilation and autotuning stay out of the timings
        step()
    if not graphs:  # else from the timed steps on
        torch.cuda.reset_peak_memory_stats()
    state["tokens"] = 0
    benchmark.pedantic(step, rounds=8, iterations=1)
    real_per_step = state["tokens"] / 8
    benchmark.extra_info.update({
        "budget_gib": budget_gib, "memory_fraction": fraction, "allocated_before_gib": left_over,
        "micro_batch_size": micro,
        "gradient_checkpointing": plan.recomputation(), "estimated_peak_gib": plan.to_dict()["estimated_peak_gib"],
        "offloaded_layers": plan.offloaded_layers, "options": options,
        "tokens_per_s": real_per_step / benchmark.stats.stats.median,
        "real_tokens_per_step": real_per_step,
        "peak_alloc_gib": torch.cuda.max_memory_allocated() / 1024**3,
        "card": torch.cuda.get_device_name(0),
        "versions": {p: metadata.version(p) for p in ("torch", "transformers", "peft", "unsloth")
                     if importlib.util.find_spec(p.replace("-", "_"))},
    })
    assert benchmark.extra_info["tokens_per_s"] > 0
    if budget_gib is not None:
        assert benchmark.extra_info["peak_alloc_gib"] <= budget_gib
