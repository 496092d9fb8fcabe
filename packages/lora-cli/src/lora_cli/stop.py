"""Ctrl-C / SIGTERM / SIGHUP during training: finish the current optimizer step, save a checkpoint, stop, exit 130.

The first SIGINT, SIGTERM or SIGHUP (a closed terminal; not where it is ignored, as under `nohup`) only raises a flag.
A terminal that went away fails every later write to it (EIO): the output is dropped from then on
(`output_may_hang_up`), so the stop still saves. A transformers `TrainerCallback` (handed to `lora_sft` through its
`callbacks` field) reads the flag after every optimizer step; under torchrun the ranks agree on it with one tiny
all-reduce, so every rank stops after the same step and rank 0 writes the checkpoint. Over NCCL (several GPUs) the
agreed flag is read one step later (`_AnyRank`), except in the last two steps, so such a run stops one step later.

    step 41 ... step 42 │ SIGINT │ step 43 ends → should_save + should_training_stop → checkpoint-43 → exit 130

One stop often arrives as several signals: `uv run` passes a SIGINT on to its child that the process group already
delivered; a scheduler (Slurm) signals every process of the job while lora-cli's launcher and torchrun pass it on;
torchrun answers a second signal by sending SIGTERM to the workers. So a repeat never loses the checkpoint: under
torchrun a worker ignores repeats (torchrun's shutdown timeout, or the scheduler's SIGKILL after its grace period, ends
a save that hangs), and a single process ignores them for `DUPLICATE_S`; a later one aborts at once (for a save that
hangs), and the message names the step the next run resumes from, read from the checkpoints on disk.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from lora_runtime.distributed import HostCopy, dist_env, to_device

from lora_cli.orphans import LAUNCHER_PID_ENV

EXIT_INTERRUPTED = 130
DUPLICATE_S = 2.0  # a repeat within this long after the first signal is the same stop, delivered twice
# Fault injection for tests, exercising the whole path a scheduler's kill takes. "STEP:SIGNAL:TARGET,TARGET,...":
# after optimizer step STEP rank 0 sends SIGNAL to each target in turn, 0.3 s apart; a target is `launcher` (the
# lora-cli launcher: its pid is in LORA_CLI_LAUNCHER_PID under torchrun), `group` (torchrun's process group: torchrun
# and every worker), `parent` (torchrun) or `self`.
FAULT_SIGNALS_ENV = "LORA_CLI_FAULT_SIGNALS"
FAULT_KILL_RANK_ENV = "LORA_CLI_FAULT_SIGKILL_RANK"  # tests: "RANK:STEP" → that rank SIGKILLs itself after STEP


class StopRequest:
    """Install with `with StopRequest() as stop:`; `stop.signal_name` is set once a signal arrived."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}
        self._first_at = 0.0
        self._repeats_ignored = 0

    def __enter__(self) -> StopRequest:
        for s in stop_signals():
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum: int, _frame: object) -> None:
        name = signal.Signals(signum).name
        if self.requested:
            under_torchrun = dist_env().world_size > 1
            if under_torchrun or time.monotonic() - self._first_at < DUPLICATE_S:
                self._repeats_ignored += 1
                if self._repeats_ignored == 1 and dist_env().is_main:
                    _say(f"{name} again: already stopping after this step, the checkpoint is being written")
                return
            raise KeyboardInterrupt
        self.signal_name, self._first_at = name, time.monotonic()
        if dist_env().is_main:  # every rank got it: one line
            _say(f"\n{name}: stopping after this step and saving a checkpoint (send it again after {DUPLICATE_S:.0f} s "
                 "to abort without saving)")

    def callback(self) -> Any:
        """A `transformers.TrainerCallback` that turns the flag into save + stop at the next step end."""
        from transformers import TrainerCallback

        stop = self
        kill_rank, _, kill_step = os.environ.get(FAULT_KILL_RANK_ENV, ":").partition(":")
        signals_step, _, signals = os.environ.get(FAULT_SIGNALS_ENV, ":").partition(":")

        class SaveAndStopOnSignal(TrainerCallback):
            def __init__(self) -> None:
                self.any_rank = _AnyRank()

            def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
                if kill_step and str(state.global_step) == kill_step and str(dist_env().rank) == kill_rank:
                    os.kill(os.getpid(), signal.SIGKILL)
                if signals_step and str(state.global_step) == signals_step and dist_env().is_main:
                    _send_fault_signals(signals)
                # the last two steps read at once: a late answer would come after the run had ended
                if self.any_rank(stop.requested, at_once=state.global_step >= state.max_steps - 1):
                    control.should_save = True
                    control.should_training_stop = True
                return control

        return SaveAndStopOnSignal()


def stop_signals() -> tuple[signal.Signals, ...]:
    """SIGINT, SIGTERM and SIGHUP (a closed terminal), unless SIGHUP is ignored (`nohup`): then the run goes on."""
    hangup = () if signal.getsignal(signal.SIGHUP) == signal.SIG_IGN else (signal.SIGHUP,)
    return (signal.SIGINT, signal.SIGTERM, *hangup)


def _say(line: str) -> None:
    """A line from a signal handler: never raises into the step it interrupted (a write to stderr that the signal
    interrupted raises RuntimeError, "reentrant call"; a terminal gone, EIO)."""
    with contextlib.suppress(RuntimeError, OSError):
        print(line, file=sys.stderr, flush=True)


HUNG_UP = (errno.EIO, errno.EPIPE, errno.ENXIO)  # the terminal or the reader of a pipe is gone


class _DroppedOnHangup:
    """A text stream whose write fails because its terminal hung up (EIO, ENXIO: a stream that was a terminal) or its
    reader left (EPIPE): its descriptor is pointed at /dev/null and the run goes on, instead of the error raising out
    of a training step. Other errors (a full disk under a redirect, EIO from a failing disk) raise as before."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._gone = HUNG_UP if os.isatty(stream.fileno()) else (errno.EPIPE,)  # a hung-up tty no longer says it is

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError as e:
            if e.errno not in self._gone:
                raise
            self._drop()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as e:
            if e.errno not in self._gone:
                raise
            self._drop()

    def _drop(self) -> None:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, self._stream.fileno())
        finally:
            os.close(devnull)
        with contextlib.suppress(OSError):
            self._stream.flush()  # what was buffered goes to /dev/null

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


@contextlib.contextmanager
def output_may_hang_up() -> Iterator[None]:
    """sys.stdout and sys.stderr (those on a file descriptor) survive a terminal that goes away during a run."""
    previous = sys.stdout, sys.stderr
    try:
        sys.stdout, sys.stderr = (_DroppedOnHangup(s) if _on_descriptor(s) else s for s in previous)  # type: ignore[assignment]
        yield
    finally:
        sys.stdout, sys.stderr = previous


def _on_descriptor(stream: TextIO) -> bool:
    try:
        stream.fileno()
    except (OSError, ValueError):  # io.UnsupportedOperation: an in-memory stream (click's test runner)
        return False
    return True


def resume_note(output_dir: str | Path) -> str:
    """Which step the same command resumes from, read from the complete checkpoints on disk (never assumed)."""
    from lora_runtime import checkpoint

    newest = checkpoint.newest_complete(checkpoint.checkpoints_dir(output_dir))
    if newest is None:
        return f"no complete checkpoint in {Path(output_dir) / checkpoint.SUBDIR}: the same command starts from step 0"
    return f"the same command resumes from {newest} (step {checkpoint.step_of(newest)})"


def _send_fault_signals(spec: str) -> None:
    """Tests: `SIGNAL:TARGET,...` (see FAULT_SIGNALS_ENV)."""
    name, _, targets = spec.partition(":")
    sig = signal.Signals[name]
    for target in targets.split(","):
        if target == "launcher":
            os.kill(int(os.environ[LAUNCHER_PID_ENV]), sig)
        elif target == "group":
            os.killpg(os.getpgid(0), sig)
        elif target == "parent":
            os.kill(os.getppid(), sig)
        else:
            os.kill(os.getpid(), sig)
        time.sleep(0.3)


class _AnyRank:
    """Whether a flag is set on any rank: an all-reduce MAX under torch.distributed, the local flag otherwise. Under
    NCCL the answer is a step late unless `at_once`: reading the reduced flag at once (`.item()`) would make the host
    wait for the GPU to finish the step, every step; read a step later, its copy has long landed. Every rank reads
    the same reduction at the same step, so they all stop at the same one. `late` (default: under NCCL) is for
    tests."""

    def __init__(self, late: bool | None = None) -> None:
        self.late = late
        self._previous: HostCopy | None = None  # the last step's reduction, on its way to the host

    def __call__(self, flag: bool, *, at_once: bool = False) -> bool:
        import torch
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return flag
        on_gpu = dist.get_backend() == "nccl"
        t = to_device([1.0 if flag else 0.0], torch.float32, "cuda" if on_gpu else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        if at_once or not (on_gpu if self.late is None else self.late):
            self._previous = None
            return bool(t.item())
        previous, self._previous = self._previous, HostCopy(t)
        return previous is not None and bool(previous.tolist()[0])
