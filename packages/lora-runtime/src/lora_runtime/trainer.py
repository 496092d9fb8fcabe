"""`PackedTrainer`: transformers' Trainer fed our packed rows, with atomic checkpoints and metrics.jsonl.

Overrides, each small:
- `get_train_dataloader` / `get_eval_dataloader`: our `PackedShardDataset` (already split by rank) + `collate_packed`;
  not passed through accelerate's sharding, which would split the rows a second time.
- `evaluate`: a token-weighted eval_loss with every eval row counted once, summed over ranks.
- `get_batch_samples`: moves batches to the GPU before they are counted (Unsloth under torchrun needs it).
- `_prepare_inputs`: `packed_seq_lengths` stays on the CPU; for a model with lora_runtime.chunked_loss, the batch's
  number of targets is counted from the labels while they are still on the CPU (the loss then makes logits for those
  rows alone, without asking the GPU for the count).
- `compute_loss`: pops the batch's real-token count (for tokens/s) before the forward.
- `log`: adds tokens_seen, tokens_per_s (training time only: evaluation and checkpoint time are left out, via
  `_maybe_log_save_evaluate`), peak memory and an exact epoch (also what the integrations see), and writes
  metrics.jsonl on rank 0.
- `_maybe_log_save_evaluate`: on a GPU a step's numbers are copied to the host without waiting and logged during the
  next step, under their own step and epoch (callbacks then see on_step_end of step N+1 before on_log of step N);
  the last step, steps that evaluate, save or stop, and runs with a user callback acting on logs log at once.
- `_save_checkpoint`: every rank writes into a staging dir, rank 0 commits it (fsync, marker, rename), adds
  `data_state.json` (the data position) and the resolved config, and rotates to `save_total_limit`. A full disk
  removes the staging dir and raises CheckpointError saying which complete checkpoint is still intact.
- `train`: resuming from the run's last step (killed after its final checkpoint) trains no extra step; a bf16/fp32
  run whose logged gradient norm turns NaN or infinite stops there, saves nothing more (not even the
  checkpoint due at that step) and raises NonFiniteLossError naming the newest complete checkpoint, failing as a
  step that raised would: no callback's on_train_end runs (`_check_finite`, `_finalize_training`). A failed run
  ends its MLflow run as FAILED (`_close_after_failure`). An out-of-memory error in a training step (its forward,
  backward or optimizer step) names the knobs that fix it (micro_batch_size, max_seq_len, load_in_4bit: `oom_hint`).
- with sharding="fsdp", checkpoints gather the LoRA weights and optimizer state to rank 0 and resume loads them into
  the shards (`lora_runtime.sharding`).
"""

from __future__ import annotations

import contextlib
import math
import shutil
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from transformers import Trainer
from transformers.trainer_callback import PrinterCallback

from lora_runtime import checkpoint, chunked_loss, kernels, sharding
from lora_runtime.batching import BatchPlan
from lora_runtime.checkpoint import run_record
from lora_runtime.collate import collate_packed
from lora_runtime.config import LoraSftConfig
from lora_runtime.dataset import EpochDataLoader, PackedShardDataset
from lora_runtime.distributed import HostCopy, all_reduce_sum, barrier, print0, to_device
from lora_runtime.errors import NonFiniteLossError, OutOfMemoryHint
from lora_runtime.metrics import MetricsWriter, metrics_row, peak_memory_bytes, whole_run_summary
from lora_runtime.model_card import absolutize_base

DEFERRED_LOG_DEVICES = ("cuda",)  # where the host runs ahead of the device (on a CPU a late log gains nothing)


@dataclass
class _PendingLog:
    step: int
    epoch: float | None
    steps: int  # optimizer steps the loss sums over
    values: HostCopy  # loss, grad norm and real tokens, each summed over the `world` ranks
    world: int
    learning_rate: float
    has_grad_norm: bool
    ended: tuple[float, float]  # (time, eval/checkpoint seconds paused so far) when the host had queued the step


def schedule_kwargs(name: str, total_steps: int) -> dict[str, Any]:
    """What `lr_scheduler` `name` needs beyond warmup and length: cosine_with_min_lr ends at 10% of learning_rate,
    warmup_stable_decay decays over the last 10% of the steps (to 0, cosine).

    >>> schedule_kwargs("warmup_stable_decay", 200), schedule_kwargs("linear", 200)
    ({'num_decay_steps': 20}, {})
    """
    if name == "cosine_with_min_lr":
        return {"min_lr_rate": 0.1}
    if name == "warmup_stable_decay":
        return {"num_decay_steps": max(1, total_steps // 10)}
    return {}


class PackedTrainer(Trainer):
    _globalstep_last_logged: int  # transformers' (set in its training loop)

    def __init__(self, *args: Any, config: LoraSftConfig, plan: BatchPlan, metrics: MetricsWriter,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.remove_callback(PrinterCallback)  # disable_tqdm installs it: raw log dicts; lora_runtime.progress instead
        self.run_config, self.plan, self.metrics = config, plan, metrics
        self._model_id: tuple[str | None] | None = None  # see `base_identity`
        from transformers.integrations import TensorBoardCallback

        # the TensorBoard callbacks report_to made, whose writer they open themselves (`_close_after_failure`)
        self._own_tb = [cb for cb in self.callback_handler.callbacks
                        if type(cb) is TensorBoardCallback and cb.tb_writer is None]
        self._tokens_local = 0  # real tokens on this rank since the last flush
        self._last_log: tuple[float, int] | None = None  # (time, tokens) at the last log; set at the first step
        self._paused = 0.0  # eval/checkpoint seconds since the last log's window ended
        # while `_emit_pending` writes a late log: where its window ended (its tokens are already counted)
        self._ended: tuple[float, float] | None = None
        self._logged_at: float | None = None  # when the last log was written
        self._flops_per_token: int | None = None  # see floating_point_ops
        self._pending: _PendingLog | None = None  # a step's log waiting for its numbers (`_defer_log`)
        # (first step the log covers, the step logged, what was not finite, learning rate): see `_check_finite`
        self._nonfinite: tuple[int, int, dict[str, float], float | None] | None = None
        # the first step the log of the last `_maybe_log_save_evaluate` covers: a log written a step late (which is
        # written before the next call sets this) covers the same
        self._log_covers_from = 1
        self._step_begun: int | None = None  # the last training step whose forward began (`training_step`)
        self._norms_since_log: Any = None  # see `_carry_earlier_norms`

    def base_identity(self) -> str | None:
        """In each checkpoint's run record and the run's own: a resume (and a merge) checks it is the same model,
        whatever the path to it. Read at the first save, not at start-up."""
        if self._model_id is None:
            self._model_id = (checkpoint.model_identity(self.run_config.model_path),)
        return self._model_id[0]

    def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
        """transformers' scheduler, with `schedule_kwargs` for the two schedules it cannot build without them."""
        self.args.lr_scheduler_kwargs = schedule_kwargs(self.run_config.lr_scheduler, num_training_steps)
        warmup = self.args.get_warmup_steps(num_training_steps)
        if self.run_config.lr_scheduler == "constant" and warmup:
            print0(f"lr_scheduler='constant' has no warmup: warmup_steps / warmup_ratio ({warmup} steps) do not "
                   "apply (lr_scheduler='constant_with_warmup' ramps up first)")
        return super().create_scheduler(num_training_steps, optimizer)

    # ------------------------------------------------------------------ data
    def _loader(self, dataset: Any, batch_size: int) -> EpochDataLoader:
        # its own generator: starting an epoch's iterator takes no draw from the global RNG, whose state a
        # checkpoint restores before that iterator is made on resume (dropout masks would shift by one draw)
        return EpochDataLoader(dataset, batch_size=batch_size, collate_fn=collate_packed,
                               num_workers=self.args.dataloader_num_workers,
                               pin_memory=self.args.device.type == "cuda",
                               generator=torch.Generator().manual_seed(self.args.seed))

    def get_train_dataloader(self) -> EpochDataLoader:
        return self._loader(self.train_dataset, self.args.per_device_train_batch_size)

    def get_eval_dataloader(self, eval_dataset: Any = None) -> EpochDataLoader:
        return self._loader(eval_dataset if eval_dataset is not None else self.eval_dataset,
                            self.args.per_device_eval_batch_size)

    def _prepare_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """`packed_seq_lengths` stays on the CPU, where the padding-free forward reads it (no device sync). Where the
        model computes its loss with lora_runtime.chunked_loss, the batch's number of targets is counted here, while
        the labels are still on the CPU, for the loss to make logits for those rows alone."""
        inputs = dict(inputs)
        lengths = inputs.pop("packed_seq_lengths", None)
        if chunked_loss.TARGETS_KWARG not in inputs and chunked_loss.counts_targets(self.model):
            count = chunked_loss.target_count(inputs.get("labels"))
            if count is not None:
                inputs[chunked_loss.TARGETS_KWARG] = count
        out = super()._prepare_inputs(inputs)
        if lengths is not None:
            out["packed_seq_lengths"] = lengths
        return out

    def _prepare_input(self, data: Any) -> Any:
        """Pinned batches go to the GPU without blocking the host (the copy is ordered on the compute stream)."""
        import torch

        if isinstance(data, torch.Tensor) and data.device.type == "cpu" and self.args.device.type == "cuda":
            return data.to(self.args.device, non_blocking=data.is_pinned())
        return super()._prepare_input(data)

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: Any = None, *args: Any,
                          **kwargs: Any) -> Any:
        """Batches reach the GPU before they are counted. unsloth_zoo replaces Trainer.get_batch_samples with one that
        all-gathers the token count of the CPU labels it is handed; NCCL refused that ("Tensors must be CUDA and
        dense") on 2 H200s. Moving them here (the Trainer would, a moment later) keeps the count on the GPU."""
        if self.args.device.type == "cuda":
            epoch_iterator = (self._prepare_inputs(batch) for batch in epoch_iterator)
        return super().get_batch_samples(epoch_iterator, num_batches, device, *args, **kwargs)

    def evaluate(self, eval_dataset: Any = None, ignore_keys: Any = None, metric_key_prefix: str = "eval") -> dict:
        """eval_loss = summed loss over every target token of the eval rows ÷ their number, over all ranks: each row
        counts once (repeats are masked by the dataset) and a batch weighs by its tokens, not 1/batches."""
        import torch

        from lora_runtime.collate import IGNORE_INDEX

        start, model = time.perf_counter(), cast(Any, self.model)
        total = count = 0.0
        # liger's fused loss skips the logits only in training mode unless told: evaluation must not build the
        # [tokens, vocab] logits the memory plan left out
        fused = {"skip_logits": True} if kernels.fused_loss_applied(model) else {}
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for batch in self.get_eval_dataloader(eval_dataset):
                    batch.pop("num_tokens", None)
                    n = int((batch["labels"] != IGNORE_INDEX).sum())  # each row starts a sample: its 1st label ignored
                    if n == 0:
                        continue
                    with self.compute_loss_context_manager():
                        loss = model(**self._prepare_inputs(batch), **fused).loss
                    total += float(loss) * n
                    count += n
        except torch.OutOfMemoryError as e:  # the training steps fit: only the evaluation's knobs are named
            raise OutOfMemoryHint(
                f"out of memory in the evaluation after training step {self.state.global_step} ({first_line(e)}). "
                f"Lower per_device_eval_batch_size (now {self.args.per_device_eval_batch_size}; its default is "
                "micro_batch_size) or max_seq_len, or evaluate less often (eval_steps)", None, self.plan) from e
        model.train(was_training)
        total, count = all_reduce_sum(total), all_reduce_sum(count)
        metrics = {f"{metric_key_prefix}_loss": total / count if count else float("nan"),
                   f"{metric_key_prefix}_tokens": int(count), f"{metric_key_prefix}_runtime": time.perf_counter() - start}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(  # type: ignore[has-type]  # transformers is not followed
            self.args, self.state, self.control, metrics)  # type: ignore[has-type]
        return metrics

    @property
    def packed(self) -> PackedShardDataset:
        """The training rows: always our PackedShardDataset (the Trainer types it as any dataset)."""
        return cast("PackedShardDataset", self.train_dataset)

    def train(self, resume_from_checkpoint: str | bool | None = None, trial: Any = None,
              ignore_keys_for_eval: list[str] | None = None) -> Any:
        """transformers' loop runs one step before it checks max_steps: a resume from the final checkpoint (a run
        killed after saving it, before writing the adapter) would train a step past the end. Restore it instead; the
        run ends there, also where max_steps or num_epochs was lowered to or below its step (said)."""
        planned = self.args.max_steps if self.args.max_steps > 0 else (
            self.packed.steps_per_epoch() * math.ceil(self.args.num_train_epochs))
        if isinstance(resume_from_checkpoint, str) and checkpoint.saved_step(resume_from_checkpoint) >= planned:
            from transformers.trainer import TRAINER_STATE_NAME
            from transformers.trainer_callback import TrainerState

            self._load_from_checkpoint(resume_from_checkpoint)
            self.state = TrainerState.load_from_json(str(Path(resume_from_checkpoint) / TRAINER_STATE_NAME))
            done = self.state.global_step
            if done > planned:
                print0(f"{Path(resume_from_checkpoint).name} is past the {planned} steps planned now: the run ends "
                       f"with its adapter (step {done}); resume_from an earlier checkpoint ends sooner")
            self.state.max_steps = done  # the checkpoint's own plan may have been longer: the run is finished
            return None
        import torch

        self._step_begun = None
        try:
            out = super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial,
                                ignore_keys_for_eval=ignore_keys_for_eval)
        except BaseException as e:
            ending: BaseException = e
            try:
                with contextlib.suppress(Exception):  # a step that failed after a late-read log: its numbers written
                    self._emit_pending(wait=False)
            except BaseException as again:  # a second Ctrl-C while they are: it ends the run, as killed
                ending = again
                raise
            finally:
                self._close_after_failure(ending)
            step = self.state.global_step + 1
            if isinstance(e, torch.OutOfMemoryError) and self._step_begun == step:  # in a step: its forward, backward,
                # clipping or optimizer step (where AdamW makes its state in step 1); not a log, a save or an evaluation
                raise OutOfMemoryHint(oom_hint(self.run_config, self.plan, step, e), step, self.plan,
                                      weakref.ref(self.model)) from e
            raise
        if self._nonfinite is not None:  # a transformers without `_finalize_training`
            raise NonFiniteLossError(self._nonfinite_message())
        return out

    def _finalize_training(self, *args: Any, **kwargs: Any) -> Any:
        """A run stopped at a non-finite step fails here, as a step that raised would, before transformers' end of
        training: its on_train_end would have callbacks treat the NaN weights as the final model (wandb uploads them
        with WANDB_LOG_MODEL=end)."""
        if self._nonfinite is not None:
            raise NonFiniteLossError(self._nonfinite_message())
        return super()._finalize_training(*args, **kwargs)

    def _close_after_failure(self, error: BaseException) -> None:
        """A failed run skips on_train_end (see `_finalize_training`), so what it would close is closed here: the
        MLflow run this run started ends FAILED (KILLED on an interrupt) instead of staying RUNNING, the writer of
        the TensorBoard callback report_to made closes (with its thread: a run planned again after an out-of-memory
        error opens another; no callback's on_train_end runs), and the progress bar closes before the error is
        printed."""
        from transformers.integrations import MLflowCallback

        for cb in self.callback_handler.callbacks:
            with contextlib.suppress(Exception):  # never hide the error being raised
                if isinstance(cb, MLflowCallback):
                    if cb._initialized and cb._auto_end_run and cb._ml_flow.active_run():
                        cb._ml_flow.end_run(status="KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
                elif cb in self._own_tb and cb.tb_writer is not None:
                    cb.tb_writer.close()
                    cb.tb_writer = None
                elif getattr(cb, "closes_on_failure", False):
                    cb.on_train_end(self.args, self.state, self.control)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        if sharding.is_sharded(self.model):
            return sharding.load_adapter(self.model, resume_from_checkpoint)
        return super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """On the CPU under gloo, transformers maps the optimizer state to args.device ("cpu:0"), a location
        torch.load cannot restore to; let "cpu:<n>" mean the CPU. (Found by lora-cli's SIGTERM-then-resume test.)
        Then the learning rate follows this run's schedule, not the checkpoint's (see `follow_schedule`)."""
        if checkpoint and sharding.is_sharded(self.model):
            sharding.load_optimizer(self.model, self.optimizer, self.lr_scheduler, checkpoint)
        else:
            if checkpoint and self.args.world_size > 1 and self.args.device.type == "cpu":
                _allow_indexed_cpu_locations()
            super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint:
            follow_schedule(self.optimizer, self.lr_scheduler, self.args.learning_rate)

    def _init_training_state(self, max_steps: int, *args: Any, **kwargs: Any) -> Any:
        """A resumed TrainerState carries the checkpoint's logging / eval / save cadence: this run's settings win."""
        out = super()._init_training_state(max_steps, *args, **kwargs)
        self.state.compute_steps(self.args, max_steps)
        return out

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        self._step_begun = self.state.global_step + 1  # until global_step reaches it, a step is under way (`train`)
        return super().training_step(*args, **kwargs)

    def compute_loss(self, model: Any, inputs: dict, return_outputs: bool = False, num_items_in_batch: Any = None):
        n = inputs.pop("num_tokens", 0)
        if model.training:
            if self._last_log is None:  # tokens/s starts at the first forward, not at model loading
                self._last_log = (time.perf_counter(), int(self.state.num_input_tokens_seen))
            self._tokens_local += int(n)
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        """transformers' estimate (6 × tokens × non-embedding parameters) for total_flos, with the parameter count
        taken once: transformers walks every parameter of the model again on every step to count them."""
        if self._flops_per_token is None:
            count = getattr(self.model, "num_parameters", None)
            self._flops_per_token = 6 * count(exclude_embeddings=True) if count else 0
        ids = inputs.get("input_ids")
        return self._flops_per_token * (ids.numel() if ids is not None else 0)

    # ------------------------------------------------------------------ metrics
    def flush_tokens(self) -> int:
        """Add every rank's new tokens to state.num_input_tokens_seen (a collective: all ranks call it together)."""
        self.state.num_input_tokens_seen += int(all_reduce_sum(self._tokens_local))
        self._tokens_local = 0
        return int(self.state.num_input_tokens_seen)

    def _maybe_log_save_evaluate(self, tr_loss: Any, grad_norm: Any, *args: Any, **kwargs: Any) -> None:
        """Logs one step late where nothing else waits for the device (see `_defer_log`); time spent evaluating and
        checkpointing (after this step's log) is left out of the next tokens/s window."""
        start = time.perf_counter()
        self._logged_at = None
        self._emit_pending()
        logged_before = self._globalstep_last_logged
        self._log_covers_from = logged_before + 1
        grad_norm = self._carry_earlier_norms(grad_norm)
        if (self.control.should_save or self.control.should_training_stop) and self.state.global_step > logged_before:
            # a checkpoint (or the end) holds the loss of every step up to it: a run resumed from it logs the steps
            # after it only, so metrics.jsonl and train_loss read the same as an uninterrupted run's
            self.control.should_log = True
        if self._nonfinite is not None:  # stopping: nothing evaluates or saves after a non-finite step
            self.control.should_save = self.control.should_evaluate = False
        if self._defer_log(tr_loss):
            learning_rate = kwargs.get("learning_rate", args[5] if len(args) > 5 else None)
            self._pending = self._read_later(tr_loss, grad_norm, learning_rate)
            self._logged_at = self._pending.ended[0]  # the rest of this call is paused time of the next window
        super()._maybe_log_save_evaluate(tr_loss, grad_norm, *args, **kwargs)
        if self._globalstep_last_logged != logged_before:
            self._norms_since_log = None
            # transformers resets the running loss with `tr_loss -= tr_loss`: a NaN logged once would stay NaN in
            # every later log (and a skipped fp16 overflow step would poison the rest of the run's numbers)
            self._tr_loss.zero_()
        self._paused += time.perf_counter() - (self._logged_at or start)

    def _carry_earlier_norms(self, grad_norm: Any) -> Any:
        """transformers logs the gradient norm of the logged step only. With logging_steps > 1, a step between logs
        whose norm was NaN or infinite could pass unseen where later losses stay finite (LoRA on embedding rows that
        no later batch reads) and reach a checkpoint. Every step's norm where it was not finite, else 0, is summed
        on the device, no sync, and the logged norm carries the sum: exactly this step's norm, or the NaN or inf of a
        step since the last log (`_check_finite` stops there, naming the steps the log covers)."""
        import torch

        if self.args.logging_steps <= 1 or self.args.fp16 or not isinstance(grad_norm, torch.Tensor):
            return grad_norm  # fp16: the loss scaler skips overflowing steps, and their norms stay unlogged
        g = grad_norm.detach()
        zero = torch.where(torch.isfinite(g), torch.zeros_like(g), g)  # 0, or the NaN or inf itself
        self._norms_since_log = zero if self._norms_since_log is None else self._norms_since_log + zero
        return grad_norm + self._norms_since_log

    def _defer_log(self, tr_loss: Any) -> bool:
        """Whether this step's log is written during the next step. Reading the loss (`.item()`) at once waits for
        the device to finish the step, leaving it idle while the host logs, loads the next batch and starts the next
        forward: with a small pass (2 rows of 2048 on the compiled path, a log every step) a quarter of the step
        time on an H200 (benchmarks/RESULTS.md, trainer-overhead). Read one
        step later, the copy has long landed. The last step, and steps that evaluate, save or stop, log at once; so
        does every step where a callback of the user's reads logs (`reads_logs_at_once`)."""
        control, state = self.control, self.state
        return bool(tr_loss.device.type in DEFERRED_LOG_DEVICES and control.should_log
                    and state.global_step > self._globalstep_last_logged
                    and not (control.should_evaluate or control.should_save or control.should_training_stop)
                    and 0 < state.global_step < state.max_steps and not self._reads_logs_at_once())

    def _reads_logs_at_once(self) -> bool:
        """A callback may act on a log by setting control flags (stop, save, evaluate), which must apply to the
        step logged: any `on_log` outside transformers and this package keeps logs read at once, unless its class
        says `late_log_ok = True` (it only records what it is given)."""
        from transformers import TrainerCallback

        return any(type(cb).on_log is not TrainerCallback.on_log and not getattr(cb, "late_log_ok", False)
                   and not type(cb).__module__.startswith(("transformers.", "lora_runtime.", "lora_cli."))
                   for cb in self.callback_handler.callbacks)

    def _read_later(self, tr_loss: Any, grad_norm: Any, learning_rate: float | None) -> _PendingLog:
        """Starts copying this step's loss sum, grad norm and token count to the host (summed over ranks on the
        device) and marks the step logged; `_emit_pending` writes the log once the copy has landed."""
        import torch
        import torch.distributed as dist

        device = tr_loss.device
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2
            grad_norm = grad_norm.full_tensor()
        on_device = isinstance(grad_norm, torch.Tensor)
        host_norm = 0.0 if on_device or grad_norm is None else float(grad_norm)
        values = torch.cat([tr_loss.detach().reshape(1).double(),
                            to_device([host_norm, self._tokens_local], torch.float64, device)])
        if on_device:
            values[1] += grad_norm.detach().to(device, torch.float64)
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if world > 1:
            dist.all_reduce(values)  # loss: summed (÷ world below); grad norm: the same on every rank; tokens: summed
        pending = _PendingLog(step=self.state.global_step, epoch=self.state.epoch,
                              steps=self.state.global_step - self._globalstep_last_logged, values=HostCopy(values),
                              world=world,
                              learning_rate=learning_rate if learning_rate is not None else self._get_learning_rate(),
                              has_grad_norm=grad_norm is not None, ended=(time.perf_counter(), self._paused))
        tr_loss.zero_()
        self._tokens_local = 0
        self._globalstep_last_logged = self.state.global_step  # transformers' own log skips this step
        return pending  # total_flos is stored at the next log or checkpoint that waits anyway (it syncs under DDP)

    def _emit_pending(self, wait: bool = True) -> None:
        """Writes the log `_read_later` started, under the step (and epoch) it belongs to; with `wait=False` only
        if its copy has landed (after a failure the device may never finish)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        landed = pending.values.landed()
        if not wait and not landed:
            return
        loss_sum, norm, tokens = pending.values.tolist()
        loss_sum /= pending.world  # the ranks' mean, as transformers logs it
        self._total_loss_scalar += loss_sum
        self.state.num_input_tokens_seen += int(tokens)
        logs: dict[str, float] = {"loss": loss_sum / pending.steps}
        if pending.has_grad_norm:
            logs["grad_norm"] = norm / pending.world
        logs["learning_rate"] = pending.learning_rate
        now = self.state.global_step, self.state.epoch
        self.state.global_step, self.state.epoch = pending.step, pending.epoch
        # its tokens/s window ends where the step did: when the host had queued it if the device was done by now
        # (the host sets the pace), else now, having waited for the device (the device sets it)
        ended = pending.ended if landed else (time.perf_counter(), self._paused)
        should_log, self._ended = self.control.should_log, ended
        try:
            self.log(logs)  # the callback handler clears control.should_log, which is this step's to use
        finally:
            (self.state.global_step, self.state.epoch), self._ended = now, None
            self.control.should_log = should_log

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            seen = int(self.state.num_input_tokens_seen) if self._ended else self.flush_tokens()
            # a log written a step late ends its window where its step ended (`_emit_pending`), not now: a step
            # that logs at once right after it (the last, one that saves) must not get the moments between the two
            now, paused = self._ended or (time.perf_counter(), self._paused)
            t0, seen0 = self._last_log or (now, seen)
            logs["tokens_seen"] = seen
            logs["tokens_per_s"] = (seen - seen0) / max(now - t0 - paused, 1e-9)
            self._last_log, self._paused = (now, seen), self._paused - paused
        # transformers counts the epoch from where a resumed run re-entered its loop; ours is exact, and the
        # integrations (wandb, TensorBoard, ...) read it from the state in super().log
        self.state.epoch = self.state.global_step / max(self.packed.steps_per_epoch(), 1)
        if "loss" in logs or "eval_loss" in logs:
            logs["peak_memory_bytes"] = peak_memory_bytes()
            super().log(logs, start_time)
            self.metrics.write(metrics_row(logs, self.state.global_step))
            self._check_finite(logs)
        else:  # the end-of-run summary (train_runtime, ...) goes to the integrations only, over the whole run
            super().log(whole_run_summary(logs, self.metrics.path), start_time)
        if "loss" in logs:
            self._logged_at = time.perf_counter()

    def _check_finite(self, logs: dict[str, float]) -> None:
        """A logged gradient norm (or, where none is logged, loss) that is NaN or infinite, in bf16 or fp32: this
        step's update writes NaN into every LoRA weight (weights already NaN give NaN gradients too), and no later
        step recovers. Training stops after this step, which neither evaluates nor saves (the log comes first in
        `_maybe_log_save_evaluate`; a deferred log is written before the next step's save), and the run raises
        where transformers would end training (`_finalize_training`). A step that saves always logs: with
        logging_steps=1 (the default) no checkpoint holds weights from a step whose gradient norm was not finite;
        with a longer interval the logged norm carries every step's since the last log (`_carry_earlier_norms`). A
        NaN loss over finite gradients leaves the weights whole and is only logged. fp16 runs are left alone: their
        loss scaler skips an overflowing step and goes on."""
        if self.args.fp16 or self._nonfinite is not None or "loss" not in logs:
            return
        bad = {k: float(logs[k]) for k in ("loss", "grad_norm") if k in logs and not math.isfinite(float(logs[k]))}
        if bad and ("grad_norm" in bad or "grad_norm" not in logs):
            self._nonfinite = (self._log_covers_from, self.state.global_step, bad, logs.get("learning_rate"))
            self.control.should_training_stop = True
            self.control.should_save = self.control.should_evaluate = False

    def _nonfinite_message(self) -> str:
        assert self._nonfinite is not None
        first, step, bad, lr = self._nonfinite
        what = " and ".join(f"{'gradient norm' if k == 'grad_norm' else k} {v}" for k, v in bad.items())
        if first < step:  # the loss logged is the mean of those steps', the norm carries theirs
            what += (f" in one of steps {first}-{step} (with logging_steps={self.args.logging_steps:g}, a log covers "
                     "every step since the last one)")
        at = f" at learning_rate {lr:.3g}" if lr is not None else ""
        kept = checkpoint.newest_complete(Path(str(self.args.output_dir)))
        resume = (f"the newest complete checkpoint, {kept}, is from before it, and the same call with a lower "
                  "learning_rate (or warmup_steps and max_grad_norm above 0) resumes from it" if kept else
                  "no checkpoint had been written before it: lower learning_rate (or keep warmup_steps and "
                  "max_grad_norm above 0) and run again")
        return (f"training stopped at step {step}: {what}{at}. In {'bf16' if self.args.bf16 else 'fp32'} training "
                "the optimizer turns every LoRA weight NaN from there on, so nothing from that step on was saved; "
                f"{resume}. A broken record fixed in the data means preparing it again and a new ckpt_output_dir "
                f"(the checkpoints are tied to the data). The losses up to it are in {self.metrics.path}")

    # ------------------------------------------------------------------ checkpoints
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """The adapter (+ tokenizer) only. Base weights never train, so with lm_head or embeddings among the LoRA
        targets PEFT's default would copy the whole frozen vocabulary matrix into every checkpoint; we don't."""
        from peft import PeftModel

        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if not isinstance(model, PeftModel):
            return super()._save(output_dir, state_dict)
        out = str(output_dir or self.args.output_dir)
        model.save_pretrained(out, state_dict=state_dict, safe_serialization=True, save_embedding_layers=False)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(out)
        return None

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        root, step = Path(str(self.args.output_dir)), self.state.global_step
        try:
            self._write_checkpoint(root, step)
        except Exception as e:  # OSError, a library's plain Exception with ENOSPC's words, torch.save's RuntimeError
            reason = checkpoint.disk_full_reason(e, root)  # measured before the partial write is removed
            if reason is None:
                raise
            shutil.rmtree(root / f".tmp-checkpoint-{step}", ignore_errors=True)
            kept = checkpoint.newest_complete(root)
            intact = f"the previous checkpoint {kept} is intact" if kept else "no earlier checkpoint exists"
            raise checkpoint.CheckpointError(
                f"disk full ({reason}) while writing checkpoint-{step} under {root}; the partial write was "
                f"removed and {intact}. Free space (or move ckpt_output_dir, or lower save_total_limit) and run "
                "the same command again to resume") from e

    def _write_checkpoint(self, root: Path, step: int) -> None:
        from transformers.trainer import TRAINER_STATE_NAME

        self.flush_tokens()
        if self.args.should_save:
            checkpoint.staging_dir(root, step)
        barrier()
        tmp = root / f".tmp-checkpoint-{step}"
        self.store_flos()
        if sharding.is_sharded(self.model):  # every rank gathers the LoRA weights and AdamW state; rank 0 writes them
            trainable = sharding.gather_trainable(self.model)
            if self.args.should_save:
                self._save(str(tmp), state_dict=trainable)
            sharding.save_optimizer(self.model, self.optimizer, self.lr_scheduler, tmp)
        else:
            self.save_model(str(tmp), _internal_call=True)
            self._save_optimizer_and_scheduler(str(tmp))
        self._save_scaler(str(tmp))
        self._save_rng_state(str(tmp))
        if self.args.should_save:
            self.state.save_to_json(str(tmp / TRAINER_STATE_NAME))
            checkpoint.write_json_atomic(tmp / "data_state.json", self.packed.state_at(step))
            checkpoint.write_json_atomic(tmp / checkpoint.CONFIG_NAME, run_record(
                self.run_config, self.plan, data=checkpoint.data_identity(self.packed.reader.manifest),
                model=self.base_identity()))
            absolutize_base(tmp, str(self.run_config.model_path))  # the adapter loads from any working directory
        barrier()
        if self.args.should_save:
            self.metrics.sync()  # the logged rows up to this step are durable before the checkpoint that covers them
            checkpoint.commit(tmp, step)
            checkpoint.rotate(root, self.run_config.save_total_limit)
        barrier()


def follow_schedule(optimizer: Any, scheduler: Any, learning_rate: float) -> None:
    """After loading a checkpoint's optimizer and scheduler state: the peak LR is this run's `learning_rate` and the
    LR of the next step is this run's schedule at the resumed step. The schedule's shape (its lambda, built for this
    run's max_steps and warmup) is never restored by torch, but `base_lrs` and the optimizer's current lr are: so a
    changed learning_rate would be ignored, and a max_steps extended past the old end would run a step at lr 0.
    With nothing changed this recomputes exactly the lr the checkpoint holds (same formula, same step)."""
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if lambdas is None or len(lambdas) != len(optimizer.param_groups):
        return
    scheduler.base_lrs = [learning_rate] * len(optimizer.param_groups)
    for group, fn in zip(optimizer.param_groups, lambdas, strict=True):
        group["initial_lr"] = learning_rate
        group["lr"] = learning_rate * fn(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def first_line(error: BaseException | None) -> str:
    """An error's first line, or its type's name where it says nothing."""
    return (str(error or "").strip().splitlines() or [type(error).__name__])[0]


def oom_cause(error: BaseException | None) -> str:
    """The allocator's error up to the size it could not allocate (its advice and statistics left out)."""
    head, sep, tail = first_line(error).partition("Tried to allocate ")
    return head + sep + tail.split(". ")[0].rstrip(".") if sep else head


def oom_hint(config: LoraSftConfig, plan: BatchPlan, step: int, error: BaseException) -> str:
    first = first_line(error)
    quant = "" if config.load_in_4bit else "; load_in_4bit=True (QLoRA) to quarter the base weights' memory"
    every = plan.gradient_checkpointing and plan.recomputed_layers is None  # recomputing all already
    last = ("; or activation_offload=False with gradient_checkpointing=True" if config.activation_offload is True
            else "" if every else "; or gradient_checkpointing=True")
    budget = ("" if plan.estimated_peak_bytes is None else
              f" The memory plan estimated a peak of {plan.estimated_peak_bytes / 1024**3:.1f} GiB; pass a lower "
              "max_memory_gib to plan for less.")
    return (f"out of memory in training step {step} ({first}). Lower micro_batch_size (now {plan.micro}; "
            f"set effective_batch_size to keep the optimizer step the same), lower max_seq_len (now "
            f"{config.max_seq_len}; rows are packed to it){quant}{last}.{budget}")


def _allow_indexed_cpu_locations() -> None:
    """Register (once) a torch.load location handler that restores storages mapped to "cpu:<n>" on the CPU."""
    import torch.serialization as ser

    if any(p == 15 for p, _, _ in ser._package_registry):
        return
    ser.register_package(15, lambda obj: None, lambda obj, loc: obj if loc.startswith("cpu:") else None)
