"""The torchrun command line, the device check and the already-under-torchrun guard (no processes started here), and
the launcher starting torchrun again after an out-of-memory error in step 1 (a small script stands in for torchrun)."""

from __future__ import annotations

import json
import os
import signal
import sys

import pytest
from lora_cli.launch import LaunchError, LaunchPlan, check_devices, needs_launch, torchrun_command, under_torchrun

TAIL = ["-m", "lora_cli", "train", "--lora-r", "8"]


def test_single_node_uses_a_standalone_rendezvous():
    cmd = torchrun_command(LaunchPlan(8), ["--lora-r", "8"])
    assert cmd == [sys.executable, "-m", "lora_cli.torchrun", "--nproc-per-node", "8", "--nnodes", "1",
                   "--standalone", *TAIL]


def test_multi_node_c10d_rendezvous():
    cmd = torchrun_command(LaunchPlan(8, nnodes=2, node_rank=1, rdzv_endpoint="node0:29400", rdzv_id="job7"),
                           ["--lora-r", "8"])
    assert cmd[3:] == ["--nproc-per-node", "8", "--nnodes", "2", "--node-rank", "1", "--rdzv-backend", "c10d",
                       "--rdzv-endpoint", "node0:29400", "--rdzv-id", "job7", *TAIL]


def test_multi_node_static_rendezvous_needs_node_rank():
    cmd = torchrun_command(LaunchPlan(8, nnodes=2, node_rank=0, master_addr="10.0.0.1", master_port=29500), [])
    assert cmd[3:-3] == ["--nproc-per-node", "8", "--nnodes", "2", "--node-rank", "0", "--master-addr", "10.0.0.1",
                         "--master-port", "29500"]
    with pytest.raises(LaunchError, match="needs --node-rank"):
        torchrun_command(LaunchPlan(8, nnodes=2, master_addr="10.0.0.1"), [])


def test_multi_node_without_any_rendezvous_is_refused():
    with pytest.raises(LaunchError, match="--nnodes 2 needs --rdzv-endpoint"):
        torchrun_command(LaunchPlan(8, nnodes=2), [])


def test_launch_only_outside_torchrun(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not under_torchrun()
    assert needs_launch(LaunchPlan(2)) and needs_launch(LaunchPlan(1, nnodes=2)) and not needs_launch(LaunchPlan(1))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert under_torchrun() and not needs_launch(LaunchPlan(2))


def test_too_many_gpus_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(LaunchError) as e:
        check_devices(8, "auto", visible=2)
    assert str(e.value) == ("--gpus 8 asks for 8 GPUs but 2 GPU(s) are visible (CUDA_VISIBLE_DEVICES=0,1); "
                            "pass --gpus 2 or fewer")
    assert check_devices(2, "auto", visible=2) == "cuda"


def test_no_gpu_runs_cpu_workers_only_with_explicit_peft(caplog):
    with pytest.raises(LaunchError, match="pass --backend peft"):
        check_devices(2, "auto", visible=0)
    with caplog.at_level("WARNING", logger="lora_cli"):
        assert check_devices(2, "peft", visible=0) == "cpu"
    assert "running 2 CPU processes with the gloo backend" in caplog.text


def test_empty_cuda_visible_devices_means_no_gpu_without_torch(monkeypatch):
    from lora_cli.launch import visible_gpus

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus() == 0
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert visible_gpus() == 0


# Stands in for torchrun in the tests below: the first start (or every start, with "always") leaves the request a
# worker that ran out of memory in step 1 leaves, and fails; a later one waits to be stopped.
_FAKE_TORCHRUN = '''
import os, sys, time
from lora_runtime.batching import BatchPlan, request_relaunch

out, mode = sys.argv[1], sys.argv[2]
with open(os.path.join(out, "starts"), "a") as f:
    f.write(os.environ["LORA_RUNTIME_RELAUNCH"] + "\\n")
if mode == "always" or len(open(os.path.join(out, "starts")).readlines()) == 1:
    request_relaunch(out, 1, (4.0 * 2**30, "lower"), [(BatchPlan(2, 1, 2, False, 8.0 * 2**30), "CUDA out of memory")])
    sys.exit(1)
time.sleep(60)
'''


def _fake_torchrun(monkeypatch, tmp_path, mode: str) -> tuple[list, list]:
    """run_torchrun's torchrun replaced by _FAKE_TORCHRUN; returns the processes it started and (process index,
    signal) of every signal sent to them."""
    import subprocess

    from lora_cli import launch

    script = tmp_path / "fake_torchrun.py"
    script.write_text(_FAKE_TORCHRUN)
    (tmp_path / "out").mkdir()
    monkeypatch.setattr(launch, "torchrun_command", lambda plan, args: [sys.executable, str(script),
                                                                        str(tmp_path / "out"), mode])
    started, sent = [], []
    real = subprocess.Popen

    class Recorded(real):
        def __init__(self, *args, **kwargs):
            started.append(self)
            if mode == "stop" and len(started) == 2:  # the stop arrives while torchrun is being started again
                os.kill(os.getpid(), signal.SIGTERM)
            super().__init__(*args, **kwargs)

        def send_signal(self, sig):
            sent.append((started.index(self), sig))
            super().send_signal(sig)

    monkeypatch.setattr(subprocess, "Popen", Recorded)
    return started, sent


def test_a_stop_while_torchrun_starts_again_reaches_the_new_one_once(monkeypatch, tmp_path, caplog):
    from lora_cli.launch import run_torchrun
    from lora_cli.stop import EXIT_INTERRUPTED

    started, sent = _fake_torchrun(monkeypatch, tmp_path, "stop")
    assert run_torchrun(LaunchPlan(2), [], "cpu", str(tmp_path / "out")) == EXIT_INTERRUPTED
    assert len(started) == 2 and [s for s in sent if s[0] == 1] == [(1, signal.SIGTERM)]
    assert started[1].returncode == -signal.SIGTERM  # stopped, not left to sleep
    assert "rank 1 ran out of memory in training step 1 with micro_batch_size 2 (CUDA out of memory)" in caplog.text
    assert "stopped by SIGTERM (torchrun exit code -15)" in caplog.text  # passed on from here: not "was killed"
    assert "torchrun was killed" not in caplog.text


def test_the_launcher_starts_torchrun_again_at_most_max_replans_times(monkeypatch, tmp_path, caplog):
    from lora_cli.launch import run_torchrun
    from lora_runtime.batching import MAX_REPLANS

    started, _ = _fake_torchrun(monkeypatch, tmp_path, "always")
    assert run_torchrun(LaunchPlan(2), [], "cpu", str(tmp_path / "out")) == 1
    assert len(started) == MAX_REPLANS + 1
    assert f"not starting the workers again: planned again for less memory {MAX_REPLANS} times already" in caplog.text
    envs = [json.loads(line) for line in (tmp_path / "out" / "starts").read_text().splitlines()]
    assert envs[0] == {"limit": None, "failed": []} and envs[1]["limit"] == [4.0 * 2**30, "lower"]


@pytest.mark.parametrize("before", [signal.SIG_IGN, signal.SIG_DFL])
def test_a_hangup_stops_the_run_unless_it_is_ignored_as_under_nohup(monkeypatch, before):
    import subprocess

    from lora_cli import launch

    monkeypatch.setattr(launch, "torchrun_command", lambda plan, args: [sys.executable, "-c", "pass"])
    seen = []
    real = subprocess.Popen

    class Recorded(real):
        def __init__(self, *args, **kwargs):
            seen.append(signal.getsignal(signal.SIGHUP))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", Recorded)
    previous = signal.signal(signal.SIGHUP, before)
    try:
        assert launch.run_torchrun(LaunchPlan(2), [], "cpu") == 0
        assert signal.getsignal(signal.SIGHUP) == before  # put back
    finally:
        signal.signal(signal.SIGHUP, previous)
    assert (seen[0] == signal.SIG_IGN) == (before == signal.SIG_IGN), seen  # nohup's choice kept; else a stop


@pytest.mark.skipif(sys.platform != "linux", reason="PDEATHSIG is Linux's prctl")
@pytest.mark.parametrize("torchrun_dead", [True, False])
def test_a_worker_whose_torchrun_died_during_its_start_stops_at_once(torchrun_dead):
    """A worker arms its PDEATHSIG first thing; where torchrun died before that (the worker was handed to the launcher,
    here this test process), the SIGTERM would never come: it stops itself. It armed after seconds of imports."""
    import subprocess

    from lora_cli.orphans import LAUNCHER_PID_ENV

    env = os.environ | {"LOCAL_RANK": "0", LAUNCHER_PID_ENV: str(os.getpid() if torchrun_dead else 1 << 22)}
    # the module torchrun runs in each worker (here without arguments: usage), then the signal armed (PR_GET_PDEATHSIG)
    code = ("import ctypes\ntry:\n    import lora_cli.__main__\nexcept SystemExit:\n    pass\n"
            "armed = ctypes.c_int()\nctypes.CDLL(None).prctl(2, ctypes.byref(armed))\nprint('armed', armed.value)")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    if torchrun_dead:
        assert proc.returncode == -signal.SIGTERM, proc.stderr
        assert "Usage" not in proc.stderr + proc.stdout  # stopped before the command line was read
    else:
        assert proc.returncode == 0 and "Usage" in proc.stderr, proc.stderr  # went on to main()
        assert f"armed {int(signal.SIGTERM)}" in proc.stdout, proc.stdout  # a SIGTERM when torchrun dies


# Stands in for a torchrun that is killed while its worker saves: the worker (its command line names lora_cli, as
# torchrun's workers' do) ignores SIGTERM and takes long, as a save that hangs would
_KILLED_TORCHRUN = '''
import os, signal, subprocess, sys, time

ready = sys.argv[1]
code = "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)"
worker = subprocess.Popen([sys.executable, "-c", code, "lora_cli"])
with open(ready, "w") as f:
    f.write(str(worker.pid))
os.kill(os.getpid(), signal.SIGKILL)
'''


@pytest.mark.skipif(sys.platform != "linux", reason="a child subreaper is Linux's prctl")
def test_the_workers_of_a_killed_torchrun_are_waited_for_and_a_ctrl_c_stops_them(monkeypatch, tmp_path, caplog):
    """torchrun killed: its workers are handed to the launcher, which waits for them (they save) before it names the
    checkpoint and lets the lock go; a scheduler's SIGTERM meanwhile lets the save go on, a Ctrl-C stops them (it was
    passed to the dead torchrun, and the wait went on for good)."""
    import threading
    import time
    from pathlib import Path

    from lora_cli import launch
    from lora_cli.stop import EXIT_INTERRUPTED

    script, ready = tmp_path / "killed_torchrun.py", tmp_path / "ready"
    script.write_text(_KILLED_TORCHRUN)
    monkeypatch.setattr(launch, "torchrun_command", lambda plan, args: [sys.executable, str(script), str(ready)])

    def ctrl_c_once_adopted() -> None:
        while not ready.exists() or not ready.read_text():
            time.sleep(0.05)
        stat = Path(f"/proc/{ready.read_text()}/stat")
        deadline = time.monotonic() + 30
        while stat.exists() and int(stat.read_text().rpartition(")")[2].split()[1]) != os.getpid():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.5)  # the launcher lists it among the workers it waits for
        os.kill(os.getpid(), signal.SIGTERM)  # a scheduler's stop: the save goes on
        time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGINT)

    helper = threading.Thread(target=ctrl_c_once_adopted, daemon=True)
    helper.start()
    t0 = time.monotonic()
    assert launch.run_torchrun(LaunchPlan(2), [], "cpu", str(tmp_path / "out")) == EXIT_INTERRUPTED
    assert time.monotonic() - t0 < 60  # not the worker's 120 s
    worker = int(ready.read_text())
    assert not Path(f"/proc/{worker}").exists()  # reaped
    assert f"waiting for its 1 worker(s) to save a checkpoint and stop (pid {worker}" in caplog.text
    assert "got SIGTERM: the workers of the killed torchrun are already saving a checkpoint" in caplog.text
    assert "got SIGINT: stopping the workers of the killed torchrun without waiting for their checkpoint" in caplog.text
    assert ("torchrun was killed by SIGKILL; its workers stopped by SIGINT while saving (exit codes -9); no complete "
            "checkpoint") in caplog.text
