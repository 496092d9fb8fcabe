"""`LoraSftConfig`: every `lora_sft` argument as one frozen, self-documenting dataclass.

Names and effective defaults follow training-hub's `lora_sft` (shared/reference/training_hub_lora_sft.md, table 0.1),
including the kwargs its backend reads (weight_decay 0.01, max_grad_norm 0.3, seed 3407, ...). Unlike training-hub,
nothing is silently ignored: `validate()` reports every problem at once, and `from_dict()` rejects unknown keys.

Each field carries `metadata={"help": one line, "choices": [...]}`; lora-cli builds its options from it. Fields with
`metadata["cli"] is False` (only `callbacks`) have no command-line form.
"""

# ruff: noqa: RUF009  (`_f` is a thin wrapper over dataclasses.field; ruff cannot see that)
from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# training-hub parameters whose LoRA path accepts and then ignores them: say what to use instead.
IGNORED_BY_TRAINING_HUB = {
    "max_tokens_per_gpu": "rows are pre-packed to max_seq_len; size a step with micro_batch_size / effective_batch_size",
    "save_samples": "checkpoints are taken by optimizer step; use save_steps",
    "accelerate_full_state_at_epoch": "every checkpoint already holds optimizer, scheduler and data state; use save_steps",
    "checkpoint_at_epoch": "checkpoints are taken by optimizer step; use save_steps (steps per epoch are logged at start)",
}

_NAMES = re.compile(r"\w+(\s*,\s*\w+)*")  # "q_proj" or "q_proj, v_proj": module names, not a regex
PATH_FIELDS = ("model_path", "data_path", "ckpt_output_dir", "data_output_dir", "eval_data_path", "tensorboard_log_dir",
               "resume_from")
USER_PATH_FIELDS = (*PATH_FIELDS, "chat_template")  # where ~ is expanded (a template may be a file)
LR_SCHEDULERS = ["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay"]
# selective_recompute's levels, lightest first: what the compiled path's decoder layers recompute in their backward
RECOMPUTE_LEVELS = ("pointwise", "most")
OPTIMIZERS = ["adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "adafactor",
              "sgd"]


class ConfigError(ValueError):
    """All problems of one config, reported together; `.issues` holds one string per problem."""

    def __init__(self, issues: list[str]):
        self.issues = list(issues)
        super().__init__(f"{len(issues)} problem(s) in the lora_sft config:\n" + "\n".join(f"  - {i}" for i in issues))


def _f(default: Any = dataclasses.MISSING, help: str = "", choices: list | None = None, *, compare: bool = True,
       **meta: Any) -> Any:
    md = {"help": help, **meta}
    if choices is not None:
        md["choices"] = choices
    return dataclasses.field(default=default, compare=compare, metadata=md)


@dataclass(frozen=True)
class LoraSftConfig:
    # --- required (positional in lora_sft) ---
    model_path: str = _f(help="HF model id or local directory of the base model")
    data_path: str = _f(help="raw JSONL file (prepared and cached on the fly) or a prepared shard dir (has manifest.json)")
    ckpt_output_dir: str = _f(help="output dir: adapter, tokenizer, config, metrics.jsonl, loss.png, checkpoints/")
    # --- backend and LoRA ---
    backend: str = _f("auto", "training backend; auto = unsloth when CUDA is available and unsloth imports, else peft",
                      ["auto", "unsloth", "peft"])
    lora_r: int = _f(16, "LoRA rank")
    lora_alpha: float = _f(32, "LoRA scaling alpha (scale = alpha / r, or alpha / sqrt(r) with use_rslora)")
    lora_dropout: float = _f(0.0, "dropout on the LoRA input; 0.0 is Unsloth's fast path")
    target_modules: tuple[str, ...] | str | None = _f(
        None, "modules to adapt; None = all attention+MLP projections; 'all-linear' = every linear but the head")
    use_rslora: bool = _f(False, "rank-stabilised LoRA scaling alpha / sqrt(r)")
    use_dora: bool = _f(False, "weight-decomposed LoRA (DoRA)")
    init_lora_weights: bool | str = _f(True, "LoRA init: True (zeros B), False, or a PEFT name",
                                       [True, False, "gaussian", "pissa", "olora", "loftq"])
    rank_pattern: dict[str, int] | None = _f(None, "per-module rank overrides, e.g. {'q_proj': 8}")
    alpha_pattern: dict[str, float] | None = _f(None, "per-module alpha overrides")
    loftq_config: dict[str, Any] | None = _f(None, "LoftQ settings (with init_lora_weights='loftq'), e.g. {'loftq_bits': 4}")
    # --- schedule and batch ---
    num_epochs: int = _f(3, "passes over the packed rows (max_steps, if set, wins)")
    max_steps: int | None = _f(None, "stop after this many optimizer steps (overrides num_epochs)")
    effective_batch_size: int | None = _f(
        None, "rows per optimizer step over all GPUs; sets accumulation = effective / (micro x world), must divide")
    micro_batch_size: int | str = _f(
        "auto", "packed rows per GPU per forward pass; auto = 2 on a CPU (training-hub's default), on a GPU the "
        "fastest plan that fits the memory budget (max_memory_gib, else the free memory), up to 16k tokens a pass "
        "(32k where layers recompute and on the compiled path), keeping 16 optimizer steps an epoch (logged)")
    gradient_accumulation_steps: int = _f(1, "micro-batches per optimizer step (derived when effective_batch_size is set)")
    learning_rate: float = _f(2e-4, "peak learning rate")
    lr_scheduler: str = _f("linear", "learning-rate schedule after warmup (cosine_with_min_lr ends at 10% of "
                           "learning_rate; warmup_stable_decay decays over the last 10% of the steps)", LR_SCHEDULERS)
    warmup_steps: int = _f(10, "linear warmup in optimizer steps")
    warmup_ratio: float | None = _f(None, "linear warmup as a fraction of all optimizer steps (wins over warmup_steps)")
    weight_decay: float = _f(0.01, "AdamW weight decay on the LoRA parameters")
    max_grad_norm: float = _f(0.3, "gradient clipping norm (0 disables)")
    optim: str = _f("adamw_torch", "optimizer (transformers name)", OPTIMIZERS)
    adam_beta1: float = _f(0.9, "Adam beta1")
    adam_beta2: float = _f(0.999, "Adam beta2")
    adam_epsilon: float = _f(1e-8, "Adam epsilon")
    seed: int = _f(3407, "seed for LoRA init, data order and dropout")
    # --- data ---
    max_seq_len: int = _f(2048, "packed row length in tokens; longer samples follow `overlong`")
    sample_packing: bool = _f(True, "pack several samples per row (best-fit decreasing); False = one sample per row")
    chat_template: str | None = _f(
        None, "chat template to render the data with instead of the tokenizer's: a Jinja file, 'chatml', or the "
        "name of one of the tokenizer's own templates; saved with the adapter's tokenizer")
    eval_split_ratio: float | None = _f(
        None, "hold out this fraction of the training data's records (seeded) as eval data (instead of eval_data_path)")
    dataset_type: str = _f("chat_template", "record format of raw JSONL (under the default, a file of Alpaca records "
                           "only trains as alpaca, logged)", ["chat_template", "alpaca", "passthrough"])
    field_messages: str = _f("messages", "JSONL field holding the chat messages")
    field_instruction: str = _f("instruction", "alpaca: instruction field")
    field_input: str = _f("input", "alpaca: optional input field")
    field_output: str = _f("output", "alpaca: output field")
    train_on_inputs: bool = _f(False, "also train on prompts/system turns (training-hub behaviour); default: answers only")
    overlong: str = _f("drop", "sample longer than max_seq_len: drop (to rejects.jsonl), truncate, or split",
                       ["drop", "truncate", "split"])
    data_output_dir: str | None = _f(None, "cache dir for prepared shards (default $LORA_DATA_CACHE or ~/.cache/lora-sft/data)")
    dataloader_num_workers: int = _f(0, "dataloader worker processes per rank")
    # --- precision, memory, model loading ---
    bf16: bool = _f(True, "bfloat16 autocast (falls back to fp32, logged, where unsupported)")
    fp16: bool = _f(False, "float16 autocast with loss scaling (CUDA only)")
    tf32: bool | None = _f(None, "allow TF32 matmuls on Ampere+ GPUs; None leaves torch's default")
    load_in_4bit: bool = _f(False, "QLoRA: load the base model in 4-bit (bitsandbytes, CUDA)")
    load_in_8bit: bool = _f(False, "load the base model in 8-bit (bitsandbytes, CUDA)")
    bnb_4bit_quant_type: str | None = _f(None, "4-bit quant type (default nf4)", [None, "nf4", "fp4"])
    bnb_4bit_compute_dtype: str | None = _f(None, "4-bit compute dtype (default bfloat16)",
                                            [None, "bfloat16", "float16", "float32"])
    bnb_4bit_use_double_quant: bool | None = _f(None, "nested quantization of the 4-bit constants (default True)")
    flash_attention: bool | None = _f(
        None, "True: require FlashAttention varlen; False: SDPA with block-diagonal masks; None: best available")
    kernels: str = _f(
        "auto", "the peft backend's fast paths: compile (decoder layers compiled, packed flash attention, chunked loss; "
        "backend auto then runs peft), liger (liger-kernel's RoPE, RMSNorm, SwiGLU and fused linear + cross-entropy), "
        "none, or auto = compile where the memory budget fits a large pass without recomputation, else Unsloth "
        "(its own kernels), liger on the peft backend where installed",
        ["auto", "compile", "liger", "none"])
    gradient_checkpointing: bool | str = _f(
        "auto", "recompute activations; auto = on a GPU, as many layers as the memory budget needs where the "
        "backend plans by memory (Unsloth, the compiled path, liger, activation offload), else every layer; off on a "
        "CPU",
        ["auto", True, False])
    selective_recompute: str = _f(
        "auto", "the compiled path's decoder layers recompute part of their forward inside their own backward "
        "instead of keeping its outputs, with no checkpointing: pointwise = their pointwise work (RMSNorm, SwiGLU's "
        "product), a third less activation memory a layer, no matmul recomputed; most = everything but attention "
        "(projections included), keeping the layer's input, attention's output and the MLP's input, about an eighth "
        "of a layer; the memory plan counts either; runs the compiled path (CUDA, backend peft or auto, kernels "
        "compile or auto, lora_dropout 0); auto = where backend auto would otherwise leave the compiled path for "
        "lack of memory, the first with which a large pass fits: pointwise, with a few offloaded layers, most (with "
        "offload for the plan to weigh, see activation_offload), else off",
        ["auto", "off", *RECOMPUTE_LEVELS])
    activation_offload: bool | str = _f(
        "auto", "the peft backend may keep decoder layers' saved activations in pinned host memory between forward "
        "and backward, copied on a side stream while the GPU computes, instead of recomputing them; the memory plan "
        "chooses how many layers from the budget, the host link's measured bandwidth and the free host memory "
        "(CUDA; backend auto then runs peft); True with selective_recompute auto also tries pointwise with every layer "
        "offloaded where most does not fit; auto = on with pointwise where that alone does not fit a large pass and a "
        "few offloaded layers do, always with most (the plan weighs a larger pass with layers offloaded against a "
        "smaller one without, and may offload none), else off",
        ["auto", True, False])
    cuda_graphs: bool | str = _f(
        "auto", "the compiled path's decoder layers replay CUDA graphs (torch.compile mode reduce-overhead; sample "
        "boundaries padded to a fixed count): one launch a layer instead of one a kernel, for passes the host cannot "
        "keep up with; True asks for the compiled path, in one process with no layer checkpointed or offloaded (pass "
        "gradient_checkpointing=False; a selective_recompute level replays too); auto = on for a pass of at most "
        "8,192 tokens and 8,192 × 1.6B tokens × base parameters, without those, a selective_recompute level "
        "(measured slower with graphs), dropout or evaluation (the host sets the pace there), else off",
        ["auto", True, False])
    max_memory_gib: float | None = _f(
        None, "GPU memory budget per process in GiB; the batch plan fits it and the process is capped to it (each "
        "GPU the model spans, with model splitting) until the run ends; one below the model's weights is refused "
        "(default: the free memory)")
    enable_model_splitting: bool = _f(False, "split one model across the visible GPUs (device_map='balanced')")
    sharding: str = _f("auto", "ddp: a full replica per GPU; fsdp: FSDP2 shards of weights, LoRA and optimizer state "
                       "per decoder layer; auto = fsdp when the bf16 base does not fit one GPU",
                       ["auto", "ddp", "fsdp"])
    trust_remote_code: bool = _f(False, "allow model code from the hub repo")
    finetune_vision_layers: bool = _f(False, "VLM only (not supported yet: must stay False)")
    finetune_language_layers: bool = _f(True, "VLM only: adapt the language layers (must stay True)")
    # --- checkpoints, outputs, logging ---
    save_steps: int = _f(500, "checkpoint every N optimizer steps")
    save_total_limit: int | None = _f(3, "keep the newest N complete checkpoints (None keeps all)")
    resume: bool = _f(True, "resume from the newest complete checkpoint; False refuses a dir that has checkpoints")
    resume_from: str | None = _f(None, "resume from this checkpoint directory (a checkpoints/checkpoint-<step> dir)")
    save_model: bool = _f(True, "write the final adapter + tokenizer to ckpt_output_dir")
    save_merged: bool = _f(False, "also write the merged full model (safetensors) to <ckpt_output_dir>/merged")
    push_to_hub: str | None = _f(None, "after training, upload the adapter to this Hugging Face repo (ORG/NAME) and the "
                                 "merged model (save_merged) to ORG/NAME-merged; token from HF_TOKEN", compare=False)
    eval_steps: int = _f(500, "evaluate every N steps (with eval_data_path)")
    logging_steps: int = _f(1, "log metrics every N optimizer steps")
    wandb_project: str | None = _f(None, "Weights & Biases project (or env WANDB_PROJECT)")
    wandb_entity: str | None = _f(None, "Weights & Biases entity")
    wandb_run_name: str | None = _f(None, "Weights & Biases run name")
    tensorboard_log_dir: str | None = _f(None, "TensorBoard log dir (enables TensorBoard)")
    mlflow_tracking_uri: str | None = _f(None, "MLflow tracking URI (or env MLFLOW_TRACKING_URI)")
    mlflow_experiment_name: str | None = _f(None, "MLflow experiment name")
    mlflow_run_name: str | None = _f(None, "MLflow run name")
    # --- distributed (made real by lora-cli's launcher; under torchrun the env wins) ---
    nproc_per_node: int | str | None = _f(
        None, "processes (GPUs) per node, or 'auto' for every visible GPU (one process without a GPU; under torchrun, "
        "the processes it started on this node); lora-cli launches torchrun when > 1")
    nnodes: int | None = _f(None, "number of nodes")
    node_rank: int | None = _f(None, "rank of this node, 0..nnodes-1")
    rdzv_id: str | None = _f(None, "torchrun rendezvous id")
    rdzv_endpoint: str | None = _f(None, "torchrun rendezvous host:port (multi-node)")
    master_addr: str | None = _f(None, "master address (multi-node, static rendezvous)")
    master_port: int | None = _f(None, "master port")
    # --- keyword-only in lora_sft ---
    eval_data_path: str | None = _f(None, "eval JSONL or shard dir; enables eval every eval_steps")
    per_device_eval_batch_size: int | None = _f(None, "eval rows per GPU (default: micro_batch_size)")
    callbacks: Any = _f(None, "transformers TrainerCallback(s); not serialized (one with on_log keeps logs read at "
                        "once on a GPU unless its class sets late_log_ok = True)", cli=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, list):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if self.target_modules == ("all-linear",):  # [all-linear] in a config file: PEFT's keyword, not a name
            object.__setattr__(self, "target_modules", "all-linear")
        if isinstance(self.target_modules, str) and _NAMES.fullmatch(self.target_modules):
            # names, as on the command line (PEFT reads any other str, "all-linear" aside, as a regex)
            object.__setattr__(self, "target_modules", tuple(n.strip() for n in self.target_modules.split(",")))
        for name in USER_PATH_FIELDS:  # accept pathlib.Path and ~, store str (JSON-ready)
            value = getattr(self, name)
            if isinstance(value, os.PathLike) or (isinstance(value, str) and value.startswith("~")):
                # transformers expands ~ in output_dir, nothing else does: checkpoints and outputs would part
                object.__setattr__(self, name, os.path.expanduser(os.fspath(value)))
        for f in dataclasses.fields(self):  # what training-hub's looser types let scripts pass: 3.0 epochs, "4"
            value = getattr(self, f.name)
            if isinstance(value, float) and value.is_integer() and str(f.type).split(" | ")[0] == "int":
                object.__setattr__(self, f.name, int(value))
        if isinstance(self.rdzv_id, int) and not isinstance(self.rdzv_id, bool):
            object.__setattr__(self, "rdzv_id", str(self.rdzv_id))
        if isinstance(self.nproc_per_node, str) and self.nproc_per_node.strip().isdigit():
            object.__setattr__(self, "nproc_per_node", int(self.nproc_per_node))
        if self.nproc_per_node == "auto":  # a number from here on (world_size, batch arithmetic, the saved config)
            from lora_runtime.distributed import auto_nproc_per_node

            object.__setattr__(self, "nproc_per_node", auto_nproc_per_node()[0])

    # ------------------------------------------------------------------ launch size
    def world_size(self) -> int:
        """The processes this config asks for before launch (nproc_per_node x nnodes); a running job's world size is
        `lora_runtime.distributed.dist_env().world_size`, and its batch arithmetic `lora_runtime.batching.BatchPlan`."""
        per_node = self.nproc_per_node if isinstance(self.nproc_per_node, int) else 1  # a str fails validate()
        return (per_node or 1) * (self.nnodes or 1)

    # ------------------------------------------------------------------ validation
    def validate(self, world_size: int | None = None) -> LoraSftConfig:
        """Check everything, raise one `ConfigError` listing every problem, else return self."""
        issues = _type_issues(self)
        if issues:  # range checks on wrongly typed values would only add noise
            raise ConfigError(issues)
        positive = ["lora_r", "lora_alpha", "num_epochs", "gradient_accumulation_steps",
                    "learning_rate", "max_seq_len", "save_steps", "eval_steps", "logging_steps"]
        # written `not x > 0`, so NaN (which compares False with everything) is refused too
        issues += [f"`{n}` must be > 0, got {getattr(self, n)}" for n in positive if not getattr(self, n) > 0]
        if self.micro_batch_size != "auto" and (isinstance(self.micro_batch_size, str) or self.micro_batch_size <= 0):
            issues.append(f"`micro_batch_size` must be > 0 or 'auto', got {self.micro_batch_size!r}")
        per_node = self.nproc_per_node  # "auto" became a number on construction
        if per_node is not None and (isinstance(per_node, str) or per_node <= 0):
            issues.append(f"`nproc_per_node` must be > 0, 'auto' or None, got {per_node!r}")
        for name in ["max_steps", "effective_batch_size", "save_total_limit", "per_device_eval_batch_size",
                     "nnodes", "max_memory_gib"]:
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                issues.append(f"`{name}` must be > 0 (or None), got {getattr(self, name)}")
        for name in ["warmup_steps", "weight_decay", "max_grad_norm", "dataloader_num_workers"]:
            if not getattr(self, name) >= 0:
                issues.append(f"`{name}` must be >= 0, got {getattr(self, name)}")
        for f in dataclasses.fields(self):
            if f.type != "Any" and isinstance(getattr(self, f.name), tuple | dict):  # not callbacks
                issues += _item_issues(f.name, getattr(self, f.name), str(f.type))
        if not 0.0 <= self.lora_dropout < 1.0:
            issues.append(f"`lora_dropout` must be in [0, 1), got {self.lora_dropout}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                issues.append(f"`{name}` must be in [0, 1), got {getattr(self, name)}")
        if not self.adam_epsilon >= 0:
            issues.append(f"`adam_epsilon` must be >= 0, got {self.adam_epsilon}")
        if not 0 <= self.seed < 2 ** 32:
            issues.append(f"`seed` must be in [0, 2**32), got {self.seed}")
        issues += _choice_issues(self) + _combination_issues(self) + _batch_issues(self, world_size)
        issues += _option_issues(self) + _machine_issues(self) + _model_issues(self)
        if issues:
            raise ConfigError(issues)
        return self

    # ------------------------------------------------------------------ (de)serialization
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field except `callbacks` (live objects)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "callbacks"}
        if isinstance(out["target_modules"], tuple):
            out["target_modules"] = list(out["target_modules"])
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoraSftConfig:
        """Build from a dict (YAML/JSON/kwargs). Unknown keys are an error that names each one."""
        check_known_keys(data)
        return cls(**data)


_SECRET_KEY = re.compile(r"(token|key|secret|password|passwd|credentials?)$", re.IGNORECASE)
_URL_USERINFO = re.compile(r"(?<=://)([^/@:\s]+)(?::([^/@\s]+))?@")
_URL_QUERY_VALUE = re.compile(r"(?<=[?&])([^=&#\s]+)=([^&#\s]*)")


def redacted(value: Any) -> Any:
    """A copy safe to log or save: secrets in URLs (the password in user info, a user-info-only token, every query
    value) and values under *_token/*_key/*secret/*password keys → "***".

    >>> redacted({"mlflow_tracking_uri": "https://me:hunter2@mlflow.example", "hf_token": "hf_abc", "lora_r": 16})
    {'mlflow_tracking_uri': 'https://me:***@mlflow.example', 'hf_token': '***', 'lora_r': 16}
    >>> redacted(["https://ghp_abc@host/x", "https://host/x?token=abc&v=1"])
    ['https://***@host/x', 'https://host/x?token=***&v=***']
    """
    if isinstance(value, dict):
        return {k: "***" if isinstance(k, str) and v and _SECRET_KEY.search(k) else redacted(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(redacted(v) for v in value)
    if isinstance(value, str) and "://" in value:
        value = _URL_USERINFO.sub(lambda m: f"{m[1]}:***@" if m[2] else "***@", value)
        return _URL_QUERY_VALUE.sub(r"\1=***", value) if "?" in value else value
    return value


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(LoraSftConfig)]


def field_defaults() -> dict[str, Any]:
    """Each `LoraSftConfig` field's default (none of them a list or tuple)."""
    return {f.name: f.default for f in dataclasses.fields(LoraSftConfig)}


def check_known_keys(keys: Any) -> None:
    """Raise `ConfigError` naming every key that is not a `LoraSftConfig` field (with a hint where we know one)."""
    known = set(field_names())
    issues = []
    for key in keys:
        if key in known:
            continue
        if key in IGNORED_BY_TRAINING_HUB:
            issues.append(f"`{key}` is accepted but ignored by training-hub's LoRA path, so it is refused here: "
                          f"{IGNORED_BY_TRAINING_HUB[key]}")
        else:
            import difflib

            close = difflib.get_close_matches(key, known, n=1)
            issues.append(f"unknown parameter `{key}`" + (f"; did you mean `{close[0]}`?" if close else ""))
    if issues:
        raise ConfigError(issues)


def _type_issues(cfg: LoraSftConfig) -> list[str]:
    """Check each value against its annotation's basic types (bool is not accepted as int/float)."""
    issues = []
    simple: dict[str, type | tuple[type, ...]] = {"int": int, "float": (int, float), "bool": bool, "str": str, "None": type(None),
              "tuple[str, ...]": tuple, "dict[str, int]": dict, "dict[str, float]": dict, "dict[str, Any]": dict}
    for f in dataclasses.fields(cfg):
        if f.type == "Any":
            continue
        value = getattr(cfg, f.name)
        allowed = [simple[t.strip()] for t in str(f.type).split(" | ")]
        ok = any(isinstance(value, a) for a in allowed)
        if isinstance(value, bool) and bool not in allowed:
            ok = False
        if value is dataclasses.MISSING or not ok:
            issues.append(f"`{f.name}` must be {f.type}, got {value!r} ({type(value).__name__})")
    return issues


def _item_issues(name: str, value: tuple | dict, annotation: str) -> list[str]:
    """The items of a tuple[str, ...] / dict[str, int | float] field (PEFT fails on them after the model loaded).

    >>> _item_issues("rank_pattern", {"q_proj": "4", "v_proj": 0}, "dict[str, int] | None")
    ["`rank_pattern`['q_proj'] must be a number > 0, got '4' (str)", "`rank_pattern`['v_proj'] must be a number > 0, got 0 (int)"]
    """
    if isinstance(value, tuple):
        bad = [v for v in value if not isinstance(v, str) or not v]
        return [f"`{name}` must list module names, got {v!r} ({type(v).__name__})" for v in bad] + (
            [f"`{name}` is empty: pass None for the default projections"] if not value else [])
    if "dict[str, Any]" in annotation:
        return [f"`{name}` keys must be str, got {k!r}" for k in value if not isinstance(k, str)]
    options = set(field_names())  # TOML puts every key after a [table] into that table
    if strays := sorted(k for k in value if isinstance(k, str) and k.replace("-", "_") in options):
        return [f"`{name}` holds {', '.join(strays)}, which are options, not module names: in a TOML file, keys "
                f"written after a [{name}] table go into it; write the table last"]
    number = int if "dict[str, int]" in annotation else (int, float)
    return [f"`{name}`[{k!r}] must be a number > 0, got {v!r} ({type(v).__name__})" for k, v in value.items()
            if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, number) or not v > 0]


# PEFT inits that rewrite the base weights they start from (PEFT redoes it at every load; vLLM does not)
BASE_REWRITING_INITS = ("pissa", "olora", "loftq", "corda")
# PEFT inits that start from a pass over the data, which lora_sft does not run: PEFT would train them as True
DATA_DRIVEN_INITS = {"eva": "initialize_lora_eva_weights", "corda": "preprocess_corda"}


def _choice_issues(cfg: LoraSftConfig) -> list[str]:
    issues = []
    for f in dataclasses.fields(cfg):
        choices, value = f.metadata.get("choices"), getattr(cfg, f.name)
        if choices and not any(value is c or (type(value) is type(c) and value == c) for c in choices):
            issues.append(f"`{f.name}` must be one of {choices}, got {value!r}")
            if f.name == "init_lora_weights" and isinstance(value, str) and value in DATA_DRIVEN_INITS:
                issues[-1] += (f" ({value} starts from PEFT's {DATA_DRIVEN_INITS[value]} over the data, a pass "
                               "lora_sft does not run; without it the adapter would train as init_lora_weights=True)")
    return issues


def _offload_issues(cfg: LoraSftConfig) -> list[str]:
    why = ""
    if cfg.backend == "unsloth":
        why = "backend='unsloth' offloads its own checkpointed layers' inputs; pass backend='peft' or 'auto'"
    elif cfg.sharding == "fsdp" or cfg.enable_model_splitting:
        why = "sharded and split models run without it; drop one of the two"
    elif cfg.gradient_checkpointing is True:
        why = ("gradient_checkpointing=True recomputes every layer, leaving nothing to offload; pass "
               "gradient_checkpointing='auto' (or False) to let the plan offload layers instead")
    return [f"activation_offload=True: {why}"] if why else []


def _graph_issues(cfg: LoraSftConfig) -> list[str]:
    """What cuda_graphs=True cannot combine with: a graph replays one fixed forward of the compiled layers."""
    clash = [(cfg.backend == "unsloth", "backend='unsloth' (graphs are the compiled peft path's)"),
             (cfg.kernels in ("liger", "none"), f"kernels={cfg.kernels!r} (graphs replay compiled layers)"),
             (cfg.activation_offload is True, "activation_offload=True"),
             (cfg.gradient_checkpointing is not False,
              f"gradient_checkpointing={cfg.gradient_checkpointing!r} (pass False: the plan may not recompute)"),
             (cfg.world_size() > 1, f"{cfg.world_size()} processes (DDP's gradient buckets are not replayed)"),
             (cfg.sharding == "fsdp" or cfg.enable_model_splitting, "sharding='fsdp' or model splitting")]
    return [f"cuda_graphs=True cannot run with {what}: pass cuda_graphs='auto' or drop the other option"
            for bad, what in clash if bad]


def _combination_issues(cfg: LoraSftConfig) -> list[str]:
    issues = []
    if cfg.load_in_4bit and cfg.load_in_8bit:
        issues.append("`load_in_4bit` and `load_in_8bit` are exclusive; set one of them to False")
    if cfg.bf16 and cfg.fp16:
        issues.append("`bf16` and `fp16` are exclusive; pass bf16=False to use fp16")
    bnb = [n for n in ("bnb_4bit_quant_type", "bnb_4bit_compute_dtype", "bnb_4bit_use_double_quant")
           if getattr(cfg, n) is not None]
    if bnb and not cfg.load_in_4bit:
        issues.append(f"{', '.join(f'`{n}`' for n in bnb)} only apply with load_in_4bit=True")
    if cfg.lr_scheduler == "polynomial" and cfg.learning_rate <= 1e-7:
        issues.append(f"lr_scheduler='polynomial' decays to 1e-7 (transformers' lr_end): learning_rate="
                      f"{cfg.learning_rate:g} must be above it, or pick another lr_scheduler")
    if cfg.init_lora_weights == "loftq" and not cfg.loftq_config:
        issues.append("init_lora_weights='loftq' needs `loftq_config`, e.g. {'loftq_bits': 4}")
    if cfg.loftq_config and cfg.init_lora_weights != "loftq":
        issues.append(f"`loftq_config` applies with init_lora_weights='loftq' only (it is "
                      f"{cfg.init_lora_weights!r}): pass that too, or drop it")
    defaults = field_defaults()
    if not (cfg.eval_data_path or cfg.eval_split_ratio):
        unused = [n for n in ("eval_steps", "per_device_eval_batch_size") if getattr(cfg, n) != defaults[n]]
        if unused:
            issues.append(f"{' and '.join(f'`{n}`' for n in unused)} {'apply' if len(unused) > 1 else 'applies'} "
                          "with eval data only: pass `eval_data_path` or `eval_split_ratio` too, or drop "
                          f"{'them' if len(unused) > 1 else 'it'}")
    if cfg.init_lora_weights == "loftq" and importlib.util.find_spec("scipy") is None:
        issues.append("init_lora_weights='loftq' needs scipy (PEFT's LoftQ imports it), which is not installed: "
                      "pip install scipy")
    if cfg.init_lora_weights in BASE_REWRITING_INITS and cfg.sharding == "fsdp":
        issues.append(f"init_lora_weights={cfg.init_lora_weights!r} starts from the base weights, which sharded "
                      "ranks other than 0 do not load (they build the model empty and receive their shards): "
                      "use init_lora_weights=True, or sharding='ddp' where the model fits one GPU (sharding='auto' "
                      "picks fsdp where it does not)")
    if cfg.init_lora_weights == "pissa" and (cfg.load_in_4bit or cfg.load_in_8bit):
        issues.append("init_lora_weights='pissa' starts from the full-precision weights (PEFT refuses a quantized "
                      "base): pass load_in_4bit=False / load_in_8bit=False, or init_lora_weights='olora'")
    if cfg.finetune_vision_layers or not cfg.finetune_language_layers:
        issues.append("vision-language fine-tuning is not supported: keep finetune_vision_layers=False and "
                      "finetune_language_layers=True")
    if cfg.enable_model_splitting and cfg.world_size() > 1:
        issues.append("`enable_model_splitting` runs one process over all GPUs; it cannot be combined with "
                      f"nproc_per_node={cfg.nproc_per_node} / nnodes={cfg.nnodes}")
    if cfg.backend == "unsloth" and (embeddings := _embedding_targets(cfg.target_modules)):
        issues.append(f"backend='unsloth' trains {' and '.join(embeddings)} as whole matrices (Unsloth moves them from "
                      "target_modules to modules_to_save), not as the LoRA `target_modules` asks for: pass "
                      "backend='peft' or 'auto' for a LoRA there")
    if cfg.kernels in ("liger", "compile") and cfg.backend == "unsloth":
        issues.append(f"kernels={cfg.kernels!r} applies to the peft backend; backend='unsloth' runs Unsloth's own fused "
                      "kernels (pass backend='peft' or 'auto', or kernels='auto')")
    if cfg.selective_recompute in RECOMPUTE_LEVELS and (cfg.backend == "unsloth" or cfg.kernels in ("liger", "none")):
        issues.append(f"selective_recompute={cfg.selective_recompute!r} applies to the compiled path (kernels="
                      f"'compile' or 'auto', backend 'peft' or 'auto'), not to backend={cfg.backend!r} with "
                      f"kernels={cfg.kernels!r}; pass selective_recompute='off' (gradient_checkpointing recomputes "
                      "whole layers on every path)")
    if cfg.selective_recompute in RECOMPUTE_LEVELS and cfg.lora_dropout > 0:
        issues.append(f"selective_recompute={cfg.selective_recompute!r} with lora_dropout={cfg.lora_dropout}: the "
                      "recomputed work would draw a new dropout mask in backward (wrong gradients); pass "
                      "lora_dropout=0.0 or selective_recompute='off'")
    if cfg.activation_offload is True:
        issues += _offload_issues(cfg)
    if cfg.cuda_graphs is True:
        issues += _graph_issues(cfg)
    if cfg.sharding == "fsdp":
        issues += _fsdp_issues(cfg)
    if cfg.node_rank is not None and not 0 <= cfg.node_rank < (cfg.nnodes or 1):
        issues.append(f"`node_rank` must be in [0, nnodes={cfg.nnodes or 1}), got {cfg.node_rank}")
    if (cfg.nnodes or 1) > 1 and not (cfg.rdzv_endpoint or cfg.master_addr):
        issues.append(f"nnodes={cfg.nnodes} needs `rdzv_endpoint` (host:port) or `master_addr` to meet the other nodes")
    if cfg.master_port is not None and not 0 < cfg.master_port < 65536:
        issues.append(f"`master_port` must be in 1..65535, got {cfg.master_port}")
    return issues


def _fsdp_issues(cfg: LoraSftConfig) -> list[str]:
    """What sharding="fsdp" cannot combine with, each with the way out."""
    issues = []
    if cfg.enable_model_splitting:
        issues.append("sharding='fsdp' and enable_model_splitting are two ways to spread a model over GPUs; pick one "
                      "(fsdp keeps every GPU busy; splitting runs one process)")
    if cfg.backend == "unsloth":
        issues.append("sharding='fsdp' runs with backend='peft' only (Unsloth patches the model in ways FSDP2 is not "
                      "tested with); pass backend='peft' or 'auto', or sharding='ddp' to keep Unsloth")
    if cfg.load_in_4bit or cfg.load_in_8bit:
        issues.append("sharding='fsdp' cannot shard bitsandbytes 4/8-bit weights (FSDP2 has no support for their "
                      "packed storage and quant state, and bitsandbytes has no CPU kernels to test it on): pass "
                      "sharding='ddp' to train QLoRA replicas, or enable_model_splitting=True (one process over the "
                      "GPUs), or drop load_in_4bit/load_in_8bit to shard a bf16 base with fsdp")
    return issues


def _batch_issues(cfg: LoraSftConfig, world_size: int | None) -> list[str]:
    ebs = cfg.effective_batch_size
    world = world_size or cfg.world_size()
    if cfg.micro_batch_size == "auto" and ebs is not None and ebs > 0:
        if ebs % world:
            return [f"effective_batch_size={ebs} is not divisible by world_size={world}: set it to a multiple of {world}"]
        if cfg.gradient_accumulation_steps != 1:
            return [f"effective_batch_size={ebs} with micro_batch_size='auto' derives gradient_accumulation_steps; "
                    f"drop gradient_accumulation_steps={cfg.gradient_accumulation_steps} or set micro_batch_size"]
        return []
    if ebs is None or ebs <= 0 or isinstance(cfg.micro_batch_size, str) or cfg.micro_batch_size <= 0:
        return []
    per_pass = cfg.micro_batch_size * world
    issues = []
    if ebs % per_pass:
        lo, hi = max(per_pass, ebs - ebs % per_pass), ebs - ebs % per_pass + per_pass
        divisors = [m for m in range(1, cfg.micro_batch_size + 1) if ebs % (m * world) == 0]
        fix = f"set effective_batch_size to {lo}" + (f" or {hi}" if hi != lo else "")
        if divisors:
            fix += f", or micro_batch_size to {divisors[-1]}"
        issues.append(f"effective_batch_size={ebs} is not divisible by world_size={world} x "
                      f"micro_batch_size={cfg.micro_batch_size} = {per_pass}: {fix}")
    elif cfg.gradient_accumulation_steps not in (1, ebs // per_pass):
        issues.append(f"effective_batch_size={ebs} with micro_batch_size={cfg.micro_batch_size} on {world} process(es) "
                      f"means gradient_accumulation_steps={ebs // per_pass}, but {cfg.gradient_accumulation_steps} was "
                      "given: drop one of the two")
    return issues


def _option_issues(cfg: LoraSftConfig) -> list[str]:
    """warmup_ratio, eval_split_ratio, chat_template and resume_from: ranges, exclusions, paths that must exist."""
    issues = []
    if cfg.warmup_ratio is not None and not 0.0 <= cfg.warmup_ratio < 1.0:
        issues.append(f"`warmup_ratio` must be in [0, 1), got {cfg.warmup_ratio}")
    if cfg.eval_split_ratio is not None:
        if not 0.0 < cfg.eval_split_ratio < 1.0:
            issues.append(f"`eval_split_ratio` must be in (0, 1), got {cfg.eval_split_ratio}")
        if cfg.eval_data_path:
            issues.append("`eval_split_ratio` and `eval_data_path` both name the eval data: pass one of them")
        if (Path(cfg.data_path) / "manifest.json").is_file():
            issues.append(f"`eval_split_ratio` splits a raw JSONL file, but `data_path`={cfg.data_path} is a prepared "
                          "shard dir: pass the JSONL file, or prepare an eval file and pass it as eval_data_path")
    template = cfg.chat_template
    if template and "{" not in template and template not in NAMED_TEMPLATES and _looks_like_path(template) \
            and not Path(template).expanduser().is_file():
        issues.append(f"`chat_template`={template} is neither a file nor one of {sorted(NAMED_TEMPLATES)} (or a name "
                      "of one of the tokenizer's own templates)")
    if cfg.resume_from is not None:
        ckpt = Path(cfg.resume_from)
        if not cfg.resume:
            issues.append(f"`resume_from`={cfg.resume_from} with resume=False: drop one of the two")
        elif not (ckpt / "COMPLETE").is_file() and not _continued(cfg):
            issues.append(f"`resume_from`={cfg.resume_from} is not a complete checkpoint (a checkpoints/checkpoint-"
                          "<step> dir with its COMPLETE marker)" + ("" if ckpt.is_dir() else ": no such directory"))
    return issues


def _embedding_targets(targets: Any) -> list[str]:
    from lora_runtime.kernels import embedding_targets

    return embedding_targets(targets)


def _continued(cfg: LoraSftConfig) -> bool:
    from lora_runtime.checkpoint import continued

    return continued(cfg) is not None


NAMED_TEMPLATES = ("chatml", "default")  # built in (lora_runtime.data.chat_template_text); the tokenizer may add more


def _looks_like_path(text: str) -> bool:
    return "/" in text or os.sep in text or text.endswith((".jinja", ".j2", ".txt", ".tmpl"))


def _machine_issues(cfg: LoraSftConfig) -> list[str]:
    from lora_runtime.preflight import machine_issues

    return machine_issues(cfg)


def _model_issues(cfg: LoraSftConfig) -> list[str]:
    from lora_runtime.preflight import model_issues

    return model_issues(cfg)
