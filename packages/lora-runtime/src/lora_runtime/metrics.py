"""`metrics.jsonl` (one JSON object per log: step, epoch, loss, lr, grad_norm, tokens/s, peak memory) + loss PNG.

    {"step": 3, "epoch": 0.75, "loss": 6.91, "lr": 0.0002, "grad_norm": 1.8, "tokens_seen": 1536,
     "tokens_per_s": 2210.5, "peak_memory_bytes": 812345344}

A value that is not finite (a NaN loss or gradient norm) is written as null, so every line is strict JSON; `read_metrics`
reads it back as NaN.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_runtime.distributed import dist_env

if TYPE_CHECKING:
    from lora_runtime.config import LoraSftConfig

_RENAME = {"learning_rate": "lr"}
_DROP = {"total_flos", "train_runtime", "train_samples_per_second", "train_steps_per_second"}


def peak_memory_bytes() -> int:
    """Peak CUDA memory allocated on this device, else the process's peak resident set size."""
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            return int(torch.cuda.max_memory_allocated())
    except ImportError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def metrics_row(logs: dict[str, Any], step: int) -> dict[str, Any]:
    """Normalise one Trainer log dict: `learning_rate` → `lr`, floats only, run-summary noise dropped."""
    row: dict[str, Any] = {"step": step}
    for key, value in logs.items():
        if key in _DROP or not isinstance(value, int | float):
            continue
        row[_RENAME.get(key, key)] = float(value) if isinstance(value, float) else value
    return row


class MetricsWriter:
    """Append rows to `metrics.jsonl` (rank 0 only). On resume, rows past the resume step are cut first."""

    def __init__(self, path: str | Path, *, resume_step: int | None = None, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("", encoding="utf-8")
        else:
            rows = _whole_lines(self.path) if self.path.exists() else []
            kept = [line for line in rows if json.loads(line).get("step", 0) <= resume_step]
            if not kept and resume_step:  # resumed from another run's checkpoint: its rows are there, not here
                kept = [json.dumps({"step": resume_step, "resumed_at": resume_step})]
            tmp = self.path.with_name(f".{self.path.name}.tmp")  # a kill during the rewrite keeps the old file
            tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
            os.replace(tmp, self.path)

    def write(self, row: dict[str, Any]) -> None:
        """Appended and flushed: a killed process loses nothing. Not fsynced per row (a stall of milliseconds per
        logged step on the host, with logging_steps=1); `sync` makes the rows durable at each checkpoint, and the
        rows a power loss could take are past the last checkpoint, which a resume cuts and logs again anyway."""
        if not self.enabled:
            return
        finite = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}
        with open(self.path, "a", encoding="utf-8") as f:  # NaN and Infinity are not JSON: null
            f.write(json.dumps(finite, sort_keys=True, allow_nan=False) + "\n")

    def sync(self) -> None:
        """fsync the rows written so far (called before a checkpoint is committed)."""
        if not self.enabled or not self.path.exists():
            return
        with open(self.path, "rb") as f:
            os.fsync(f.fileno())


def _whole_lines(path: Path) -> list[str]:
    """The rows of a metrics file; a last row cut short by a crash mid-append is dropped (and said so)."""
    text = path.read_text(encoding="utf-8")
    lines = [line for line in text.split("\n") if line.strip()]
    if lines and not text.endswith("\n"):
        try:
            json.loads(lines[-1])
        except ValueError:
            from lora_runtime.distributed import print0

            print0(f"{path}: dropping a last row cut short by a crash: {lines[-1][:80]!r}")
            lines.pop()
    return lines


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a metrics file, a null (a value that was not finite) read back as NaN."""
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    return [{k: math.nan if v is None else v for k, v in row.items()} for row in rows]


def run_summary(path: str | Path) -> dict[str, float | None]:
    r"""Summary figures over the whole run, read from metrics.jsonl (so a resumed run counts its earlier steps):
    final_loss (the last logged), train_loss (every step's loss weighted alike: a row logged every k steps is the
    mean of k steps), eval_loss (the last evaluation).

    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "metrics.jsonl"  # logged every 2, then every 4 steps
    >>> _ = path.write_text('{"step": 2, "loss": 1.0}\n{"step": 6, "loss": 0.5}\n{"step": 6, "eval_loss": 0.7}\n')
    >>> run_summary(path)  # train_loss (1.0 * 2 + 0.5 * 4) / 6
    {'final_loss': 0.5, 'train_loss': 0.6666666666666666, 'eval_loss': 0.7}
    """
    rows = read_metrics(path) if Path(path).is_file() else []
    train = [(r["step"], r["loss"]) for r in rows if isinstance(r.get("loss"), int | float)]
    evals = [r["eval_loss"] for r in rows if isinstance(r.get("eval_loss"), int | float)]
    start = rows[0].get("resumed_at", 0) if rows else 0  # a file begun at a resume from another run's checkpoint
    weighted, covered, prev = 0.0, 0, start
    for step, loss in train:
        if math.isfinite(loss):
            weighted, covered = weighted + loss * (step - prev), covered + step - prev
        prev = step
    return {"final_loss": train[-1][1] if train else None, "train_loss": weighted / covered if covered else None,
            "eval_loss": evals[-1] if evals else None}


def whole_run_summary(logs: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """transformers' end-of-run summary with `train_loss` over the whole run: its own divides the loss summed in this
    session by every step, resumed ones included (a resumed run reported 0.45 where every logged loss was ~11.8)."""
    if "train_loss" not in logs:
        return logs
    loss = run_summary(path)["train_loss"]
    return {**logs, "train_loss": loss} if loss is not None else {k: v for k, v in logs.items() if k != "train_loss"}


def plot_loss(metrics_path: str | Path, png_path: str | Path) -> Path | None:
    """Training (and eval) loss against step, as a PNG (matplotlib Agg); None when there is no loss to plot."""
    rows = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in rows if isinstance(r.get("loss"), int | float)]
    evals = [(r["step"], r["eval_loss"]) for r in rows if isinstance(r.get("eval_loss"), int | float)]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", lw=1.2)
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return Path(png_path)


def report_env(config: LoraSftConfig) -> dict[str, str]:
    """Env settings the wandb / TensorBoard / MLflow integrations read, from the config's explicit values."""
    pairs = {"WANDB_PROJECT": config.wandb_project, "WANDB_ENTITY": config.wandb_entity,
             "TENSORBOARD_LOGGING_DIR": config.tensorboard_log_dir, "MLFLOW_TRACKING_URI": config.mlflow_tracking_uri,
             "MLFLOW_EXPERIMENT_NAME": config.mlflow_experiment_name, "MLFLOW_RUN_NAME": config.mlflow_run_name}
    return {k: v for k, v in pairs.items() if v}


# integration → (config fields / env vars that turn it on, import names that satisfy it, install hint)
INTEGRATIONS = {
    "wandb": (("wandb_project", "wandb_entity", "wandb_run_name"), ("WANDB_PROJECT",), ("wandb",),
              "`uv pip install wandb`"),
    "tensorboard": (("tensorboard_log_dir",), (), ("tensorboard", "tensorboardX"), "`uv pip install tensorboard`"),
    "mlflow": (("mlflow_tracking_uri", "mlflow_experiment_name", "mlflow_run_name"),
               ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"), ("mlflow",),
               "`uv pip install mlflow` (or `pip install mlflow`)"),
}


def report_targets(config: LoraSftConfig) -> list[str]:
    """Integrations to report to: any of their parameters given (a run name alone included), or the usual env vars,
    as training-hub decides (`INTEGRATIONS`)."""
    return [name for name, (fields, env, _, _) in INTEGRATIONS.items()
            if any(getattr(config, f) for f in fields) or any(os.environ.get(v) for v in env)]


@contextlib.contextmanager
def reporting_env(config: LoraSftConfig):
    """Set `report_env(config)` for the run and restore the previous values after it (no leak into the next run).

    Rank 0 opens the wandb run itself (transformers' callback then reuses it): wandb caches WANDB_DIR & co. once per
    process, so passing them here is what lets a second `lora_sft` in one process log to its own directory; the run
    gets the resolved (redacted) config. The run is finished at the end, as failed (exit code 1) where training
    raised, with wandb's own 255 for a Ctrl-C (KeyboardInterrupt); transformers would leave it open. A run the caller
    had started before is used and left open.
    """
    new = report_env(config)
    old = {k: os.environ.get(k) for k in new}
    os.environ.update(new)
    theirs = getattr(sys.modules.get("wandb"), "run", None)
    exit_code = 1
    try:
        if "wandb" in report_targets(config) and dist_env().is_main and theirs is None:
            _start_wandb(config)
        yield
        exit_code = 0
    except KeyboardInterrupt:
        exit_code = 255
        raise
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        wandb = sys.modules.get("wandb")
        if wandb is not None and getattr(wandb, "run", None) is not None and wandb.run is not theirs:
            wandb.finish(exit_code=exit_code)


def _start_wandb(config: LoraSftConfig) -> None:
    """wandb.init; where wandb has no API key and no terminal to ask for one on, one ConfigError naming the ways out
    (wandb's UsageError was a 22-frame traceback)."""
    import wandb

    from lora_runtime.config import ConfigError, redacted

    try:
        wandb.init(project=os.environ.get("WANDB_PROJECT"), entity=os.environ.get("WANDB_ENTITY"),
                   name=config.wandb_run_name, dir=os.environ.get("WANDB_DIR"), config=redacted(config.to_dict()))
    except wandb.errors.UsageError as e:
        fix = (" Set WANDB_API_KEY, or WANDB_MODE=offline to log to files (`wandb sync` uploads them later)"
               if "api key" in str(e).lower() else "")
        raise ConfigError([f"wandb reporting (wandb_project, wandb_entity, wandb_run_name or WANDB_PROJECT) cannot "
                           f"start: {str(e).rstrip('.')}.{fix}"]) from None
