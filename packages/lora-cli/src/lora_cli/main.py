"""`lora-cli`: prepare, train (torchrun launched for you), merge, inspect, and an end-to-end demo.

Exit codes: 0 success; 1 a user error (bad data, a bad option value, a bad config file: one line per problem naming
the option or file:line, no traceback unless --debug); 2 a usage error (unknown option, missing argument); 130
interrupted (after saving a checkpoint).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import sys
import traceback
from pathlib import Path
from typing import Any, ClassVar

import click
from lora_data import MANIFEST_NAME, DataError
from lora_runtime.config import ConfigError, LoraSftConfig, field_names, redacted
from lora_runtime.data import data_path_issues
from lora_runtime.distributed import auto_nproc_per_node, dist_env
from lora_runtime.errors import CheckpointError, NonFiniteLossError, OutOfMemoryHint, PushError

from lora_cli import launch
from lora_cli.options import (
    REQUIRED,
    ConfigFileError,
    check_model_path,
    config_options,
    given_on_command_line,
    merge_values,
    name_file_keys,
    option_name,
    passthrough_args,
    read_config_file,
)
from lora_cli.stop import EXIT_INTERRUPTED, StopRequest, output_may_hang_up, resume_note
from lora_cli.versions import version_option

log = logging.getLogger("lora_cli")


class UserError(Exception):
    """A problem the user can fix (a path, a combination of options); printed as one line, exit code 1."""


# OSError covers what transformers raises for a model or tokenizer it cannot load (and a full disk): one line too.
# CheckpointError (resume=False on a run dir with checkpoints, a full disk), OutOfMemoryHint and NonFiniteLossError
# name their fix too.
USER_ERRORS = (UserError, ConfigFileError, DataError, ConfigError, CheckpointError, OutOfMemoryHint,
               NonFiniteLossError, PushError, launch.LaunchError, OSError)
# raised alike by every torchrun worker, at the same step (a gradient norm reduced over the ranks): the node's local
# rank 0 says it. Not config errors: a worker that exits at once has torchrun kill the others, and one still starting
# (before lora-cli's stop handler) would die unheard
SAME_ON_EVERY_RANK = (NonFiniteLossError,)


def _as_option(text: str) -> str:
    """Spell config field names the way this command line does: "`lora_alpha` must be > 0" → "--lora-alpha must be > 0",
    "`data_path`=x does not exist" → "--data=x does not exist" (the short name `--help` lists first)."""
    known = set(field_names())
    return re.sub(r"`(\w+)`", lambda m: option_name(m[1]) if m[1] in known else m[0], text)


def error_lines(e: BaseException) -> list[str]:
    """The `error:` lines for a user error. Under torchrun a worker's lines name its rank, and an error every worker
    raises alike is printed once a node, by its local rank 0."""
    env = dist_env()
    if env.world_size == 1:
        return _plain_error_lines(e)
    if isinstance(e, SAME_ON_EVERY_RANK):
        return _plain_error_lines(e) if env.local_rank == 0 else []
    return [f"rank {env.rank}: {line}" for line in _plain_error_lines(e)]


def _plain_error_lines(e: BaseException) -> list[str]:
    if isinstance(e, ConfigError):
        return [_as_option(i) for i in e.issues]
    if isinstance(e, launch.LaunchError | UserError):
        return [_as_option(str(e))]
    return [" ".join(str(e).split()) or type(e).__name__]


class LoraCli(click.Group):
    """Maps user errors to one line on stderr and exit code 1 (tracebacks only with --debug).

    `prepare` and `inspect` are lora-data's own click commands, loaded on first use (polars stays unimported for
    `train` and `--help`).
    """

    LAZY: ClassVar[dict[str, tuple[str, str]]] = {"prepare": ("lora_data.cli", "prepare_command"), "inspect": ("lora_data.cli", "inspect_command"),
                                                  "chat": ("lora_cli.chat", "chat_command")}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self.LAZY])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.LAZY:
            import importlib

            module, attr = self.LAZY[name]
            command: click.Command = getattr(importlib.import_module(module), attr)
            if not any(p.name == "debug" for p in command.params):  # `lora-cli chat --debug` as `train --debug`
                command.params.append(click.Option(["--debug"], **_DEBUG))
            return command
        return super().get_command(ctx, name)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except USER_ERRORS as e:
            if ctx.meta.get("lora_cli.debug"):
                traceback.print_exc()
            for line in error_lines(e):
                click.echo(f"error: {line}", err=True)
            ctx.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(EXIT_INTERRUPTED)


def _set_debug(ctx: click.Context, _param: click.Parameter, value: bool) -> bool:
    if value:
        ctx.meta["lora_cli.debug"] = True
    return value


_DEBUG: dict[str, Any] = {"is_flag": True, "expose_value": False, "is_eager": True, "callback": _set_debug,
                          "help": "show tracebacks for user errors"}
debug_option = click.option("--debug", **_DEBUG)


@click.group(cls=LoraCli, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120})
@debug_option
@version_option
def main() -> None:
    """LoRA / QLoRA supervised fine-tuning: prepare data, train (on 1..N GPUs or nodes), merge, chat, inspect, demo."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)


@main.command(context_settings={"max_content_width": 120})
@click.option("--config", "config", type=click.Path(dir_okay=False, path_type=Path),
              help="YAML or TOML file of lora_sft options (snake_case keys); options on the command line win")
@click.option("--shards", type=click.Path(file_okay=False, path_type=Path),
              help="a prepared shard directory (from `lora-cli prepare`); the same as --data DIR")
@click.option("--dry-run", is_flag=True,
              help="check the options and config, print the resolved config and the torchrun command, then exit")
@config_options
@debug_option
@click.pass_context
def train(ctx: click.Context, config: Path | None, shards: Path | None, dry_run: bool, **params: Any) -> None:
    """Train a LoRA adapter: `--model DIR --shards DIR|--data FILE.jsonl --output DIR [--gpus N|auto] [options]`.

    --gpus N > 1 (or --nnodes > 1) launches torchrun for you, --gpus auto one process per visible GPU; inside
    torchrun the workers train in-process.
    """
    cfg = _build_config(ctx, config, shards, params)
    plan = launch.LaunchPlan(int(cfg.nproc_per_node or 1), cfg.nnodes or 1, cfg.node_rank, cfg.rdzv_id,
                             cfg.rdzv_endpoint, cfg.master_addr, cfg.master_port)
    if dry_run:
        _print_plan(ctx, cfg, plan, {"config": config, "shards": shards, **params})
        return
    if launch.needs_launch(plan):  # the config was validated for plan.world_size: fail here, once, not in N workers
        device = launch.check_devices(plan.nproc_per_node, cfg.backend)
        args = passthrough_args(ctx, {"config": config, "shards": shards, **params})
        from lora_runtime.checkpoint import output_lock

        lock = output_lock(cfg.ckpt_output_dir, cfg.model_path) if plan.nnodes == 1 else contextlib.nullcontext()
        with lock, output_may_hang_up():  # the lock: else rank 0's
            rc = launch.run_torchrun(plan, args, device, cfg.ckpt_output_dir)
        ctx.exit(rc)
    with output_may_hang_up():
        rc = _train_in_process(cfg)
    ctx.exit(rc)


def _print_plan(ctx: click.Context, cfg: LoraSftConfig, plan: launch.LaunchPlan, params: dict) -> None:
    """--dry-run: everything `train` would decide before touching a GPU or the data; the torchrun command as a
    shell reads it."""
    import json
    import shlex

    click.echo(json.dumps(redacted(cfg.to_dict()), indent=1, default=str))
    if ctx.meta.get("lora_cli.prepared"):  # what the shards decide where the config above shows its default
        click.echo(ctx.meta["lora_cli.prepared"])
    if cfg.micro_batch_size == "auto":
        click.echo(f"batch: micro auto (2 on a CPU; on a GPU sized from free memory when training starts) x "
                   f"{plan.world_size} process(es)" + (f", effective {cfg.effective_batch_size}"
                                                       if cfg.effective_batch_size else ""))
    else:
        from lora_runtime.batching import fixed_plan

        click.echo(f"batch: {fixed_plan(cfg, plan.world_size).describe()}")
    if launch.needs_launch(plan):
        launch.check_devices(plan.nproc_per_node, cfg.backend)  # refuse what the real launch refuses
        click.echo("would run: " + shlex.join(launch.torchrun_command(plan, passthrough_args(ctx, params))))
    else:
        click.echo("would train in this process")


def _build_config(ctx: click.Context, config: Path | None, shards: Path | None, params: dict) -> LoraSftConfig:
    """The validated config: defaults < --config file < typed options. Every problem is reported at once, a key
    from the file as `FILE:LINE: key ...`, a typed option as `--option ...`."""
    if config is not None and not config.is_file():
        raise UserError(f"--config {config}: no such file")
    file = read_config_file(config) if config else None
    file_values = file.values if file else {}
    kw = merge_values(ctx, params, file_values)
    if kw.get("nproc_per_node") == "auto":  # resolved here to say why; launch.visible_gpus is what the launch checks
        kw["nproc_per_node"], why = auto_nproc_per_node(launch.visible_gpus)
        if dist_env().is_main:
            log.info("--gpus auto: %s", why)
    if shards is not None:
        if params.get("data_path") is not None:
            raise click.UsageError("--shards and --data are two spellings of the training data: pass one")
        if not (shards / MANIFEST_NAME).is_file():
            raise UserError(f"--shards {shards}: no manifest.json there; prepare it first with "
                            "`lora-cli prepare DATA.jsonl OUT_DIR --tokenizer MODEL_DIR --max-seq-len N`")
        kw["data_path"] = str(shards)
    missing = [n for n in REQUIRED if not kw.get(n)]
    if missing and not (file and file.issues):
        names = {"model_path": "--model", "data_path": "--data or --shards", "ckpt_output_dir": "--output"}
        raise click.UsageError("missing " + ", ".join(names[n] for n in missing) + " (or set it in --config)")
    typed = {n for n in params if given_on_command_line(ctx, n)}
    shard_issues, ctx.meta["lora_cli.prepared"] = _as_prepared(kw, typed | set(file_values)) if not missing else ([], "")
    if not missing:
        from_file = file is not None and "model_path" in file.values and "model_path" not in typed
        check_model_path(kw["model_path"], f"{file.where('model_path')}: model_path" if file and from_file else "--model")
    issues = (list(file.issues) if file else []) + shard_issues
    cfg = None
    try:
        cfg = LoraSftConfig(**kw).validate() if not missing else None
    except ConfigError as e:
        issues += e.issues
    if cfg is not None:  # before torchrun starts its workers (which check again)
        issues += data_path_issues(cfg)
    if issues or cfg is None:
        raise ConfigError(name_file_keys(issues, file, typed) if file else issues)
    return cfg


def _as_prepared(kw: dict[str, Any], asked: set[str]) -> tuple[list[str], str]:
    """A shard dir as the training data fixed its row length, masking, packing, overlong policy and fields when it
    was prepared. One asked for (typed, or in the config file) with another value is an issue: lora_sft trains as
    prepared where a value is its default, which would ignore an asked-for --no-train-on-inputs or 2048. Those not
    asked for are left to lora_sft, which trains as prepared and says so (its run record keeps the call's values
    beside the shards', so a resume or eval shards compare as before). Returns (issues, the line --dry-run prints
    for the values the shards decide)."""
    from lora_data import Manifest
    from lora_runtime.config import field_defaults
    from lora_runtime.data import prepared_differences

    data = Path(str(kw.get("data_path"))).expanduser()
    if not (data / MANIFEST_NAME).is_file():  # raw data
        return [], ""
    try:
        manifest = Manifest.load(data)
    except DataError:  # a manifest the run's own checks name
        return [], ""
    values = field_defaults() | kw
    length = [("max_seq_len", manifest.seq_len, values["max_seq_len"])] if manifest.seq_len != values["max_seq_len"] \
        else []
    issues, inherited = [], []
    for name, baked, value in length + prepared_differences(manifest, values):
        if name in asked:
            issues.append(f"`{name}`={value!r}, but the shards in {data} were prepared with {name}={baked!r}: "
                          f"leave it out, or prepare the data again with it (or pass the raw JSONL as --data)")
        else:
            inherited.append(f"{name}={baked!r}")
    note = f"data: the shards in {data} were prepared with {', '.join(inherited)}: training as prepared"
    return issues, note if inherited else ""


def _train_in_process(cfg: LoraSftConfig) -> int:
    import os

    import lora_runtime
    import lora_runtime.backends
    from lora_runtime.distributed import dist_env

    rank0 = dist_env().is_main
    if os.environ.get("LORA_CLI_CPU_WORKERS") and rank0:
        log.info("lora-cli: %s CPU worker processes with gloo (no GPU visible)", dist_env().world_size)
    lora_runtime.backends.import_unsloth_first(cfg)  # before the callbacks below import transformers
    with StopRequest() as stop:
        callbacks = [*(cfg.callbacks or []), stop.callback()]  # the runtime draws the progress bar
        try:
            result = lora_runtime.run(dataclasses.replace(cfg, callbacks=callbacks))
        except KeyboardInterrupt:  # a repeated signal: abort without waiting for the checkpoint
            if rank0:
                click.echo(f"aborted by a repeated {stop.signal_name or 'SIGINT'} before a checkpoint was written; "
                           f"{resume_note(cfg.ckpt_output_dir)}", err=True)
            return EXIT_INTERRUPTED
    if rank0:
        _print_result(result)
    if stop.requested and not result.finished:
        if rank0:
            click.echo(f"stopped by {stop.signal_name} after step {result.steps}; {_saved(cfg, result.steps)}", err=True)
        return EXIT_INTERRUPTED
    if stop.requested and rank0:  # after the last step began: the run finished, its outputs written
        click.echo(f"{stop.signal_name} arrived after the last step began; the run finished", err=True)
    return 0


def _saved(cfg: LoraSftConfig, step: int) -> str:
    """What a stop left on disk: the checkpoint of `step`, or (never claimed when absent) the one the next run uses."""
    from lora_runtime import checkpoint

    ckpt = checkpoint.checkpoints_dir(cfg.ckpt_output_dir) / f"checkpoint-{step}"
    if (ckpt / checkpoint.MARKER).is_file():
        return f"a checkpoint is saved in {cfg.ckpt_output_dir} ({ckpt.name}): run the same command again to resume"
    return resume_note(cfg.ckpt_output_dir)


def _print_result(result: Any) -> None:
    none = ("(none yet: stopped early, the newest checkpoint holds the state)" if not getattr(result, "finished", True)
            else "(none: save_model was off; the checkpoints hold adapters)")
    click.echo(f"adapter:  {result.adapter_dir or none}")
    if getattr(result, "merged_dir", None):
        click.echo(f"merged:   {result.merged_dir}")
    click.echo(f"metrics:  {result.metrics_path}")
    loss = "n/a" if result.final_loss is None else f"{result.final_loss:.4f}"
    mean = getattr(result, "train_loss", None)
    over = "" if mean is None else f", mean loss {mean:.4f} over the steps logged"
    click.echo(f"backend:  {result.backend}, {result.steps} steps, final loss {loss}{over}")


@main.command(context_settings={"max_content_width": 120})
@click.argument("adapter_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--model", "model_path", required=True, help="the base model the adapter was trained on")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="where to write the merged model (safetensors + tokenizer)")
@click.option("--push-to-hub", "push_to_hub", default=None, metavar="REPO_ID",
              help="also upload the merged model to this Hugging Face repo (token from HF_TOKEN)")
@debug_option
def merge(adapter_dir: Path, model_path: str, out_dir: Path, push_to_hub: str | None) -> None:
    """Merge ADAPTER_DIR into the base model and write it to --out.

    ADAPTER_DIR is a run's output directory (where `lora-cli train` wrote the adapter); the merged model is saved in
    safetensors with the tokenizer.
    """
    import lora_runtime
    from lora_runtime.checkpoint import holds_an_adapter

    if not holds_an_adapter(adapter_dir):
        raise UserError(f"{adapter_dir}: no adapter_config.json there; pass the adapter directory of a run "
                        "(the `adapter:` line that `lora-cli train` printed)")
    from lora_runtime import hub

    if issues := hub.push_issues(push_to_hub, "--push-to-hub"):
        raise UserError(issues[0])
    check_model_path(model_path)
    out = lora_runtime.merge_adapter(adapter_dir, model_path, out_dir)
    click.echo(f"merged model: {out}")
    if push_to_hub:
        click.echo(f"pushed to {hub.push(push_to_hub, out, what='merged model')}")


@main.command(context_settings={"max_content_width": 120})
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/demo"),
              show_default=True, help="run directory (recreated on every demo run)")
@click.option("--max-steps", type=click.IntRange(min=1), default=None, envvar="LORA_CLI_DEMO_STEPS",
              help="cut training short (default: the demo config's schedule; env LORA_CLI_DEMO_STEPS also works)")
@debug_option
def demo(out_dir: Path, max_steps: int | None) -> None:
    """Train a tiny model on a shipped dataset on the CPU in about a minute, end to end, and show what it learned."""
    from lora_cli.demo_run import run_demo

    run_demo(out_dir, max_steps)


if __name__ == "__main__":
    main()
