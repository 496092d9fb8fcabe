"""`installed(packages)`: the installed version of each distribution, None where it is not installed.

What a run records next to its config, what the unsloth probe's cache is keyed by, and what `lora-cli --version`
prints; importlib.metadata only (nothing is imported).

    >>> installed(("lora-runtime", "no-such-distribution"))["no-such-distribution"] is None
    True
"""

from __future__ import annotations

from collections.abc import Iterable
from importlib.metadata import PackageNotFoundError, version


def installed(packages: Iterable[str]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in packages:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out
