"""The short training run shared by the end-to-end tests and the golden-trajectory recorder."""

from __future__ import annotations

import platform
from typing import Any

# lm_head joins the default projections: the tiny random models' frozen head (std 0.02) caps how far the loss can
# fall, and a few dozen steps must show clear learning.
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
RUN = dict(backend="peft", lora_r=16, lora_alpha=32, target_modules=TARGETS, learning_rate=5e-3, warmup_steps=2,
           max_steps=24, micro_batch_size=2, gradient_accumulation_steps=2, save_steps=8, save_total_limit=2,
           seed=0, logging_steps=1, max_seq_len=128)


class Capture:
    """A TrainerCallback factory recording base weights before training and the model + logits after it."""

    def __init__(self, probe_ids):
        from transformers import TrainerCallback

        self.probe_ids, self.before, self.after, self.lora_before, self.logits = probe_ids, {}, {}, {}, None
        capture = self

        class _Cb(TrainerCallback):
            def on_train_begin(self, args, state, control, model=None, **kw):
                for n, p in model.named_parameters():
                    (capture.lora_before if "lora_" in n else capture.before)[n] = p.detach().clone()

            def on_train_end(self, args, state, control, model=None, **kw):
                import torch

                capture.after = {n: p.detach().clone() for n, p in model.named_parameters()}
                model.eval()
                with torch.no_grad():
                    capture.logits = model(input_ids=capture.probe_ids).logits.clone()
                model.train()

        self.callback = _Cb()


class StopAt:
    """Save and stop after optimizer step `k` (what an interrupted run leaves behind)."""

    def __new__(cls, k: int):
        from transformers import TrainerCallback

        class _Stop(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                if state.global_step == k:
                    control.should_save = True
                    control.should_training_stop = True
                return control

        return _Stop()


class LoggedEpochs:
    """Records (step, epoch) of every training log as the integrations (wandb, TensorBoard) receive it."""

    def __init__(self):
        from transformers import TrainerCallback

        self.seen: list[tuple[int, float]] = []
        seen = self.seen

        class _Cb(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kw):
                if logs and "loss" in logs:
                    seen.append((state.global_step, logs["epoch"]))

        self.callback = _Cb()


def environment() -> dict[str, Any]:
    from importlib.metadata import version

    return {"python": platform.python_version(), "machine": platform.machine(), "processor": platform.processor(),
            **{p: version(p) for p in ("torch", "transformers", "peft", "accelerate", "numpy")}}
