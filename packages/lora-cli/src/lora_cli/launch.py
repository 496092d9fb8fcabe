"""Launch `lora-cli train` under torchrun, so nobody has to remember the torchrun incantation.

`lora-cli train --gpus 8 ...` on one machine becomes

    python -m lora_cli.torchrun --nproc-per-node 8 --nnodes 1 --standalone -m lora_cli train --gpus 8 ...

and on node 1 of 2 with a rendezvous endpoint (`--nnodes 2 --rdzv-endpoint host0:29400`)

    python -m lora_cli.torchrun --nproc-per-node 8 --nnodes 2 --node-rank 1 --rdzv-backend c10d
        --rdzv-endpoint host0:29400 --rdzv-id lora-cli -m lora_cli train ...

(`lora_cli.torchrun` is torchrun, `python -m torch.distributed.run`, quiet on a stop; `--master-addr/--master-port`
instead of `--rdzv-endpoint` gives torchrun's static rendezvous, where `--node-rank` is required). Each worker re-runs
`train` with the options the user typed; it sees RANK/WORLD_SIZE in its environment and
trains in-process instead of launching again.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import signal
import subprocess
import sys
from dataclasses import dataclass

from lora_data.locks import held_descriptor
from lora_runtime.distributed import under_torchrun, visible_gpus

from lora_cli import orphans
from lora_cli.orphans import LAUNCHER_PID_ENV
from lora_cli.stop import EXIT_INTERRUPTED, resume_note, stop_signals

log = logging.getLogger("lora_cli")


class LaunchError(Exception):
    """A launch request that cannot work on this machine (too many GPUs, missing rendezvous, ...)."""


@dataclass(frozen=True)
class LaunchPlan:
    nproc_per_node: int
    nnodes: int = 1
    node_rank: int | None = None
    rdzv_id: str | None = None
    rdzv_endpoint: str | None = None
    master_addr: str | None = None
    master_port: int | None = None

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes


def needs_launch(plan: LaunchPlan) -> bool:
    return plan.world_size > 1 and not under_torchrun()


def check_devices(nproc_per_node: int, backend: str, visible: int | None = None) -> str:
    """"cuda" when enough GPUs are visible; "cpu" for gloo test runs (no GPU at all and an explicit peft backend).

    Raises LaunchError with the fix otherwise.
    """
    if visible is None:
        visible = visible_gpus()
    if nproc_per_node <= visible:
        return "cuda"
    where = os.environ.get("CUDA_VISIBLE_DEVICES")
    seen = f"{visible} GPU(s) are visible" + (f" (CUDA_VISIBLE_DEVICES={where})" if where is not None else "")
    if visible == 0 and backend == "peft":
        log.warning("no GPU is visible: running %d CPU processes with the gloo backend (a test setup, slow)",
                    nproc_per_node)
        return "cpu"
    if visible == 0:
        raise LaunchError(f"--gpus {nproc_per_node} asks for {nproc_per_node} GPUs but {seen}; to run "
                          f"{nproc_per_node} processes on the CPU (gloo, for testing) pass --backend peft")
    raise LaunchError(f"--gpus {nproc_per_node} asks for {nproc_per_node} GPUs but {seen}; pass --gpus {visible} "
                      "or fewer")


def torchrun_command(plan: LaunchPlan, train_args: list[str]) -> list[str]:
    """The full torchrun command line that re-invokes `lora-cli train` with `train_args` (torchrun through
    `lora_cli.torchrun`: a stop ends it without a traceback).

    >>> torchrun_command(LaunchPlan(2), ["--lora-r", "8"])[1:]
    ['-m', 'lora_cli.torchrun', '--nproc-per-node', '2', '--nnodes', '1', '--standalone', '-m', 'lora_cli', 'train', '--lora-r', '8']
    """
    cmd = [sys.executable, "-m", "lora_cli.torchrun", "--nproc-per-node", str(plan.nproc_per_node),
           "--nnodes", str(plan.nnodes)]
    if plan.rdzv_endpoint:
        if plan.node_rank is not None:
            cmd += ["--node-rank", str(plan.node_rank)]
        cmd += ["--rdzv-backend", "c10d", "--rdzv-endpoint", plan.rdzv_endpoint, "--rdzv-id", plan.rdzv_id or "lora-cli"]
    elif plan.master_addr or plan.master_port:
        if plan.nnodes > 1 and plan.node_rank is None:
            raise LaunchError("--master-addr/--master-port (static rendezvous) with --nnodes > 1 needs --node-rank "
                              "on every node (0 on the master); or use --rdzv-endpoint host:port instead")
        cmd += ["--node-rank", str(plan.node_rank or 0), "--master-addr", plan.master_addr or "127.0.0.1",
                "--master-port", str(plan.master_port or 29500)]
    elif plan.nnodes > 1:
        raise LaunchError(f"--nnodes {plan.nnodes} needs --rdzv-endpoint host:port (or --master-addr and "
                          "--master-port) so that the nodes can meet")
    else:
        cmd += ["--standalone"]  # single node: a local rendezvous on a free port, so parallel jobs never collide
    return [*cmd, "-m", "lora_cli", "train", *train_args]


def _worker_env(device: str) -> dict[str, str]:
    env = dict(os.environ)
    env[LAUNCHER_PID_ENV] = str(os.getpid())
    if device == "cpu":
        env["LORA_CLI_CPU_WORKERS"] = "1"  # workers log that they run gloo on the CPU
    if "NCCL_NVLS_ENABLE" in env:
        log.info("passing NCCL_NVLS_ENABLE=%s to the workers", env["NCCL_NVLS_ENABLE"])
    return env


def run_torchrun(plan: LaunchPlan, train_args: list[str], device: str, output_dir: str | None = None) -> int:
    """Run torchrun in the foreground; forward the first SIGINT/SIGTERM (a SIGHUP as SIGTERM) to it; return its exit
    code.

    torchrun passes the signal on to every worker, and the workers save a checkpoint before they exit; it gets a
    SIGTERM too when this process dies (a SIGKILL), and it holds `output_dir`'s lock as long as it lives. Where torchrun
    dies, its workers stop and are waited for here (lora_cli.orphans) before the lock goes. Repeats are not
    passed on: torchrun answers a second signal by sending SIGTERM to the workers, and a stop delivered twice (by the
    process group and by `uv run`, or by a scheduler to every process) must still save. The closing message names the
    step the next run resumes from, read from `output_dir`.

    On one node, a worker that ran out of memory in training step 1 of a plan the run chose asks (a request file in
    `output_dir`: lora_runtime.batching.request_relaunch) for every worker to start again under a lower budget; this
    starts torchrun again with it, as a single process plans again in place (at most MAX_REPLANS times in all).
    """
    from lora_runtime.batching import MAX_REPLANS, RELAUNCH_ENV, replan_note, take_relaunch_requests

    cmd = torchrun_command(plan, train_args)
    log.info("launching %d process(es) on this node (%d in all): %s", plan.nproc_per_node, plan.world_size,
             " ".join(cmd))
    env = _worker_env(device)
    # one node only: the launchers of other nodes would not start their workers again
    relaunch = output_dir if plan.nnodes == 1 else None
    if relaunch:
        env[RELAUNCH_ENV] = json.dumps({"limit": None, "failed": []})
        take_relaunch_requests(relaunch)  # none left from a launcher that was killed
    forwarded: list[str] = []
    proc: subprocess.Popen | None = None
    delivered: list[subprocess.Popen] = []  # the torchrun each got the first signal (never twice: see above)
    # torchrun holds the output dir's lock too: workers that outlive this process are never joined by a second run
    lock = held_descriptor(output_dir) if output_dir and plan.nnodes == 1 else None

    def deliver() -> None:
        if proc is not None and proc not in delivered:
            delivered.append(proc)
            proc.send_signal(signal.SIGTERM if forwarded[0] == "SIGHUP" else signal.Signals[forwarded[0]])

    adopted: list[int] = []  # the workers of a torchrun that was killed, handed to this process while they save

    def forward(signum: int, _frame: object) -> None:
        forwarded.append(signal.Signals(signum).name)
        if adopted:  # they got their stop from torchrun's death and ignore repeats
            if forwarded[-1] != "SIGINT":  # a scheduler's or a closed terminal's stop: the save goes on
                log.warning("got %s: the workers of the killed torchrun are already saving a checkpoint (Ctrl-C stops "
                            "them without it)", forwarded[-1])
                return
            log.warning("got SIGINT: stopping the workers of the killed torchrun without waiting for their checkpoint")
            for pid in adopted:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            return
        if len(forwarded) == 1:
            log.warning("got %s: asking the workers to save a checkpoint and stop", forwarded[-1])
            deliver()
        else:
            log.warning("got %s again: already stopping, the workers are writing the checkpoint (to abort without "
                        "it: kill -KILL %d)", forwarded[-1], proc.pid if proc is not None and proc.returncode is None
                        else os.getpid())

    previous = {s: signal.signal(s, forward) for s in stop_signals()}
    relaunches, killed = 0, None
    orphans.become_subreaper(True)
    stop_with_launcher = functools.partial(orphans.stop_with_parent, os.getpid(), orphans.prctl())
    try:
        while not (forwarded and proc is not None):  # after a stop, no torchrun starts again
            # Own process group: a Ctrl-C on the terminal reaches only this process, which forwards it exactly once.
            proc = subprocess.Popen(cmd, env=env, process_group=0, pass_fds=() if lock is None else (lock,),
                                    preexec_fn=stop_with_launcher)
            if forwarded:  # a stop that came while torchrun was being started again
                deliver()
            rc = proc.wait()
            unasked = rc < 0 and not forwarded  # killed, not stopped by a signal passed on from here
            codes = _wait_for_orphans(rc, adopted)
            if unasked:
                killed = codes
                break
            asked = take_relaunch_requests(relaunch) if relaunch and rc != 0 and not forwarded else None
            if asked is None:
                break
            env[RELAUNCH_ENV], ranks, request = asked
            relaunches += 1
            if relaunches > MAX_REPLANS:  # the workers count too; this bounds a launcher whatever they ask
                log.error("not starting the workers again: planned again for less memory %d times already",
                          MAX_REPLANS)
                break
            plan_failed, cause = request["failed"][-1]
            note = replan_note(plan_failed["micro"], cause, tuple(request["limit"]), len(request["failed"]),
                               "starting every worker again, planned for")
            log.warning("%s %s ran %s", "rank" if len(ranks) == 1 else "ranks", ", ".join(map(str, ranks)), note)
    finally:
        orphans.become_subreaper(False)
        for s, handler in previous.items():
            signal.signal(s, handler)
    where = f"; {resume_note(output_dir)}" if output_dir else ""
    if killed is not None:
        aborted = "SIGINT" in forwarded  # none came before the wait (unasked): a Ctrl-C while they saved
        what = ("its workers had exited" if not killed else "its workers stopped after saving a checkpoint"
                if all(c == EXIT_INTERRUPTED for c in killed) and not aborted else
                f"its workers stopped{' by SIGINT while saving' if aborted else ''} (exit codes "
                f"{' '.join(map(str, killed))})")
        log.warning("torchrun was killed by %s; %s%s", orphans.signal_name(-rc), what, where)
        return EXIT_INTERRUPTED
    if forwarded and rc != 0:
        log.warning("stopped by %s (torchrun exit code %d)%s", forwarded[0], rc, where)
        return EXIT_INTERRUPTED
    if rc != 0:  # torchrun stopped the other workers and printed the failed rank ("Root Cause ... rank: N") above
        log.error("a worker failed (torchrun exit code %d; its 'Root Cause' above names the rank); the run "
                  "stopped%s", rc, where or ". Run the same command again to resume from the last complete checkpoint")
    return rc


def _wait_for_orphans(rc: int, adopted: list[int]) -> list[int]:
    """After torchrun was killed (`rc` < 0): wait for its workers, handed to this process, which are saving a
    checkpoint (their PDEATHSIG); their exit codes. `adopted` lists them meanwhile, for a signal to abort them."""
    if rc >= 0 or sys.platform != "linux":
        return []
    adopted[:] = orphans.adopted_workers()
    if adopted:
        log.warning("torchrun was killed by %s: waiting for its %d worker(s) to save a checkpoint and stop (pid %s; "
                    "Ctrl-C stops them without it)", orphans.signal_name(-rc), len(adopted),
                    " ".join(map(str, adopted)))
    try:
        return orphans.wait_for(adopted)
    finally:
        adopted.clear()
