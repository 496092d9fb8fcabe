"""torchrun environment: RANK / LOCAL_RANK / WORLD_SIZE, process-group init and teardown, `print0`, and what
nproc_per_node="auto" means in this process.

gloo on CPU (without a process group, torchrun's ranks would silently train alone), nccl on CUDA. Only rank 0
writes files and prints.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

JOIN_NOTE_S = 60.0  # a rank still joining the process group after this long says what it waits for


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1  # processes on this node (they share its host memory)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_env() -> DistEnv:
    """Read torchrun's variables; a plain `python script.py` is rank 0 of 1."""
    return DistEnv(int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
                   int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def under_torchrun() -> bool:
    """True inside a torchrun worker (RANK and WORLD_SIZE are set): never launch a second torchrun from there."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def visible_gpus() -> int:
    """GPUs this process can use; CUDA_VISIBLE_DEVICES="" (or -1) answers 0 without importing torch (10 s here)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", "x").strip() in ("", "-1"):
        return 0
    import torch

    return torch.cuda.device_count()


def auto_nproc_per_node(visible: Callable[[], int] | None = None) -> tuple[int, str]:
    """(processes, why) for nproc_per_node="auto": under torchrun the processes it started on this node
    (LOCAL_WORLD_SIZE), else one per visible GPU (`visible`, default `visible_gpus`), at least one."""
    if under_torchrun():
        n = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
        return n, f"torchrun started {n} process{'es' if n != 1 else ''} on this node"
    n = (visible or visible_gpus)()
    if n == 0:
        return 1, "no GPU visible: one process"
    return n, f"{n} visible GPU{'s' if n != 1 else ''}"


def check_launch(config: Any) -> DistEnv:
    """Refuse distributed settings that would silently be no-ops (training-hub accepts and ignores them).

    nproc_per_node x nnodes > 1 without torchrun's WORLD_SIZE would train one process alone; under torchrun,
    a WORLD_SIZE other than the one asked for means the launch and the config disagree.
    """
    from lora_runtime.config import ConfigError

    env = dist_env()
    asked = (config.nproc_per_node or 1) * (config.nnodes or 1)
    if asked > 1 and "WORLD_SIZE" not in os.environ:
        per_node, nodes = config.nproc_per_node or 1, config.nnodes or 1
        raise ConfigError([f"nproc_per_node={per_node} x nnodes={nodes} asks for {asked} processes, but this process "
                           "was not started by torchrun: run `lora-cli train ...` (it launches torchrun) or "
                           f"`torchrun --nproc-per-node {per_node} --nnodes {nodes} your_script.py`"])
    if asked > 1 and env.world_size != asked:
        raise ConfigError([f"torchrun started WORLD_SIZE={env.world_size} processes but the config asks for {asked} "
                           f"(nproc_per_node={config.nproc_per_node} x nnodes={config.nnodes or 1}); make them agree"])
    if config.enable_model_splitting and env.world_size > 1:
        raise ConfigError([f"enable_model_splitting=True spreads one model over every visible GPU from ONE process, "
                           f"but torchrun started {env.world_size}: run it as a plain `python script.py` (or "
                           "`lora-cli train` without --gpus), or drop enable_model_splitting for data parallelism"])
    return env


def init_process_group() -> DistEnv:
    """Join the process group when WORLD_SIZE > 1 (idempotent); pins the CUDA device to LOCAL_RANK."""
    env = dist_env()
    if env.world_size <= 1:
        return env
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        if missing := [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]:
            from lora_runtime.config import ConfigError

            raise ConfigError([f"RANK={os.environ.get('RANK')} and WORLD_SIZE={env.world_size} are set in the "
                               f"environment but {' and '.join(missing)} not: this process was not started by "
                               "torchrun. Unset RANK and WORLD_SIZE (left from another job?) to train in one process, "
                               "or launch it with `lora-cli train --gpus N`"])
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(env.local_rank)
        note = threading.Timer(JOIN_NOTE_S, lambda: print(f"[lora_runtime] {join_note(env)}", file=sys.stderr,
                                                          flush=True))
        note.daemon = True
        note.start()
        try:
            with _stops_end_the_join():
                dist.init_process_group(backend=backend)
        finally:
            note.cancel()
        print0(f"process group: {backend}, world size {env.world_size}")
    return env


@contextlib.contextmanager
def _stops_end_the_join() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP end the process while it joins the process group: torch waits there in C++, where
    no Python handler runs (a Ctrl-C did nothing for the whole timeout), and nothing is trained yet to save. An
    ignored signal (nohup's SIGHUP) stays ignored; off the main thread nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    import signal

    stops = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP]
    previous = {s: signal.getsignal(s) for s in stops}
    for s, handler in previous.items():
        if handler is not signal.SIG_IGN:
            signal.signal(s, signal.SIG_DFL)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


def join_note(env: DistEnv) -> str:
    """What a rank that has waited JOIN_NOTE_S to join the process group says: torch waits its whole timeout (10 to
    30 minutes) in silence, as when RANK and WORLD_SIZE are left in a shell from another job."""
    note = (f"rank {env.rank} of {env.world_size} still waits for the other ranks at {os.environ.get('MASTER_ADDR')}:"
            f"{os.environ.get('MASTER_PORT')} after {JOIN_NOTE_S:.0f} s")
    if "TORCHELASTIC_RUN_ID" not in os.environ:  # torchrun sets it for its workers
        note += ("; RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT come from the environment, not from torchrun: if "
                 "they are left from another job, stop this (Ctrl-C), unset them and run again")
    return note


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def teardown() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(value: float) -> float:
    """Sum a number over ranks (identity in a single process)."""
    return _all_reduce(value, "SUM")


def all_reduce_min(value: float) -> float:
    """The smallest value over ranks (identity in a single process); joins the process group if needed."""
    init_process_group()
    return _all_reduce(value, "MIN")


def _all_reduce(value: float, op: str) -> float:
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=getattr(dist.ReduceOp, op))
    return float(t.item())


class HostCopy:
    """A tensor's copy to the host, started without waiting for the device: on a GPU into pinned memory, ordered on
    the current stream behind the work that produces the tensor, with an event that says when it has landed. Read it
    a step later and the host never waits for the GPU (reading a device value at once, `.item()`, would)."""

    def __init__(self, tensor: Any) -> None:
        import torch

        on_gpu = tensor.device.type == "cuda"
        self.host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=on_gpu)
        self.host.copy_(tensor, non_blocking=on_gpu)
        self.event = None
        if on_gpu:
            self.event = torch.cuda.Event()
            self.event.record()

    def landed(self) -> bool:
        return self.event is None or bool(self.event.query())

    def tolist(self) -> list:
        """The values (waits for the copy where it has not landed yet)."""
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()


def to_device(values: list[float], dtype: Any, device: Any) -> Any:
    """Host numbers as a tensor on `device`, copied without the host waiting (pinned memory on a GPU)."""
    import torch

    on_gpu = torch.device(device).type == "cuda"
    return torch.tensor(values, dtype=dtype, pin_memory=on_gpu).to(device, non_blocking=on_gpu)


def print0(*parts: object) -> None:
    """Print on rank 0 only (stdout, prefixed `[lora_runtime]`); other ranks stay quiet."""
    if dist_env().is_main:
        print("[lora_runtime]", *parts, flush=True)
