"""`lora-cli --version`: the installed versions of the three workspace packages, one per line."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

import click

PACKAGES = ("lora-cli", "lora-runtime", "lora-data")


def version_text() -> str:
    lines = []
    for name in PACKAGES:
        try:
            lines.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            lines.append(f"{name} (not installed)")
    return "\n".join(lines)


def _print(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        click.echo(version_text())
        ctx.exit(0)


version_option = click.option("--version", "-V", is_flag=True, expose_value=False, is_eager=True, callback=_print,
                              help="print the versions of lora-cli, lora-runtime and lora-data, then exit")
