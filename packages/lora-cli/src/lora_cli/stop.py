"""Ctrl-C / SIGTERM during training: finish the current optimizer step, save a checkpoint, stop, exit 130.

The first SIGINT or SIGTERM only raises a flag. A transformers `TrainerCallback` (handed to `lora_sft` through its
`callbacks` field) reads the flag after every optimizer step; under torchrun the ranks agree on it with one tiny
all-reduce, so every rank stops after the same step and rank 0 writes the checkpoint. A second signal interrupts at
once (KeyboardInterrupt), for when saving itself hangs.

    step 41 ... step 42 │ SIGINT │ step 43 ends → should_save + should_training_stop → checkpoint-43 → exit 130
"""

from __future__ import annotations

import os
import signal
from typing import Any

EXIT_INTERRUPTED = 130
# Fault injection for tests: after optimizer step N, rank 0 sends SIGTERM to the lora-cli launcher (its pid is in
# LORA_CLI_LAUNCHER_PID under torchrun) or to its own process, exercising the whole path a scheduler's kill takes.
FAULT_STEP_ENV = "LORA_CLI_FAULT_SIGTERM_AFTER_STEP"
FAULT_KILL_RANK_ENV = "LORA_CLI_FAULT_SIGKILL_RANK"  # tests: "RANK:STEP" → that rank SIGKILLs itself after STEP
LAUNCHER_PID_ENV = "LORA_CLI_LAUNCHER_PID"


class StopRequest:
    """Install with `with StopRequest() as stop:`; `stop.signal_name` is set once a signal arrived."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        for s in (signal.SIGINT, signal.SIGTERM):
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum: int, _frame: object) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        import sys

        print(f"\n{self.signal_name}: stopping after this step and saving a checkpoint (send it again to abort "
              "without saving)", file=sys.stderr, flush=True)

    def callback(self) -> Any:
        """A `transformers.TrainerCallback` that turns the flag into save + stop at the next step end."""
        from transformers import TrainerCallback

        stop = self
        fault_step = int(os.environ.get(FAULT_STEP_ENV, "0"))
        kill_rank, _, kill_step = os.environ.get(FAULT_KILL_RANK_ENV, ":").partition(":")

        class SaveAndStopOnSignal(TrainerCallback):
            def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
                if fault_step and state.global_step == fault_step and os.environ.get("RANK", "0") == "0":
                    os.kill(int(os.environ.get(LAUNCHER_PID_ENV, os.getpid())), signal.SIGTERM)
                if kill_step and str(state.global_step) == kill_step and os.environ.get("RANK", "0") == kill_rank:
                    os.kill(os.getpid(), signal.SIGKILL)
                if _any_rank(stop.requested):
                    control.should_save = True
                    control.should_training_stop = True
                return control

        return SaveAndStopOnSignal()


def _any_rank(flag: bool) -> bool:
    """True when `flag` is set on any rank (an all-reduce MAX under torch.distributed; the local flag otherwise)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    import torch

    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
