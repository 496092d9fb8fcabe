"""No worker outlives its launcher unseen: the `--gpus N` process tree, where one of its processes is killed.

    lora-cli (launcher, a child subreaper) ── torchrun ──┬── worker rank 0
                                                         └── worker rank 1

- The launcher dies (a `kill -9`, the OOM killer): torchrun gets a SIGTERM (PDEATHSIG), which it passes on to the
  workers as a stop; they save a checkpoint. torchrun holds the output lock until it exits.
- torchrun dies: each worker gets a SIGTERM (its own PDEATHSIG) and saves. The workers are handed to the launcher
  (a subreaper), which waits for them before it names the checkpoint and lets the output lock go.

Light on imports: a worker arms its PDEATHSIG first thing (`lora_cli.__main__`), before the seconds of imports in
which a torchrun death would otherwise go unseen.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

LAUNCHER_PID_ENV = "LORA_CLI_LAUNCHER_PID"
PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent dies
PR_SET_CHILD_SUBREAPER = 36  # prctl(2): orphaned descendants are handed to this process, not to init


def prctl() -> Callable[..., int] | None:
    """libc's prctl (Linux; None elsewhere), resolved before a fork: the child between fork and exec only calls it."""
    if sys.platform != "linux":
        return None
    import ctypes

    return ctypes.CDLL(None, use_errno=True).prctl


def stop_with_parent(parent: int, call: Callable[..., int] | None = None) -> None:
    """A SIGTERM, as for a stop, when this process's parent dies (Linux). `parent`: the pid it must still have;
    `call`: `prctl()`, resolved beforehand where this runs between a fork and an exec."""
    call = call or prctl()
    if call is None:
        return
    call(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before the request: the SIGTERM would never come
        _stop_now()


def _stop_now() -> None:
    """SIGTERM to this process with the default action: not a handler inherited from the launcher, nor ignored."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


def arm_worker() -> None:
    """In a worker of the launcher's torchrun (nothing elsewhere): stop when torchrun dies. Its parent is torchrun
    unless torchrun died already, when the worker was handed to the launcher (or to init)."""
    launcher = os.environ.get(LAUNCHER_PID_ENV, "")
    if sys.platform != "linux" or not launcher.isdigit() or "LOCAL_RANK" not in os.environ:
        return
    parent = os.getppid()
    if parent in (1, int(launcher)):  # torchrun died already, during this process's start: nothing to save yet
        _stop_now()
    stop_with_parent(parent)


def become_subreaper(on: bool) -> None:
    """The launcher, while torchrun runs: the workers of a torchrun that dies are handed to it (and waited for), not
    to init."""
    call = prctl()
    if call is not None:
        call(PR_SET_CHILD_SUBREAPER, int(on))


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:  # a real-time signal
        return f"signal {number}"


def adopted_workers() -> list[int]:
    """This process's children that run `lora_cli` (workers whose torchrun died) or have exited (a zombie's command
    line is gone: reaped at once), from /proc."""
    me, found = os.getpid(), []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, ppid = stat.read_text().rpartition(")")[2].split()[:2]  # after "pid (comm)": state, ppid, ...
            if int(ppid) == me and (state == "Z" or b"lora_cli" in (stat.parent / "cmdline").read_bytes()):
                found.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):  # exited meanwhile, or not ours to read
            pass
    return sorted(found)


def wait_for(pids: list[int]) -> list[int]:
    """Wait for these children (adopted workers) to exit, taking each out of `pids` once reaped (a signal handler
    reading the list never signals a pid that may belong to another process by then); their exit codes (-N: killed
    by signal N)."""
    codes = []
    while pids:
        with contextlib.suppress(ChildProcessError):  # reaped elsewhere
            codes.append(os.waitstatus_to_exitcode(os.waitpid(pids[0], 0)[1]))
        pids.pop(0)
    return codes
