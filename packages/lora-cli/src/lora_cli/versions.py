"""`lora-cli --version`: the installed versions of the three workspace packages, one per line."""

from __future__ import annotations

import click
from lora_runtime.versions import installed

PACKAGES = ("lora-cli", "lora-runtime", "lora-data")


def version_text() -> str:
    return "\n".join(f"{name} {v or '(not installed)'}" for name, v in installed(PACKAGES).items())


def _print(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        click.echo(version_text())
        ctx.exit(0)


version_option = click.option("--version", "-V", is_flag=True, expose_value=False, is_eager=True, callback=_print,
                              help="print the versions of lora-cli, lora-runtime and lora-data, then exit")
