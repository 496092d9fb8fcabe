"""Out of GPU memory on a real GPU, on purpose: the run fails with the hint that names the knobs (not a traceback of
the allocator), the checkpoints written before it are intact, and the same call without the excess resumes from them.
"""

from __future__ import annotations

import json
import weakref

import pytest
import torch
from lora_runtime import lora_sft
from lora_runtime.errors import OutOfMemoryHint

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
RUN = dict(backend="peft", lora_r=8, lora_alpha=16, max_steps=5, micro_batch_size=2, gradient_accumulation_steps=1,
           save_steps=1, save_total_limit=None, seed=0, logging_steps=1, max_seq_len=128)


def _oom_at_step(step: int):
    """A callback that, from `step` on, makes every forward ask for far more memory than any GPU has."""
    from transformers import TrainerCallback

    class OomFrom(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step + 1 == step and model is not None:
                model.register_forward_pre_hook(lambda *_: torch.empty(2**44, dtype=torch.uint8, device="cuda"))

    return OomFrom()


def test_a_real_oom_names_the_fix_and_keeps_the_checkpoints(tiny_llama_dir, llama_shards, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(OutOfMemoryHint) as caught:
        lora_sft(str(tiny_llama_dir), str(llama_shards), str(out), **RUN, callbacks=[_oom_at_step(3)])
    message = str(caught.value)
    assert message.startswith("out of memory in training step 3") and "Lower micro_batch_size (now 2" in message
    assert isinstance(caught.value.__cause__, torch.OutOfMemoryError)
    kept = sorted(p.name for p in (out / "checkpoints").iterdir() if (p / "COMPLETE").is_file())
    assert kept == ["checkpoint-1", "checkpoint-2"]
    torch.cuda.empty_cache()
    resumed = lora_sft(str(tiny_llama_dir), str(llama_shards), str(out), **RUN)
    assert resumed.steps == 5 and resumed.adapter_dir is not None


def test_an_oom_in_step_1_of_a_plan_the_run_chose_plans_again_and_trains(tiny_llama_dir, llama_shards, tmp_path,
                                                                         capsys):
    """micro_batch_size="auto": every pass of more than one row asks for 16 TiB. The run's first plan (2 rows) runs
    out of memory in step 1; it plans again for less (1 row) in the same call and trains to the end."""
    from transformers import TrainerCallback

    begins = []  # at each attempt's start: whether the attempt before's model was gone, and the memory allocated

    class OomOverOneRow(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            begins.append((bool(begins) and begins[-1][2]() is None, torch.cuda.memory_allocated(),
                           weakref.ref(model)))

            def hook(module, args, kwargs):
                if module.training and kwargs["input_ids"].numel() > RUN["max_seq_len"]:  # packed: [1, tokens]
                    torch.empty(2**44, dtype=torch.uint8, device="cuda")

            model.register_forward_pre_hook(hook, with_kwargs=True)

    out = tmp_path / "run"
    result = lora_sft(str(tiny_llama_dir), str(llama_shards), str(out), **{**RUN, "micro_batch_size": "auto"},
                      callbacks=[OomOverOneRow()])
    assert result.steps == 5 and result.adapter_dir is not None
    assert [gone for gone, _, _ in begins] == [False, True]
    assert begins[1][1] <= begins[0][1] * 1.05  # the first attempt's memory went back before the second loaded
    printed = capsys.readouterr().out
    assert "out of memory in training step 1 with micro_batch_size 2" in printed and "planning again for" in printed
    assert json.loads((out / "lora_sft_config.json").read_text())["resolved"]["micro_batch_size"] == 1


def test_a_callback_that_keeps_the_base_model_stops_the_replan(tiny_llama_dir, llama_shards, tmp_path):
    """The same out-of-memory error, with a callback keeping the base model (under PEFT's wrapper, which is freed),
    given 1 GiB of buffers to stand for a real model's weights: they stay on the GPU, so the run is not planned
    again, and the error says how much memory stayed taken."""
    from transformers import TrainerCallback

    class KeepsBase(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.base = model.get_base_model()
            self.base.register_buffer("weights", torch.empty(2**30, dtype=torch.uint8, device="cuda"))
            model.register_forward_pre_hook(
                lambda m, a, kw: torch.empty(2**44, dtype=torch.uint8, device="cuda") if m.training else None,
                with_kwargs=True)

    with pytest.raises(OutOfMemoryHint, match=r"Not planned again for less: .* GiB of GPU memory still taken"):
        lora_sft(str(tiny_llama_dir), str(llama_shards), str(tmp_path / "run"), **{**RUN, "micro_batch_size": "auto"},
                 callbacks=[KeepsBase()])
