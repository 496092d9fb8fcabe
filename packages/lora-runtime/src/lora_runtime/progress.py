"""The training progress bar of `lora_sft` and `lora-cli train` alike (rank 0 only), in place of transformers' output.

On a terminal, one tqdm bar over optimizer steps with the last loss and tokens/s; tqdm shows the time left (ETA):

    training:  40%|████      | 108/270 [00:16<00:24, 6.6 step/s, loss=0.412, tok/s=3,390]

When stderr is not a terminal (a log file, CI, a scheduler's output), no bar: one line per log instead,

    step 108/270: loss 0.4120, lr 0.0002, 3,390 tokens/s, 0:00:24 left

transformers' own output is switched off: its tqdm bar (`disable_tqdm=True`) and the PrinterCallback that
`disable_tqdm` installs in its place, which printed every log, and the end-of-run summary, as a raw dict.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from lora_runtime.distributed import dist_env


def progress_callback(terminal: bool | None = None) -> Any:
    """A `transformers.TrainerCallback`: the bar on a terminal (`terminal=None`: is stderr one?), else log lines."""
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        closes_on_failure = True  # its on_train_end only closes the bar: PackedTrainer calls it when a run fails
        bar: Any = None
        started: tuple[float, int] | None = None

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if not dist_env().is_main:
                return
            self.started = (time.monotonic(), state.global_step)
            if terminal if terminal is not None else sys.stderr.isatty():
                from tqdm.auto import tqdm

                self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="training", unit=" step",
                                dynamic_ncols=True)

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
            if self.started is None or not logs or "loss" not in logs:
                return
            tps = f"{logs['tokens_per_s']:,.0f}" if isinstance(logs.get("tokens_per_s"), int | float) else "?"
            if self.bar is not None:
                self.bar.set_postfix_str(f"loss={float(logs['loss']):.3f}, tok/s={tps}", refresh=False)
                return
            t0, step0 = self.started
            done, left = state.global_step - step0, state.max_steps - state.global_step
            eta = "" if done <= 0 else f", {_hms((time.monotonic() - t0) / done * left)} left"
            lr = f", lr {logs['learning_rate']:.3g}" if isinstance(logs.get("learning_rate"), int | float) else ""
            print(f"step {state.global_step}/{state.max_steps}: loss {float(logs['loss']):.4f}{lr}, {tps} tokens/s"
                  f"{eta}", file=sys.stderr, flush=True)

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    return Progress()


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
