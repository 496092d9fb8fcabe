"""`PackedTrainer`: transformers' Trainer fed our packed rows, with atomic checkpoints and metrics.jsonl.

Overrides, each small:
- `get_train_dataloader` / `get_eval_dataloader`: our `PackedShardDataset` (already split by rank) + `collate_packed`;
  not passed through accelerate's sharding, which would split the rows a second time.
- `compute_loss`: pops the batch's real-token count (for tokens/s) before the forward.
- `log`: adds tokens_seen, tokens_per_s, peak memory and an exact epoch, and writes metrics.jsonl on rank 0.
- `_save_checkpoint`: every rank writes into a staging dir, rank 0 commits it (fsync, marker, rename), adds
  `data_state.json` (the data position) and the resolved config, and rotates to `save_total_limit`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from transformers import Trainer

from lora_runtime import checkpoint
from lora_runtime.collate import collate_packed
from lora_runtime.config import LoraSftConfig
from lora_runtime.dataset import EpochDataLoader
from lora_runtime.distributed import all_reduce_sum, barrier
from lora_runtime.metrics import MetricsWriter, metrics_row, peak_memory_bytes


class PackedTrainer(Trainer):
    def __init__(self, *args: Any, config: LoraSftConfig, metrics: MetricsWriter, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.run_config, self.metrics = config, metrics
        self._tokens_local = 0  # real tokens on this rank since the last flush
        self._last_log = (time.perf_counter(), 0)

    # ------------------------------------------------------------------ data
    def _loader(self, dataset: Any, batch_size: int) -> EpochDataLoader:
        return EpochDataLoader(dataset, batch_size=batch_size, collate_fn=collate_packed,
                               num_workers=self.args.dataloader_num_workers, pin_memory=False)

    def get_train_dataloader(self) -> EpochDataLoader:
        return self._loader(self.train_dataset, self.args.per_device_train_batch_size)

    def get_eval_dataloader(self, eval_dataset: Any = None) -> EpochDataLoader:
        return self._loader(eval_dataset if eval_dataset is not None else self.eval_dataset,
                            self.args.per_device_eval_batch_size)

    def compute_loss(self, model: Any, inputs: dict, return_outputs: bool = False, num_items_in_batch: Any = None):
        n = inputs.pop("num_tokens", 0)
        if model.training:
            self._tokens_local += int(n)
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)

    # ------------------------------------------------------------------ metrics
    def flush_tokens(self) -> int:
        """Add every rank's new tokens to state.num_input_tokens_seen (a collective: all ranks call it together)."""
        self.state.num_input_tokens_seen += int(all_reduce_sum(self._tokens_local))
        self._tokens_local = 0
        return int(self.state.num_input_tokens_seen)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            seen = self.flush_tokens()
            now = time.perf_counter()
            t0, seen0 = self._last_log
            logs["tokens_seen"] = seen
            logs["tokens_per_s"] = (seen - seen0) / max(now - t0, 1e-9)
            self._last_log = (now, seen)
        if "loss" in logs or "eval_loss" in logs:
            logs["peak_memory_bytes"] = peak_memory_bytes()
            super().log(logs, start_time)
            logs["epoch"] = self.state.global_step / max(self.train_dataset.steps_per_epoch(), 1)
            self.metrics.write(metrics_row(logs, self.state.global_step))
        else:  # the end-of-run summary (train_runtime, ...) goes to the integrations only
            super().log(logs, start_time)

    # ------------------------------------------------------------------ checkpoints
    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        from transformers.trainer import TRAINER_STATE_NAME

        root, step = Path(self.args.output_dir), self.state.global_step
        self.flush_tokens()
        if self.args.should_save:
            checkpoint.staging_dir(root, step)
        barrier()
        tmp = root / f".tmp-checkpoint-{step}"
        self.store_flos()
        self.save_model(str(tmp), _internal_call=True)
        self._save_optimizer_and_scheduler(str(tmp))
        self._save_scaler(str(tmp))
        self._save_rng_state(str(tmp))
        if self.args.should_save:
            self.state.save_to_json(str(tmp / TRAINER_STATE_NAME))
            checkpoint.write_json_atomic(tmp / "data_state.json", self.train_dataset.state_at(step))
            checkpoint.write_json_atomic(tmp / "lora_sft_config.json", self.run_config.to_dict())
        barrier()
        if self.args.should_save:
            checkpoint.commit(tmp, step)
            checkpoint.rotate(root, self.run_config.save_total_limit)
        barrier()
