"""A training progress bar (rank 0 only): the runtime turns transformers' own tqdm off, so the CLI draws one.

    training: 100%|██████████| 270/270 [00:41<00:00, 6.5 step/s, loss=0.162]
"""

from __future__ import annotations

import os
from typing import Any


def progress_callback() -> Any:
    """A `transformers.TrainerCallback` drawing a tqdm bar over optimizer steps, with the last logged loss."""
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class ProgressBar(TrainerCallback):
        bar: Any = None

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if os.environ.get("RANK", "0") == "0":
                self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="training", unit=" step",
                                dynamic_ncols=True)

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
            if self.bar is not None and logs and "loss" in logs:
                self.bar.set_postfix(loss=f"{float(logs['loss']):.3f}", refresh=False)

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    return ProgressBar()
