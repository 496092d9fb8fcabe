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
import weakref
from typing import ClassVar

import pytest
import torch
from lora_runtime import batching, lora_sft
from lora_runtime.batching import FRAGMENTATION, GIB
from lora_runtime.errors import OutOfMemoryHint
from lora_runtime.metrics import read_metrics

from tests.lora_runtime import _runs

RUN = {**_runs.RUN, "max_steps": 4, "save_steps": 2, "micro_batch_size": "auto", "gradient_accumulation_steps": 1}


def _sized_plans(monkeypatch, halving: bool = False):
    """Wraps the planner as the module docstring says (1 GiB of each estimate fixed; with `halving`, each plan's
    estimate half the last one's); returns the limits it was called under."""
    seen: list = []

    def resolve(config, backend, rows):
        limit = batching._LOWERED.get()
        seen.append(limit)
        micro = config.micro_batch_size if isinstance(config.micro_batch_size, int) else 2 if limit is None else 1
        plan = batching.fixed_plan(config, 1, micro, False)
        peak = 4 / 2 ** (len(seen) - 1) if halving else 4 if limit is None else 2
        return dataclasses.replace(plan, estimated_peak_bytes=peak * GIB, estimated_fixed_bytes=GIB * peak / 4)

    monkeypatch.setattr(batching, "resolve", resolve)
    return seen


def _oom_when(rows_over: int = 1, step: int | None = None):
    """Raises torch.OutOfMemoryError in the forward of every pass of more than `rows_over` rows (only in training
    step `step` where given); counts the errors."""
    from transformers import TrainerCallback

    class Fault(TrainerCallback):
        raised = 0
        models: ClassVar[list] = []  # a weak reference to each attempt's model, and whether the one before was gone

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            Fault.models.append((weakref.ref(model), bool(Fault.models) and Fault.models[-1][0]() is None))
            def hook(module, args, kwargs):
                ids = kwargs.get("input_ids", args[0] if args else None)
                rows = ids.numel() / RUN["max_seq_len"]  # a packed pass is one row of all its tokens
                if module.training and rows > rows_over and step in (None, state.global_step + 1):
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
    need, activations = 4 * GIB * FRAGMENTATION + batching.CONTEXT_BYTES, 3 * GIB * FRAGMENTATION
    assert seen[0] is None and seen[1][0] == pytest.approx(need - 0.15 * activations) and len(seen) == 2
    assert [gone for _, gone in type(fault).models] == [False, True]  # the failed attempt's model was freed first
    assert result.steps == 4 and (result.adapter_dir / "adapter_model.safetensors").is_file()
    resolved = json.loads((out / "lora_sft_config.json").read_text())["resolved"]
    assert resolved["micro_batch_size"] == 1
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    printed = capsys.readouterr().out
    assert ("out of memory in training step 1 with micro_batch_size 2 (CUDA out of memory. Tried to allocate 2.00 "
            "GiB): planning again for 4.8 GiB, the 5.3 GiB the plan that ran out of memory in step 1 needed, its 3.2 "
            "GiB of activations cut to 85% (re-plan 1 of at most 3)") in printed


@pytest.mark.parametrize("case", ["step_2", "fixed_plan", "no_smaller_plan", "three_replans", "model_kept"])
def test_an_oom_the_run_cannot_plan_around_stands(tiny_llama_dir, llama_shards, tmp_path, monkeypatch, case):
    """In step 2 (a step was trained: a retry would repeat it); with micro_batch_size and gradient_checkpointing
    both given (the user's plan); where every pass runs out, once the plan cannot get smaller, or after 3 re-plans
    that each halve it; and where a callback keeps the failed attempt's model (its memory could not be freed)."""
    from transformers import TrainerCallback

    seen = _sized_plans(monkeypatch, halving=case == "three_replans")
    settings = {**RUN, **({"micro_batch_size": 2, "gradient_checkpointing": False} if case == "fixed_plan" else {})}
    always = case in ("no_smaller_plan", "three_replans")
    fault = _oom_when(rows_over=0 if always else 1, step=2 if case == "step_2" else None)

    class Keeper(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.model = model

    callbacks = [fault] + ([Keeper()] if case == "model_kept" else [])
    with pytest.raises(OutOfMemoryHint) as caught:
        lora_sft(str(tiny_llama_dir), str(llama_shards), str(tmp_path / "run"), **settings, callbacks=callbacks)
    message = str(caught.value)
    if case == "no_smaller_plan":  # 2 rows, then 1 row: out again, planned again, and the third plan is no smaller
        assert len(seen) == 3 and type(fault).raised == 2
        assert message.startswith("out of memory in training step 1 with micro_batch_size 1 (CUDA out of memory. "
                                  "Tried to allocate 2.00 GiB), and no smaller plan is left: lower max_seq_len")
        assert message.endswith("(after planning again for less memory 2 time(s))")
    elif case == "three_replans":
        assert len(seen) == 4 and type(fault).raised == 4
        assert message.startswith("out of memory in training step 1 (CUDA out of memory")
        assert message.endswith("(after planning again for less memory 3 time(s))")
    elif case == "model_kept":
        assert len(seen) == 1 and type(fault).raised == 1
        assert "Not planned again for less: the model of the attempt that ran out is still referenced" in message
    else:
        assert seen == [None] and type(fault).raised == 1
        assert message.startswith(f"out of memory in training step {2 if case == 'step_2' else 1} ")
        assert isinstance(caught.value.__cause__, torch.OutOfMemoryError) and "planning again" not in message


def test_the_attempt_that_ran_out_closes_its_reporting_as_failed(tiny_llama_dir, llama_shards, tmp_path, monkeypatch):
    """wandb (offline) and TensorBoard: the attempt that ran out of memory finishes its wandb run with exit code 1
    and closes its TensorBoard writer; the attempt that trains finishes its own run with exit code 0."""
    import wandb
    from torch.utils.tensorboard import SummaryWriter

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    finished, closed = [], []
    real_finish, real_close = wandb.finish, SummaryWriter.close
    monkeypatch.setattr(wandb, "finish", lambda *a, **kw: (finished.append(kw.get("exit_code")),
                                                           real_finish(*a, **kw))[1])
    monkeypatch.setattr(SummaryWriter, "close", lambda self: (closed.append(self.log_dir), real_close(self))[1])
    _sized_plans(monkeypatch)
    lora_sft(str(tiny_llama_dir), str(llama_shards), str(tmp_path / "run"), **RUN, callbacks=[_oom_when(rows_over=1)],
             wandb_project="lora-runtime-tests", tensorboard_log_dir=str(tmp_path / "tb"))
    assert finished == [1, 0]
    assert len(list(tmp_path.glob("wandb/offline-run-*"))) == 2
    assert len(closed) == 2


def test_planned_again_backend_auto_stays_off_an_unsloth_imported_too_late(tiny_llama_dir, llama_shards, tmp_path,
                                                                          monkeypatch, capsys):
    """backend="auto": where the smaller plan would run on Unsloth (as on a GPU when the compiled path no longer fits
    a pass) but this process has loaded transformers without it, the retry runs on transformers+PEFT and says why.
    `select_backend` answers "unsloth" for "auto" after the first attempt; everything else is the real path."""
    import sys
    from types import SimpleNamespace

    import lora_runtime.backends as backends

    real = backends.select_backend
    calls = []

    def select_backend(name="auto", **kw):
        calls.append(name)
        if name == "auto" and calls.count("auto") > 1:
            return SimpleNamespace(name="unsloth"), "auto: CUDA available and unsloth imports"
        return real(name, **kw)

    monkeypatch.setattr(backends, "select_backend", select_backend)
    monkeypatch.delitem(sys.modules, "unsloth", raising=False)
    _sized_plans(monkeypatch)
    result = lora_sft(str(tiny_llama_dir), str(llama_shards), str(tmp_path / "run"), **{**RUN, "backend": "auto"},
                      callbacks=[_oom_when(rows_over=1)])
    assert result.steps == 4 and result.backend == "peft" and calls == ["auto", "auto", "peft"]
    assert ("backend: peft (auto: planned again after an out-of-memory error, in a process that has loaded "
            "transformers, which Unsloth imported now could not patch: transformers+PEFT)") in capsys.readouterr().out



@pytest.mark.parametrize("step", [1, 2])
def test_an_oom_in_the_optimizer_step_gets_the_hint_and_in_step_1_a_new_plan(tiny_llama_dir, llama_shards, tmp_path,
                                                                             monkeypatch, step):
    """torch.OutOfMemoryError raised outside the forward and backward, just before the optimizer step (where AdamW
    allocates its state in step 1), in a pass of 2 rows: in step 1 the run plans again and trains on 1 row; in step 2
    the hint stands, not a bare torch error."""
    from transformers import TrainerCallback

    seen = _sized_plans(monkeypatch)

    class Fault(TrainerCallback):
        raised = 0

        def on_train_begin(self, args, state, control, **kwargs):
            self.rows = args.per_device_train_batch_size

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            if self.rows > 1 and state.global_step + 1 == step:
                Fault.raised += 1
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")

    out = tmp_path / "run"
    if step == 1:
        result = lora_sft(str(tiny_llama_dir), str(llama_shards), str(out), **RUN, callbacks=[Fault()])
        assert Fault.raised == 1 and len(seen) == 2 and result.steps == 4
        assert json.loads((out / "lora_sft_config.json").read_text())["resolved"]["micro_batch_size"] == 1
        return
    with pytest.raises(OutOfMemoryHint) as caught:
        lora_sft(str(tiny_llama_dir), str(llama_shards), str(out), **RUN, callbacks=[Fault()])
    assert Fault.raised == 1 and seen == [None]
    assert str(caught.value).startswith("out of memory in training step 2 (CUDA out of memory. Tried to allocate "
                                        "1.00 GiB). Lower micro_batch_size (now 2;")
    assert isinstance(caught.value.__cause__, torch.OutOfMemoryError)


@pytest.mark.parametrize("event", ["on_train_begin", "on_save"])
def test_an_oom_outside_a_training_step_is_not_taken_for_one(tiny_llama_dir, llama_shards, tmp_path, monkeypatch,
                                                             event):
    """Before step 1's forward (as loading a checkpoint to resume would) and in the save after step 2, an
    out-of-memory error is neither planned around nor given a training step's hint: it is torch's own."""
    from transformers import TrainerCallback

    seen = _sized_plans(monkeypatch)

    def fail(self, args, state, control, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")

    fault = type("Fault", (TrainerCallback,), {event: fail})()
    with pytest.raises(torch.OutOfMemoryError) as caught:
        lora_sft(str(tiny_llama_dir), str(llama_shards), str(tmp_path / "run"), **RUN, callbacks=[fault])
    assert type(caught.value) is torch.OutOfMemoryError and seen == [None]


def test_a_relaunch_request_round_trip(tmp_path, monkeypatch):
    """What a worker asks the launcher for (one file per rank) and what the restarted workers read back: the lowest
    limit of the requests wins, every request file is taken (a torn one and a foreign one too)."""
    failed = batching.BatchPlan(2, 1, 2, False, estimated_peak_bytes=4 * GIB, estimated_fixed_bytes=GIB)
    batching.request_relaunch(tmp_path, 0, (5 * GIB, "five"), [(failed, "cause 0")])
    batching.request_relaunch(tmp_path, 1, (4 * GIB, "four"), [(failed, "cause 1")])
    (tmp_path / batching.RELAUNCH_REQUEST.format(rank=2)).write_text("{}")
    (tmp_path / (batching.RELAUNCH_REQUEST.format(rank=3) + ".tmp")).write_text('{"lim')
    value, ranks, request = batching.take_relaunch_requests(tmp_path)
    assert ranks == [0, 1] and request["limit"] == [4 * GIB, "four"] and not list(tmp_path.iterdir())
    assert batching.take_relaunch_requests(tmp_path) is None
    monkeypatch.delenv(batching.RELAUNCH_ENV, raising=False)
    assert batching.relaunched() is None
    monkeypatch.setenv(batching.RELAUNCH_ENV, value)
    assert batching.relaunched() == ((4 * GIB, "four"), [(failed, "cause 1")])


def test_an_oom_in_an_evaluation_names_the_evaluations_knobs(tiny_llama_dir, llama_shards, tmp_path, monkeypatch):
    """The training steps fit and the evaluation after step 2 runs out of memory: the error names
    per_device_eval_batch_size and eval_steps, and the run is not planned again (its steps were trained)."""
    from transformers import TrainerCallback

    seen = _sized_plans(monkeypatch)

    class Fault(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            def hook(module, args):
                if not module.training:
                    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")

            model.register_forward_pre_hook(hook)

    with pytest.raises(OutOfMemoryHint) as caught:
        lora_sft(str(tiny_llama_dir), str(llama_shards), str(tmp_path / "run"), **RUN, callbacks=[Fault()],
                 eval_data_path=str(llama_shards), eval_steps=2, per_device_eval_batch_size=1)
    assert str(caught.value) == (
        "out of memory in the evaluation after training step 2 (CUDA out of memory. Tried to allocate 1.00 GiB). "
        "Lower per_device_eval_batch_size (now 1; its default is micro_batch_size) or max_seq_len, or evaluate less "
        "often (eval_steps)")
    assert isinstance(caught.value.__cause__, torch.OutOfMemoryError) and seen == [None]
