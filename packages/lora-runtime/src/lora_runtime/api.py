"""`lora_sft(model_path, data_path, ckpt_output_dir, **params) -> TrainResult`: the one-call entry point, and
`run(config)`, the front door it and `lora-cli train` both go through.

Parameter names and defaults are training-hub's `lora_sft` (see LoraSftConfig for one line of help each), plus
`backend`, `resume`, `save_merged`, `train_on_inputs`, `overlong`, `max_steps`, `gradient_checkpointing`, `optim`,
`adam_*` and `dataloader_num_workers`. One default differs on purpose: `micro_batch_size="auto"` is training-hub's 2
on a CPU and, on a GPU, sized from the free memory (lora_runtime.batching). As in training-hub, None for a
parameter means its default; unlike it, an unknown or silently-ignored parameter is an error.
"""

from __future__ import annotations

import functools
import sys
from typing import TYPE_CHECKING, Any

from lora_runtime.config import LoraSftConfig, check_known_keys
from lora_runtime.loop import TrainResult

if TYPE_CHECKING:
    from lora_runtime.distributed import DistEnv

__all__ = ["TrainResult", "lora_sft", "run"]


def _reject_unknown_kwargs(fn: Any) -> Any:
    """Name every unknown / training-hub-ignored keyword in one ConfigError (instead of Python's TypeError)."""

    @functools.wraps(fn)  # inspect.signature(lora_sft) still shows the full parameter list
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        check_known_keys(kwargs)
        return fn(*args, **kwargs)

    return wrapper


# None passed for a parameter means its default, as training-hub's lora_sft drops None values (a script forwarding
# argparse's unset options works unchanged), except where None is itself a value: the required paths (their error
# names them) and save_total_limit (keep every checkpoint)
_NONE_IS_A_VALUE = {"model_path", "data_path", "ckpt_output_dir", "save_total_limit"}


@_reject_unknown_kwargs
def lora_sft(
    model_path: str, data_path: str, ckpt_output_dir: str, backend: str = "auto", *,  # backend: 4th, as in training-hub
    lora_r: int = 16, lora_alpha: float = 32, lora_dropout: float = 0.0,
    target_modules: tuple[str, ...] | str | None = None, use_rslora: bool = False, use_dora: bool = False,
    init_lora_weights: bool | str = True, rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, float] | None = None, loftq_config: dict[str, Any] | None = None,
    num_epochs: int = 3, max_steps: int | None = None, effective_batch_size: int | None = None,
    micro_batch_size: int | str = "auto", gradient_accumulation_steps: int = 1, learning_rate: float = 2e-4,
    lr_scheduler: str = "linear", warmup_steps: int = 10, warmup_ratio: float | None = None,
    weight_decay: float = 0.01, max_grad_norm: float = 0.3,
    optim: str = "adamw_torch", adam_beta1: float = 0.9, adam_beta2: float = 0.999, adam_epsilon: float = 1e-8,
    seed: int = 3407,
    max_seq_len: int = 2048, sample_packing: bool = True, chat_template: str | None = None,
    eval_split_ratio: float | None = None, dataset_type: str = "chat_template",
    field_messages: str = "messages", field_instruction: str = "instruction", field_input: str = "input",
    field_output: str = "output", train_on_inputs: bool = False, overlong: str = "drop",
    data_output_dir: str | None = None, dataloader_num_workers: int = 0,
    bf16: bool = True, fp16: bool = False, tf32: bool | None = None, load_in_4bit: bool = False,
    load_in_8bit: bool = False, bnb_4bit_quant_type: str | None = None, bnb_4bit_compute_dtype: str | None = None,
    bnb_4bit_use_double_quant: bool | None = None, flash_attention: bool | None = None, kernels: str = "auto",
    gradient_checkpointing: bool | str = "auto", selective_recompute: str = "auto",
    activation_offload: bool | str = "auto", cuda_graphs: bool | str = "auto", max_memory_gib: float | None = None,
    enable_model_splitting: bool = False, sharding: str = "auto",
    trust_remote_code: bool = False, finetune_vision_layers: bool = False, finetune_language_layers: bool = True,
    save_steps: int = 500, save_total_limit: int | None = 3, resume: bool = True,
    resume_from: str | None = None, save_model: bool = True,
    save_merged: bool = False, push_to_hub: str | None = None, eval_steps: int = 500, logging_steps: int = 1,
    wandb_project: str | None = None, wandb_entity: str | None = None, wandb_run_name: str | None = None,
    tensorboard_log_dir: str | None = None, mlflow_tracking_uri: str | None = None,
    mlflow_experiment_name: str | None = None, mlflow_run_name: str | None = None,
    nproc_per_node: int | str | None = None, nnodes: int | None = None, node_rank: int | None = None,
    rdzv_id: str | None = None, rdzv_endpoint: str | None = None, master_addr: str | None = None,
    master_port: int | None = None,
    eval_data_path: str | None = None, per_device_eval_batch_size: int | None = None, callbacks: Any = None,
) -> TrainResult:
    """LoRA SFT of `model_path` on `data_path` (raw JSONL or a prepared shard dir), outputs in `ckpt_output_dir`.

    Config → shards → backend → train. Raises ConfigError (every config problem at once), TokenizerMismatchError
    (shards prepared with another tokenizer), CheckpointError (resume=False on a directory with checkpoints).
    """
    given = locals()  # first line: exactly the parameters here
    return run(LoraSftConfig(**{k: v for k, v in given.items() if v is not None or k in _NONE_IS_A_VALUE}))


def run(config: LoraSftConfig) -> TrainResult:
    """Train as `config` says: validate → data (prepared and cached when raw) → backend → batch plan → train.

    Raises ConfigError (every config problem at once), TokenizerMismatchError (shards prepared with another
    tokenizer), CheckpointError (resume=False on a directory with checkpoints), OutOfMemoryHint (out of GPU memory
    in a training step, after planning again for less where the run chose its plan: `batching.replan_after_oom`;
    under torchrun, only where a launcher starts every worker again, `batching.RELAUNCH_ENV`, and asks it to).
    """
    from lora_runtime import batching
    from lora_runtime.distributed import check_launch, dist_env, under_torchrun

    # the batch arithmetic checked against the processes torchrun started (a script of the user's run under torchrun
    # need not say nproc_per_node)
    env = check_launch(config.validate(world_size=dist_env().world_size if under_torchrun() else None))
    try:
        return _run_locked(config, env)
    finally:  # max_memory_gib's cap is this run's: the process's later GPU work is not held to it
        batching.cap_process(config, None)


def _run_locked(config: LoraSftConfig, env: DistEnv) -> TrainResult:
    """`run` past validation: the output dir locked, trained, planned again for less after an out-of-memory error."""
    from lora_runtime import batching
    from lora_runtime.checkpoint import output_lock
    from lora_runtime.distributed import print0
    from lora_runtime.errors import OutOfMemoryHint
    from lora_runtime.loop import release_memory

    # one run per output dir (a second one fails here, naming the first), and never one over a user's files
    with output_lock(config.ckpt_output_dir, config.model_path):
        # (plan, what the error said) of each attempt out of memory in step 1, and the budget the next plans under:
        # this process's own, or, in a worker a launcher started again (one node under torchrun), the earlier ones'
        given = batching.relaunched()  # None without a launcher that starts the workers again
        limit, failed = given or (None, [])
        inherited, before = len(failed), _device_memory_allocated()
        while True:
            try:
                with batching.lowered_budget(limit):
                    return _plan_and_train(config, failed, replanned_here=len(failed) > inherited)
            except OutOfMemoryHint as e:
                relaunch = env.world_size > 1 and given is not None
                limit = batching.replan_after_oom(config, e.step, e.plan, env.world_size, len(failed), relaunch)
                if limit is None:
                    if failed:
                        e.args = (f"{e} (after planning again for less memory {len(failed)} time(s))",)
                    raise
                from lora_runtime.trainer import oom_cause  # loaded by training already (not before Unsloth)

                failed.append((e.plan, oom_cause(e.__cause__)))
                if relaunch:  # every rank must plan again together: the launcher starts them all again
                    try:
                        batching.request_relaunch(config.ckpt_output_dir, env.rank, limit, failed)
                        asked = (f"Asked the launcher to start every worker again, planned for {limit[0] / 1024**3:.1f}"
                                 f" GiB (re-plan {len(failed)} of at most {batching.MAX_REPLANS})")
                    except OSError as unwritten:
                        asked = f"Not planned again: the request to the launcher could not be written ({unwritten})"
                    e.args = (f"{e} {asked}",)
                    raise
                message, model = str(e), e.model
            release_memory()  # here, not in the handler: the error's frames hold the failed step's tensors
            plan, cause = failed[-1]
            held = _device_memory_allocated() - before
            if (model is not None and model() is not None) or held > max(0.5 * (plan.estimated_fixed_bytes or 0),
                                                                         REPLAN_HELD_BYTES):
                again = f" after planning again for less memory {len(failed) - 1} time(s)" if len(failed) > 1 else ""
                raise OutOfMemoryHint(f"{message} Not planned again for less{again}: the model of the attempt that ran "
                                      f"out is still referenced, {held / 1024**3:.1f} GiB of GPU memory still taken (a "
                                      "callback that keeps it, or a part of it?)", None, plan)
            print0(batching.replan_note(plan.micro, cause, limit, len(failed), "planning again for"))


# Once a failed attempt is released, GPU memory still allocated beyond this (or half its plan's fixed bytes, the
# weights mostly, where more) means something keeps its model: the run is not planned again
REPLAN_HELD_BYTES = 256 * 1024**2


def _device_memory_allocated() -> int:
    """Bytes torch has allocated over every GPU of this process; 0 before CUDA starts or without it."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return 0
    return sum(torch.cuda.memory_allocated(d) for d in range(torch.cuda.device_count()))


def _plan_and_train(config: LoraSftConfig, failed: list[tuple[Any, str]], replanned_here: bool = False) -> TrainResult:
    """One attempt of `run`, inside its output lock: levers → data → backend → batch plan → train. After an
    out-of-memory error in step 1 (`failed`: the plans that ran out, and why), a plan that is not smaller stops here;
    after one in this process (`replanned_here`), backend="auto" does not move to Unsloth, which cannot patch the
    transformers this process has loaded."""
    from lora_runtime.backends import import_unsloth_first, select_backend
    from lora_runtime.batching import resolve
    from lora_runtime.compiled import choose_levers, prefers
    from lora_runtime.data import ensure_shards, open_datasets
    from lora_runtime.distributed import dist_env, print0
    from lora_runtime.errors import OutOfMemoryHint
    from lora_runtime.kernels import embedding_targets
    from lora_runtime.loop import train
    from lora_runtime.preflight import position_note
    from lora_runtime.sharding import resolve_sharding

    config, levers = choose_levers(config)  # selective_recompute/activation_offload "auto" made concrete
    fast = (True, levers) if levers else prefers(config)
    import_unsloth_first(config, compiled=fast[0])
    config, shards = ensure_shards(config)
    config = resolve_sharding(config)
    backend, reason = select_backend(config.backend, splitting=config.enable_model_splitting,
                                     sharding=config.sharding, compiled=fast,
                                     offload=config.activation_offload is True,
                                     embeddings=embedding_targets(config.target_modules))
    if replanned_here and config.backend == "auto" and backend.name == "unsloth" and "unsloth" not in sys.modules:
        backend, _ = select_backend("peft")
        reason = ("auto: planned again after an out-of-memory error, in a process that has loaded transformers, "
                  "which Unsloth imported now could not patch: transformers+PEFT" + (f"; {fast[1]}" if fast[1] else ""))
    plan = resolve(config, backend, rows=shards.manifest.rows)
    if failed and (plan.estimated_peak_bytes or 0) >= failed[-1][0].estimated_peak_bytes:
        last, cause = failed[-1]
        quant = "" if config.load_in_4bit else ", load_in_4bit=True (QLoRA)"
        raise OutOfMemoryHint(f"out of memory in training step 1 with micro_batch_size {last.micro} ({cause}), and "
                              f"no smaller plan is left: lower max_seq_len (now {config.max_seq_len}){quant}, or free "
                              "the GPU memory other processes hold", None, last)  # step None: not planned again
    train_data, eval_data = open_datasets(config, shards, plan)
    if not failed and dist_env().is_main and (note := position_note(config, train_data.reader.sample_lengths())):
        print0(f"warning: {note}")  # read on the rank that prints it
    return train(config, plan, backend, train_data, eval_data, manifest=shards.manifest, backend_reason=reason)
