"""`train(config, plan, backend, dataset) -> TrainResult`: transformers' Trainer on pre-packed rows.

The rows are already tokenized, masked and packed by lora-data; nothing here re-tokenizes or re-packs. The Trainer
brings the LR schedule, warmup, clipping, weight decay, mixed precision, DDP and report_to integrations; this module
adds the data path (PackedShardDataset + collate_packed), atomic checkpoints with the data position (exact resume),
metrics.jsonl, and the start-up log of every decision.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_runtime import checkpoint, hub, model_card, residual
from lora_runtime.config import LoraSftConfig
from lora_runtime.data import apply_chat_template, prepared_options
from lora_runtime.distributed import barrier, dist_env, init_process_group, print0
from lora_runtime.merge import MARKER as MERGE_MARKER
from lora_runtime.merge import MergeDiskFull, merged_from
from lora_runtime.metrics import (
    MetricsWriter,
    peak_memory_bytes,
    plot_loss,
    report_targets,
    reporting_env,
    run_summary,
)
from lora_runtime.progress import progress_callback

if TYPE_CHECKING:  # torch-heavy; imported where used so `import lora_runtime.api` stays light
    from lora_runtime.backends.base import Backend
    from lora_runtime.batching import BatchPlan
    from lora_runtime.dataset import PackedShardDataset


@dataclass(frozen=True)
class TrainResult:
    """What a run produced (paths under ckpt_output_dir) and how it went. Every figure is over the whole run, also
    after a resume in the same directory (the losses come from its metrics.jsonl; resumed from another run's
    checkpoint, over the steps since). Also readable by key, for scripts written against a dict:
    `result["final_loss"]`, `result.keys()`, `result.get("eval_loss")`, `dict(result)`."""

    adapter_dir: Path | None  # None when save_model=False (checkpoints still hold adapters)
    merged_dir: Path | None
    metrics_path: Path
    loss_plot: Path | None
    backend: str
    steps: int
    tokens_seen: int
    final_loss: float | None
    wall_time_s: float
    peak_memory_bytes: int
    manifest: Any = None
    train_loss: float | None = None  # mean loss over every step of the run (resumed or not), weighted by steps
    eval_loss: float | None = None  # the last evaluation's
    finished: bool = True  # False where a stop (a signal, a callback) ended it before its last step

    def keys(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self)]

    def __getitem__(self, key: str) -> Any:
        if key not in self.keys():
            raise KeyError(f"{key!r}: a TrainResult has {', '.join(self.keys())} (training-hub's live 'model', "
                           "'tokenizer' and 'trainer' are not kept: load the adapter from result['adapter_dir'])")
        return getattr(self, key)

    def __contains__(self, key: object) -> bool:
        return key in self.keys()

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key) if key in self.keys() else default


RENDEZVOUS = ("node_rank", "rdzv_id", "rdzv_endpoint", "master_addr", "master_port")  # torchrun's, for several processes


def train(config: LoraSftConfig, plan: BatchPlan, backend: Backend, dataset: PackedShardDataset,
          eval_dataset: PackedShardDataset | None = None, *, manifest: Any = None,
          backend_reason: str = "") -> TrainResult:
    """Load → LoRA → log the plan → Trainer.train (resuming when a complete checkpoint exists) → save outputs."""
    from lora_runtime.trainer import PackedTrainer

    start = time.time()
    env = init_process_group()
    if env.world_size == 1 and (given := [n for n in RENDEZVOUS if getattr(config, n) is not None]):
        print0(f"{', '.join(given)}: one process trains (no torchrun rendezvous): ignored")
    resume_from = checkpoint.resume_checkpoint(config)
    if resume_from is not None:  # a setting the checkpoint fixes is refused here, before the model loads
        changed = checkpoint.check_resume(resume_from, config, plan, dataset)
        if changed:
            print0(f"resume: changed since {resume_from.name}, applied: {'; '.join(changed)}")
    precision = decide_precision(config)
    if config.sharding == "fsdp":  # rank 0 loads, the others build on the meta device, all keep their shards
        from lora_runtime.sharding import load_sharded

        model, tokenizer = load_sharded(backend, config, plan, precision)
    else:
        model, tokenizer = backend.load(config, plan)
        model = backend.add_lora(model, config, plan)
        if getattr(model, "cuda_graphs", False):  # every pass padded to the run's most segments: one graph shape
            model.graph_segments = max(data.most_segments() for data in (dataset, eval_dataset) if data is not None)
            print0(f"CUDA graphs: each pass's boundaries padded for {model.graph_segments} segments (samples and "
                   "padding tails), the most a pass of this data holds: one shape, recorded once")
    apply_chat_template(config, tokenizer)
    log_plan(config, plan, backend, backend_reason, dataset, manifest, precision)
    if resume_from is None and residual.convertible(config, model, say=True):  # to save the adapter for the base
        save_start = _saver(model, backend)
        if env.is_main:
            residual.keep_start(config, save_start)
    resume_step = None
    if resume_from is not None:
        data_state = json.loads((resume_from / "data_state.json").read_text())
        dataset.load_state_dict(data_state)
        resume_step = checkpoint.saved_step(resume_from)
        print0(f"resuming from {resume_from} (step {resume_step}, epoch {data_state['epoch']}, "
               f"row offset {dataset.offset} on each rank)")
    metrics = MetricsWriter(Path(config.ckpt_output_dir) / "metrics.jsonl", resume_step=resume_step,
                            enabled=env.is_main)
    from lora_runtime.compiled import release

    try:  # CUDA graphs' memory pool goes however training ends (a retry in this process starts without it)
        with reporting_env(config):
            trainer = PackedTrainer(config=config, plan=plan, metrics=metrics, model=model, train_dataset=dataset,
                                    args=training_arguments(config, plan, precision), eval_dataset=eval_dataset,
                                    processing_class=tokenizer,
                                    callbacks=[*(_callbacks(config.callbacks) or []), progress_callback()])
            trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        trainer.flush_tokens()
        return finish(config, plan, backend, trainer, tokenizer, manifest, start, resume_step)
    finally:
        release(model)


def _saver(model: Any, backend: Backend) -> Callable[[Path], Any]:
    """How rank 0 writes `model`'s adapter into a directory. Every rank calls this: a sharded model's LoRA weights
    are gathered first."""
    from lora_runtime import sharding

    if sharding.is_sharded(model):
        trainable = sharding.gather_trainable(model)
        return lambda d: sharding.save_adapter(model, d, trainable)
    return lambda d: backend.save_adapter(model, d)


def release_memory() -> None:
    """After a failed attempt, before planning the next in this process: its model, optimizer and compiled graphs
    unreachable now, their GPU memory goes back, and the peak starts again (the next plan reads the memory free)."""
    import gc

    import torch

    if torch.cuda.is_available():
        import torch._dynamo

        torch._dynamo.reset()  # compiled code that still refers to the failed attempt's layers
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def decide_precision(config: LoraSftConfig) -> str:
    """"bf16" | "fp16" | "fp32", degrading (with a logged reason) where the hardware cannot do what was asked."""
    import torch

    cuda = torch.cuda.is_available()
    if config.tf32 is not None and cuda:
        torch.backends.cuda.matmul.allow_tf32 = config.tf32
        torch.backends.cudnn.allow_tf32 = config.tf32
    elif config.tf32:
        print0("tf32=True applies to CUDA matmuls; this run is on the CPU, which has no TF32: ignored")
    if config.bf16:
        if cuda and torch.cuda.is_bf16_supported():
            return "bf16"
        if cuda:  # T4/V100: what Unsloth loads the weights in there, and AMP's usual choice for the peft backend
            print0("precision: bf16=True requested but this GPU lacks bf16: training in fp16 with loss scaling")
            return "fp16"
        print0("precision: bf16=True requested but running on a CPU (bf16 autocast there is slow and unvalidated): "
               "training in fp32")
        return "fp32"
    if config.fp16:
        if cuda:
            return "fp16"
        print0("precision: fp16=True requested but fp16 loss scaling needs CUDA: training in fp32")
    return "fp32"


def log_plan(config: LoraSftConfig, plan: BatchPlan, backend: Backend, reason: str, dataset: PackedShardDataset,
             manifest: Any, precision: str) -> None:
    """Rank 0 says what it decided: backend and why, batch arithmetic, tokens per step, packing, steps."""
    effective = plan.effective
    seq_len = dataset.reader.seq_len
    eff = getattr(manifest, "packing_efficiency", None) or dataset.reader.manifest.packing_efficiency
    steps = dataset.steps_per_epoch()
    total = config.max_steps or steps * config.num_epochs
    print0(f"backend: {backend.name} ({reason or 'given'}); precision {precision}")
    name, why = optimizer_name(config)
    if why:
        print0(f"optimizer: {config.optim} → {name} ({why})")
    hint = forced_recompute_hint(config, backend)
    print0(f"batch: {plan.describe()}; activation recomputation: {plan.recomputation()}{hint}")
    print0(f"tokens/step: {effective * seq_len:,} slots of seq_len {seq_len}, ~{int(effective * seq_len * eff):,} real "
           f"at packing efficiency {eff:.3f}")
    print0(f"data: {len(dataset.reader):,} rows → {steps:,} steps/epoch ({dataset.repeated_rows()} row(s) repeated to "
           f"fill the last step); {total:,} optimizer steps in total")
    if report_targets(config):
        print0(f"reporting to: {', '.join(report_targets(config))}")


def forced_recompute_hint(config: LoraSftConfig, backend: Backend) -> str:
    """On a GPU, where gradient_checkpointing=True recomputes every layer and "auto" would plan by memory on this
    backend: that a memory budget is the faster way to little memory (README, "On a GPU: one memory plan"). One
    H100, Qwen2.5-1.5B shape, micro 8: every layer recomputed ran 35.7k tokens/s at a 4.6 GiB peak; max_memory_gib=8
    with the defaults about 50k at 6.3 GiB."""
    import torch

    if config.gradient_checkpointing is not True or not torch.cuda.is_available():
        return ""
    if not backend.checkpointing_by_memory(dataclasses.replace(config, gradient_checkpointing="auto")):
        return ""  # auto recomputes every layer here too (the peft backend without a fused loss)
    return ("; gradient_checkpointing=True recomputes every layer, where gradient_checkpointing='auto' with "
            "max_memory_gib recomputes or offloads only what that budget needs")


def optimizer_name(config: LoraSftConfig) -> tuple[str, str]:
    """The transformers optimizer name that runs `config.optim`, and why where it differs: on a CUDA GPU adamw_torch
    runs as torch's fused AdamW, the same update in a few fused launches (the multi-tensor version launches several
    per group and reads each parameter's step count on the host, twice a parameter a step: 784 reads for LoRA on 28
    layers). Either one loads the other's optimizer state."""
    import torch

    if config.optim == "adamw_torch" and torch.cuda.is_available():
        return "adamw_torch_fused", "the same AdamW update in a few fused launches on the GPU"
    return config.optim, ""


def training_arguments(config: LoraSftConfig, plan: BatchPlan, precision: str) -> Any:
    """TrainingArguments for the packed path; checkpoint rotation and data skipping are ours."""
    import torch
    from transformers import TrainingArguments

    micro, accum = plan.micro, plan.accumulation
    targets = report_targets(config)
    return TrainingArguments(
        output_dir=str(checkpoint.checkpoints_dir(config.ckpt_output_dir)),
        per_device_train_batch_size=micro, gradient_accumulation_steps=accum,
        per_device_eval_batch_size=config.per_device_eval_batch_size or micro,
        num_train_epochs=config.num_epochs, max_steps=config.max_steps or -1,
        learning_rate=config.learning_rate, lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_steps if config.warmup_ratio is None else config.warmup_ratio,  # < 1: a fraction
        weight_decay=config.weight_decay, max_grad_norm=config.max_grad_norm, optim=optimizer_name(config)[0],
        adam_beta1=config.adam_beta1, adam_beta2=config.adam_beta2, adam_epsilon=config.adam_epsilon,
        bf16=precision == "bf16", fp16=precision == "fp16", use_cpu=not torch.cuda.is_available(),
        logging_strategy="steps", logging_steps=config.logging_steps,
        save_strategy="steps", save_steps=config.save_steps, save_total_limit=None,
        eval_strategy="steps" if config.eval_data_path or config.eval_split_ratio else "no",
        eval_steps=config.eval_steps,
        # MLflow's run name (wandb's run is opened by metrics.reporting_env, with its own)
        report_to=targets or "none", run_name=config.mlflow_run_name or config.wandb_run_name,
        seed=config.seed, data_seed=config.seed, dataloader_num_workers=config.dataloader_num_workers,
        dataloader_pin_memory=False, ignore_data_skip=True, remove_unused_columns=False,
        ddp_find_unused_parameters=False, gradient_checkpointing=False, disable_tqdm=True,
        # a NaN or inf loss is logged as it is, not replaced by the mean of earlier ones (the filter also waited for
        # the GPU after every backward, to test the loss)
        logging_nan_inf_filter=False,
    )


def finish(config: LoraSftConfig, plan: BatchPlan, backend: Backend, trainer: Any, tokenizer: Any, manifest: Any,
           start: float, resume_step: int | None = None) -> TrainResult:
    """Rank 0 writes adapter, tokenizer, resolved config, loss plot and (optionally) the merged model. A finished run
    called again (no step left) keeps its run record, and so its card: settings changed since trained nothing."""
    out = Path(config.ckpt_output_dir)
    step = trainer.state.global_step
    # the record must be this step's too: a full disk (or a kill) between the seal and the record leaves an earlier
    # finish's record in place, with the settings of a run that stopped sooner
    rerun = (resume_step == step and checkpoint.sealed_step(out) == step and (out / checkpoint.CONFIG_NAME).is_file()
             and checkpoint.recorded_step(out) in (step, None))
    if rerun:
        print0(f"nothing left to train after step {step}: {checkpoint.CONFIG_NAME} and the model card keep the "
               "settings the adapter was trained with")
    metrics_path = out / "metrics.jsonl"
    trainer.metrics.sync()  # rows past the last checkpoint: no resume would log them again
    # Stopped early (a signal, a callback): the newest checkpoint holds the state; nothing may look like a final result.
    stopped = trainer.state.max_steps > 0 and trainer.state.global_step < trainer.state.max_steps
    if stopped:
        print0(f"stopped after step {trainer.state.global_step} of {trainer.state.max_steps}: no final adapter or "
               "merge is written; the same call resumes from the newest checkpoint")
    adapter_dir = out if config.save_model and not stopped else None
    merged_dir = plot = None
    save_trained = _saver(trainer.model, backend) if adapter_dir is not None else None
    if dist_env().is_main:
        def save(d: Path) -> Any:
            assert save_trained is not None  # called only where adapter_dir is set
            written = save_trained(d)
            if residual.convertible(config, trainer.model):
                residual.to_plain_lora(d, residual.start_path(config), str(config.init_lora_weights))
            return written

        adapter_written = False
        try:
            if adapter_dir is not None:
                checkpoint.write_final_adapter(out, save, tokenizer, trainer.state.global_step)
                adapter_written = True
            if not rerun:
                checkpoint.write_json_atomic(out / checkpoint.CONFIG_NAME, checkpoint.run_record(
                    config, plan, step=step, backend=backend.name,
                    cuda_graphs=bool(getattr(trainer.model, "cuda_graphs", False)),
                    versions=_versions(), model=trainer.base_identity(),
                    prepared=None if manifest is None else prepared_options(manifest)))
            plot = plot_loss(metrics_path, out / "loss.png")
            if adapter_dir is not None:
                model_card.write_model_card(out, manifest)
        except Exception as e:  # a full disk here is one error naming the complete checkpoint, as during training
            reason = checkpoint.disk_full_reason(e, out)
            if reason is None:
                raise
            raise checkpoint.CheckpointError(_final_disk_full(out, reason, adapter_written)) from e
        if config.save_merged and not stopped:
            source = adapter_dir or checkpoint.newest_complete(checkpoint.checkpoints_dir(out))
            if source is None:
                raise checkpoint.CheckpointError(f"{out}: no adapter and no complete checkpoint to merge")
            try:
                merged_dir = backend.merge(source, out / "merged", config)
            except MergeDiskFull as e:
                raise checkpoint.CheckpointError(f"{e} (`lora-cli merge {source} --model {config.model_path} --out "
                                                 f"{out / 'merged'}`); the adapter in {source} is complete") from e
            print0(f"merged model written to {merged_dir}")
        elif not stopped and not rerun and (out / "merged" / MERGE_MARKER).is_file():
            # a merge of an earlier adapter of this run, beside one trained further: whoever deploys it ships the old
            # model (a link to a merge elsewhere, and a merge of another adapter, are left, and named)
            if (out / "merged").is_symlink() or not merged_from(out / "merged", out):
                print0(f"warning: {out / 'merged'} holds a merge of another adapter than this run's (step {step}): "
                       "save_merged=True (or `lora-cli merge`) merges this one")
            else:
                shutil.rmtree(out / "merged")
                print0(f"removed {out / 'merged'}: a merge of an earlier adapter of this run, not this one (step "
                       f"{step}); save_merged=True (or `lora-cli merge`) merges this one")
        if config.push_to_hub and not stopped:
            hub.push_run(config, adapter_dir, merged_dir)
    barrier()
    summary = run_summary(metrics_path)
    return TrainResult(adapter_dir=adapter_dir, merged_dir=merged_dir, metrics_path=metrics_path, loss_plot=plot,
                       backend=backend.name, steps=trainer.state.global_step,
                       tokens_seen=int(trainer.state.num_input_tokens_seen), final_loss=summary["final_loss"],
                       wall_time_s=time.time() - start, peak_memory_bytes=peak_memory_bytes(), manifest=manifest,
                       train_loss=summary["train_loss"], eval_loss=summary["eval_loss"], finished=not stopped)


def _final_disk_full(out: Path, reason: str, adapter_written: bool = False) -> str:
    if adapter_written:
        return (f"disk full ({reason}) in {out} after the final adapter was written and sealed (it is complete); "
                "the run record, loss plot or model card may be missing: free space and run the same command again "
                "to write them")
    newest = checkpoint.newest_complete(checkpoint.checkpoints_dir(out))
    then = (f"it resumes from the complete {newest} and writes the adapter (or merge that checkpoint)" if newest
            else "no checkpoint was kept, so it trains again")
    return (f"disk full ({reason}) while writing the final adapter in {out}; the partial write was removed. Free "
            f"space and run the same command again: {then}")


def _callbacks(callbacks: Any) -> list | None:
    if callbacks is None:
        return None
    return list(callbacks) if isinstance(callbacks, list | tuple) else [callbacks]


def _versions() -> dict[str, str]:
    from lora_runtime.versions import installed

    packages = ("torch", "transformers", "peft", "accelerate", "lora-data", "lora-runtime", "unsloth")
    return {pkg: v for pkg, v in installed(packages).items() if v is not None}
