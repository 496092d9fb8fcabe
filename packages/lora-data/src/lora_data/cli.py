"""`lora-data prepare INPUT... OUT_DIR --tokenizer DIR --max-seq-len N` and `lora-data inspect OUT_DIR`.

Exit codes: 0 ok; 1 a data or user error (one line naming file:line and field, no traceback); 2 usage; 130
interrupted (Ctrl-C).
lora-cli reuses `prepare_command` and `inspect_command`; `cli` is the click group.
"""

from __future__ import annotations

import errno
import sys
import traceback

import click

from .errors import DataError
from .options import VERSION
from .pack import OVERLONG
from .records import FORMATS, Fields

_OS_HINTS = {errno.ENOSPC: "the disk is full: free some space or prepare elsewhere",
             errno.EDQUOT: "free some space or prepare elsewhere",
             errno.EROFS: "choose a writable output directory",
             errno.EACCES: "choose a directory you can write to"}


def _fail(e: Exception) -> None:
    ctx = click.get_current_context(silent=True)
    if ctx is not None and ctx.meta.get("lora_cli.debug"):  # `lora-cli prepare ... --debug`
        traceback.print_exc()
    message = str(e)
    if isinstance(e, OSError) and not isinstance(e, DataError):
        where = f"{e.filename}: " if e.filename else ""
        message = f"{where}{e.strerror or e}" + (f" ({_OS_HINTS[e.errno]})" if e.errno in _OS_HINTS else "")
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(VERSION, "--version", "-V", prog_name="lora-data", message="%(prog)s %(version)s")
def cli() -> None:
    """Validate, render, mask and pack chat/Alpaca JSONL into memory-mapped shards."""


def _field_options(command):
    """--field-messages, --field-instruction, ... from `records.Fields` (training-hub's names and defaults)."""
    for name, default in reversed(Fields().as_options().items()):
        flag = "--" + name.replace("_", "-")
        command = click.option(flag, name, default=default, show_default=True,
                               help=f"Key of the {name.removeprefix('field_')} field in each record.")(command)
    return command


@click.command("prepare")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(allow_dash=True))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--tokenizer", required=True,
              help="Tokenizer (or model) directory, or a Hugging Face hub id such as Qwen/Qwen2.5-1.5B-Instruct.")
@click.option("--max-seq-len", required=True, type=click.IntRange(min=2), help="Row length in tokens.")
@click.option("--format", "format_", type=click.Choice(FORMATS), default="auto", show_default=True,
              help="Record format; auto decides per file from its first record.")
@_field_options
@click.option("--overlong", type=click.Choice(OVERLONG), default="drop", show_default=True,
              help="What to do with a record longer than --max-seq-len (always listed in rejects.jsonl).")
@click.option("--no-packing", is_flag=True, help="One sample per row instead of best-fit-decreasing packing.")
@click.option("--train-on-inputs", is_flag=True, help="Loss on every token, not only assistant turns.")
@click.option("--seed", type=int, default=0, show_default=True, help="Order of the packed rows.")
@click.option("--strict", is_flag=True,
              help="Any line listed in rejects.jsonl is an error (exit 1, no shards written): a rejected record, and "
                   "also one cut to --max-seq-len or trained without reasoning its template leaves out.")
@click.option("--rows-per-shard", type=click.IntRange(min=1), default=4096, show_default=True)
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: only on a terminal).")
@click.option("--data-split", default=None,
              help="Split of a hub dataset (default train) or of a saved DatasetDict folder.")
@click.option("--data-config", default=None, help="Configuration name of a hub dataset.")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Processes rendering the chat template (default: the CPU cores available). Same output for any N.")
def prepare_command(inputs, out_dir, tokenizer, max_seq_len, format_, overlong, no_packing, train_on_inputs, seed,
                    strict, rows_per_shard, progress, data_split, data_config, workers, **fields):
    """Prepare INPUT.jsonl [INPUT2.jsonl ...] into OUT_DIR (shards, manifest.json, rejects.jsonl).

    An input may also be .jsonl.gz, `-` (stdin, plain or gzip), a parquet/CSV/arrow file, a datasets save_to_disk
    folder, or a Hugging Face hub dataset name (org/name, not a local path; needs the datasets extra).
    """
    from ._prepare import prepare

    try:
        prepare(list(inputs), out_dir, tokenizer, max_seq_len=max_seq_len, strict=strict, progress=progress,
                format=format_, overlong=overlong, packing=not no_packing, train_on_inputs=train_on_inputs, seed=seed,
                rows_per_shard=rows_per_shard, data_split=data_split, data_config=data_config, workers=workers,
                **fields)
    except (DataError, OSError) as e:
        _fail(e)


@click.command("inspect")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--bins", type=click.IntRange(min=1), default=10, show_default=True, help="Histogram buckets.")
def inspect_command(out_dir, bins):
    """Print a prepared directory's manifest numbers and a histogram of sample lengths."""
    from .shards import ShardReader

    try:
        reader = ShardReader(out_dir)
    except (DataError, OSError) as e:
        _fail(e)
    m = reader.manifest
    click.echo(m.summary())
    click.echo(f"  tokenizer {m.tokenizer.get('fingerprint')} ({m.tokenizer.get('name_or_path')}, template: "
               f"{m.tokenizer.get('chat_template_source')}); format {m.dataset_format}; cache key {m.cache_key}")
    click.echo(histogram(reader.sample_lengths(), m.seq_len, bins))


def histogram(lengths, seq_len: int, bins: int = 10, width: int = 40) -> str:
    """ASCII histogram of sample lengths over [0, seq_len] in `bins` equal buckets."""
    import numpy as np

    counts, edges = np.histogram(lengths, bins=bins, range=(0, seq_len))
    top = max(int(counts.max()), 1) if len(counts) else 1
    lines = [f"sample lengths ({len(lengths)} samples, max {int(lengths.max()) if len(lengths) else 0}):"]
    for n, lo, hi in zip(counts, edges[:-1], edges[1:], strict=True):
        lines.append(f"  {int(lo):>6}-{int(hi):<6} {'#' * round(width * int(n) / top):<{width}} {int(n)}")
    return "\n".join(lines)


cli.add_command(prepare_command)
cli.add_command(inspect_command)


EXIT_INTERRUPTED = 130  # as lora-cli: Ctrl-C is not a data error


def main() -> None:
    try:
        rc = cli.main(prog_name="lora-data", standalone_mode=False)
    except click.exceptions.Abort:  # Ctrl-C (click turns KeyboardInterrupt into Abort): the old set stays intact
        click.echo("interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
