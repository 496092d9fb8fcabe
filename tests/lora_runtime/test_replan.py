"""An out-of-memory error in a run's first step, where the run chose its own plan: lora_sft plans again for less
memory (`batching.replan_after_oom`) and trains from the start, in the same call; anywhere else the error stands.

On a CPU the batch plan has no memory estimate, so `resolve` is wrapped: it records the budget limit each attempt
planned under and gives 2 rows with a 4 GiB estimate at full budget, 1 row with 2 GiB under a lowered one. The
training, the error (torch.OutOfMemoryError raised in the model's forward when a pass has too many rows), the retry
and its outputs are the real ones. tests/lora_runtime/test_gpu_oom.py runs a real OOM with the real plan on a GPU.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from lora_runtime import batching, lora_sft
from lora_runtime.batching import FRAGMENTATION, GIB
from lora_runtime.errors import OutOfMemoryHint
from lora_runtime.metrics import read_metrics

from tests.lora_runtime import _runs

RUN = {**_runs.RUN, "max_steps": 4, "save_steps": 2, "micro_batch_size": "auto", "gradient_accumulation_steps": 1}


def _sized_plans(monkeypatch):
    """Wraps the planner as the module docstring says; returns the limits it was called under."""
    seen: list = []

    def resolve(config, backend, rows):
        limit = batching._LOWERED.get()
        seen.append(limit)
        micro = config.micro_batch_size if isinstance(config.micro_batch_size, int) else 2 if limit is None else 1
        plan = batching.fixed_plan(config, 1, micro, False)
        return dataclasses.replace(plan, estimated_peak_bytes=(4 if limit is None else 2) * GIB)

    monkeypatch.setattr(batching, "resolve", resolve)
    return seen


def _oom_when(rows_over: int = 1, step: int | None = None):
    """Raises torch.OutOfMemoryError in the forward of every pass of more than `rows_over` rows (only in training
    step `step` where given); counts the errors."""
    from transformers import TrainerCallback

    class Fault(TrainerCallback):
        raised = 0

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            def hook(module, args, kwargs):
                ids = kwargs.get("input_ids", args[0] if args else None)
                if module.training and ids.shape[0] > rows_over and step in (None, state.global_step + 1):
                    Fault.raised += 1
                    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

            model.register_forward_pre_hook(hook, with_kwargs=True)

    return Fault()


def test_an_oom_in_step_1_plans_again_for_less_and_trains(tiny_llama_dir, llama_shards, tmp_path, monkeypatch,
                                                          capsys):
    seen = _sized_plans(monkeypatch)
    fault = _oom_when(rows_over=1)
    out = tmp_path / "run"
    result = lora_sft(str(tiny_llama_dir), str(llama_shards), str(out), **RUN, callbacks=[fault])
    assert type(fault).raised == 1
    need = 4 * GIB * FRAGMENTATION + batching.CONTEXT_BYTES
    assert seen[0] is None and seen[1][0] == pytest.approx(0.85 * need) and len(seen) == 2
    assert result.steps == 4 and (result.adapter_dir / "adapter_model.safetensors").is_file()
    resolved = json.loads((out / "lora_sft_config.json").read_text())["resolved"]
    assert resolved["micro_batch_size"] == 1
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    printed = capsys.readouterr().out
    assert ("out of memory in training step 1 with micro_batch_size 2 (CUDA out of memory. Tried to allocate 2.00 "
            "GiB): planning again for 4.5 GiB, 85% of the 5.3 GiB the plan that ran out of memory in step 1 needed "
            "(re-plan 1 of at most 3)") in printed


@pytest.mark.parametrize("case", ["step_2", "fixed_plan", "no_smaller_plan"])
def test_an_oom_the_run_cannot_plan_around_stands(tiny_llama_dir, llama_shards, tmp_path, monkeypatch, case):
    """In step 2 (a step was trained: a retry would repeat it); with micro_batch_size and gradient_checkpointing
    both given (the user's plan); and where every pass runs out, once the plan cannot get smaller."""
    seen = _sized_plans(monkeypatch)
    settings = {**RUN, **({"micro_batch_size": 2, "gradient_checkpointing": False} if case == "fixed_plan" else {})}
    fault = _oom_when(rows_over=0 if case == "no_smaller_plan" else 1, step=2 if case == "step_2" else None)
    with pytest.raises(OutOfMemoryHint) as caught:
        lora_sft(str(tiny_llama_dir), str(llama_shards), str(tmp_path / "run"), **settings, callbacks=[fault])
    if case == "no_smaller_plan":  # 2 rows, then 1 row: out again, and the third plan is no smaller
        assert len(seen) == 3 and type(fault).raised == 2
        assert str(caught.value).startswith("out of memory in training step 1 with micro_batch_size 1, and planned "
                                            "again for less memory no smaller plan is left")
    else:
        assert seen == [None] and type(fault).raised == 1
        assert str(caught.value).startswith(f"out of memory in training step {2 if case == 'step_2' else 1} ")
        assert isinstance(caught.value.__cause__, torch.OutOfMemoryError)
