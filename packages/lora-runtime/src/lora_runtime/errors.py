"""Errors a user can act on, importable without torch (lora-cli maps them to one `error:` line and exit code 1)."""

from __future__ import annotations

from typing import Any


class CheckpointError(RuntimeError):
    """The output directory's checkpoints cannot be used as asked (message says what to do)."""


class PushError(RuntimeError):
    """An upload to the Hugging Face Hub failed after what it uploads was written (the message names it and the
    command that uploads it later)."""


class OutOfMemoryHint(RuntimeError):
    """Out of (GPU) memory in a training step; the message names the knobs. `__cause__` is the original error;
    `step` the training step, `plan` the batch plan it ran (lora_runtime.batching.BatchPlan) and `model` a weak
    reference to the model it trained, where known."""

    def __init__(self, message: str, step: int | None = None, plan: Any = None, model: Any = None) -> None:
        super().__init__(message)
        self.step, self.plan, self.model = step, plan, model


class NonFiniteLossError(RuntimeError):
    """A bf16/fp32 run's gradient norm turned NaN or infinite: training stopped before saving anything from that
    step on (the message names the newest complete checkpoint and what to change)."""
