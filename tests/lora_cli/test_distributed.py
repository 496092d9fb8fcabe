"""The torchrun launch path for real, on the CPU: `--gpus 2 --backend peft` (2 gloo processes) and `--nnodes 2` as two
local "nodes" meeting at a localhost c10d rendezvous. Checks the rank split (E epochs over 2 ranks read every row E
times: tokens seen == E x the shards' tokens) and rank-0-only saving (one set of outputs, one metrics row per step).
The `--gpus 2` run is also stopped by a SIGTERM to the launcher, twice, and then to every process (as a scheduler would),
then resumed by the same command: every rank stops after the same step, the checkpoint is complete, and the resumed
run ends as a whole one. A SIGTERM to the launcher alone is passed on once (tests/lora_cli/test_launch.py); the two
"nodes" read raw JSONL (the `--shards` path of several ranks is the `--gpus 2` runs').
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import _tiny
import pytest
from lora_cli.stop import FAULT_SIGNALS_ENV, LAUNCHER_PID_ENV

pytestmark = pytest.mark.slow
TIMEOUT = 300
EPOCHS = 8


@pytest.fixture(scope="module")
def even_shards(tmp_path_factory, tiny_llama_dir) -> Path:
    """Shards with an even row count, so 2 ranks split an epoch exactly (no wrapped-around rows)."""
    import lora_data

    root = tmp_path_factory.mktemp("dist_data")
    for n in range(24, 60, 3):
        data = _tiny.write_jsonl(root / f"chat{n}.jsonl", _tiny.chat_records(n, seed=3))
        out = root / f"shards{n}"
        lora_data.prepare(data, out, tiny_llama_dir, max_seq_len=256)
        if len(lora_data.ShardReader(out)) % 2 == 0 and len(lora_data.ShardReader(out)) >= 4:
            return out
    raise AssertionError("no record count gave an even number of rows")


def _train_args(model: Path, shards: Path, out: Path, source: str = "--shards") -> list[str]:
    return ["--model", str(model), source, str(shards), "--output", str(out), "--backend", "peft",
            "--micro-batch-size", "1", "--num-epochs", str(EPOCHS), "--save-steps", "1000", "--no-bf16", "--seed", "0",
            "--learning-rate", "1e-3"]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    return env | {"CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1", "NCCL_NVLS_ENABLE": "0"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_outputs(out: Path, shards: Path, log: str) -> list[dict]:
    import lora_data

    manifest = json.loads((shards / "manifest.json").read_text())
    rows = len(lora_data.ShardReader(shards))
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m["step"] for m in metrics if "loss" in m]
    assert steps == list(range(1, EPOCHS * rows // 2 + 1)), f"one row per step, rank 0 only: {steps}\n{log[-3000:]}"
    reader = lora_data.ShardReader(shards)
    total_tokens = sum(int(reader[i].seq_lens.sum()) for i in range(len(reader)))
    seen = max(m.get("tokens_seen", 0) for m in metrics)
    assert seen == EPOCHS * total_tokens, f"2 ranks should read every row once an epoch: {seen} vs {total_tokens}"
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts and all(c.startswith("checkpoint-") for c in ckpts), ckpts  # no staging dirs left behind
    assert manifest  # the shard set the run read
    return metrics


def test_gpus_2_launches_two_gloo_processes_stops_on_sigterm_and_resumes(tiny_llama_dir, even_shards, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "lora_cli", "train", *_train_args(tiny_llama_dir, even_shards, out), "--gpus", "2"]
    # a stop delivered twice to the launcher (`uv run` without a terminal: the group's signal plus uv's copy), then a
    # scheduler signalling every process of the job: no repeat is passed on (before, the launcher passed every copy
    # on, torchrun answered the second with SIGTERM to the workers, and they aborted without saving while the message
    # still promised a checkpoint)
    first = subprocess.run(cmd, env=_env() | {FAULT_SIGNALS_ENV: "3:SIGTERM:launcher,launcher,group"},
                           capture_output=True, text=True, timeout=TIMEOUT)
    log = first.stdout + first.stderr
    assert first.returncode == 130, log[-5000:]
    assert "Traceback" not in log, log[-5000:]  # torchrun's SignalException (lora_cli.torchrun)
    assert "got SIGTERM: asking the workers to save a checkpoint and stop" in log
    assert "got SIGTERM again: already stopping, the workers are writing the checkpoint" in log
    stopped = re.findall(rf"stopped by SIGTERM after step (\d+); a checkpoint is saved in {out} \(checkpoint-\1\)",
                         log)
    assert len(stopped) == 1, log[-5000:]  # rank 0 reports once
    assert log.count("SIGTERM: stopping after this step and saving a checkpoint") == 1, log[-5000:]  # not per rank
    ckpt = out / "checkpoints" / f"checkpoint-{stopped[0]}"
    assert (ckpt / "COMPLETE").is_file()
    assert [p.name for p in (out / "checkpoints").iterdir()] == [ckpt.name]
    assert f"the same command resumes from {ckpt} (step {stopped[0]})" in log  # the launcher's closing line

    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    assert "running 2 CPU processes with the gloo backend" in log
    assert "--nproc-per-node 2 --nnodes 1 --standalone -m lora_cli train" in log
    assert "passing NCCL_NVLS_ENABLE=0 to the workers" in log
    assert f"resuming from {out / 'checkpoints' / ('checkpoint-' + stopped[0])}" in log
    assert log.count("adapter:  ") == 1  # rank 0 reports, rank 1 stays quiet
    _check_outputs(out, even_shards, log)


@pytest.mark.skipif(sys.platform != "linux", reason="a parent's death reaches its children through Linux's prctl")
@pytest.mark.parametrize("killed", ["launcher", "parent"])
def test_a_killed_launcher_or_torchrun_stops_the_workers(killed, tiny_llama_dir, even_shards, tmp_path):
    """A SIGKILL of `lora-cli train --gpus 2` (an OOM killer, a `kill -9` of the process the user sees), or of its
    torchrun. Before, the workers trained on, orphaned, with the output lock gone with the launcher: a second run of
    the same command trained into the same dir beside them. Now torchrun gets a SIGTERM when the launcher dies, and
    each worker when torchrun dies: they save a checkpoint and stop. torchrun holds the lock until it has exited; a
    launcher whose torchrun died waits for the workers before it names the checkpoint and lets the lock go (it said
    "a worker failed" and let go while they were still saving)."""
    import lora_data

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "lora_cli", "train", *_train_args(tiny_llama_dir, even_shards, out), "--gpus", "2"]
    with open(tmp_path / "launcher.log", "wb") as log:
        launcher = subprocess.Popen(cmd, env=_env() | {FAULT_SIGNALS_ENV: f"3:SIGKILL:{killed}"}, stdout=log,
                                    stderr=subprocess.STDOUT)
        rc = launcher.wait(timeout=TIMEOUT)
    if killed == "parent":
        assert _processes_with_env(LAUNCHER_PID_ENV, launcher.pid) == [], "the launcher exited before its workers"
        log = (tmp_path / "launcher.log").read_text()
        assert rc == 130, log[-3000:]
        assert "a worker failed" not in log, log[-3000:]
        newest = max((out / "checkpoints").iterdir(), key=lambda p: int(p.name.rpartition("-")[2]))
        assert (f"torchrun was killed by SIGKILL; its workers stopped after saving a checkpoint; the same command "
                f"resumes from {newest} (step {newest.name.rpartition('-')[2]})") in log, log[-3000:]
    deadline = time.monotonic() + 120
    while killed == "launcher":
        assert rc == -signal.SIGKILL
        try:
            with lora_data.locked(out, what="test"):
                left = _processes_with_env(LAUNCHER_PID_ENV, launcher.pid)
            assert left == [], f"processes of the killed launcher still run, and the lock is free: {left}"
            break
        except lora_data.LockedError:
            assert time.monotonic() < deadline, "torchrun still holds the lock 120 s after the launcher died"
            time.sleep(0.5)
    while _processes_with_env(LAUNCHER_PID_ENV, launcher.pid):
        assert time.monotonic() < deadline, "the workers still run 120 s after their parent died"
        time.sleep(0.5)
    log = (tmp_path / "launcher.log").read_text()
    saved = [p for p in (out / "checkpoints").iterdir() if (p / "COMPLETE").is_file()]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    planned = EPOCHS * len(lora_data.ShardReader(even_shards)) // 2
    assert saved and max(steps) < planned, (max(steps), planned, log[-3000:])  # a stop that saved, not a whole run


def _processes_with_env(name: str, value: int) -> list[int]:
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if f"{name}={value}".encode() in environ.read_bytes().split(b"\0"):
                found.append(int(environ.parent.name))
        except OSError:  # exited, or not ours to read
            pass
    return found


def _two_nodes(args: list[str], rdzv_id: str, env_for=lambda rank: {}) -> tuple[list[int], list[str], str]:
    """Two `lora-cli train --gpus 1 --nnodes 2` launchers at a localhost c10d rendezvous: (exit codes, logs, endpoint)."""
    endpoint = f"127.0.0.1:{_free_port()}"
    procs = [subprocess.Popen([sys.executable, "-m", "lora_cli", "train", *args, "--gpus", "1", "--nnodes", "2",
                               "--node-rank", str(rank), "--rdzv-endpoint", endpoint, "--rdzv-id", rdzv_id],
                              env=_env() | env_for(rank), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in (0, 1)]
    try:
        logs = [p.communicate(timeout=TIMEOUT)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [p.returncode for p in procs], logs, endpoint


def test_nnodes_2_as_two_local_nodes_on_raw_jsonl_with_a_cache_per_node(tiny_llama_dir, even_shards, tmp_path):
    """Two local "nodes" on the raw JSONL the even shards were prepared from, each with its own cache (not shared):
    rank 0 prepares on node 0, local rank 0 of node 1 prepares the same shards there after the barrier (instead of
    'prepared shards are missing'), and training goes on with the rank split and rank-0-only saving of `--gpus 2`."""
    data = even_shards.parent / f"chat{even_shards.name.removeprefix('shards')}.jsonl"
    out = tmp_path / "run"
    args = [*_train_args(tiny_llama_dir, data, out, source="--data"), "--max-seq-len", "256"]
    codes, logs, endpoint = _two_nodes(args, "raw-two-nodes",
                                       lambda rank: {"LORA_DATA_CACHE": str(tmp_path / f"cache{rank}")})
    log = "\n".join(logs)
    assert codes == [0, 0], log[-6000:]
    assert f"--nnodes 2 --node-rank 0 --rdzv-backend c10d --rdzv-endpoint {endpoint}" in logs[0]
    # c10d may give global rank 0 to either launcher: exactly one node prepares after the barrier
    assert sum("is not shared with rank 0's node; preparing it here" in node_log for node_log in logs) == 1, logs
    a, b = (next((tmp_path / f"cache{r}").iterdir()) for r in (0, 1))
    assert a.name == b.name
    assert (a / "shard-00000.bin").read_bytes() == (b / "shard-00000.bin").read_bytes()
    assert (a / "shard-00000.bin").read_bytes() == (even_shards / "shard-00000.bin").read_bytes()
    assert log.count("adapter:  ") == 1
    _check_outputs(out, a, log)


def test_a_dead_rank_stops_the_others_in_bounded_time_naming_it(tiny_llama_dir, even_shards, tmp_path):
    """Rank 1 is SIGKILLed after step 2 (a node losing a process): no hang, the launcher exits non-zero well inside
    the bound, torchrun's report names rank 1, and the launcher names the complete checkpoint the same command
    resumes from."""
    import time

    from lora_cli.stop import FAULT_KILL_RANK_ENV
    from lora_runtime import checkpoint

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "lora_cli", "train", *_train_args(tiny_llama_dir, even_shards, out), "--gpus", "2",
           "--save-steps", "1", "--max-steps", "4"]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, env=_env() | {FAULT_KILL_RANK_ENV: "1:2"}, capture_output=True, text=True,
                          timeout=TIMEOUT)
    took, log = time.monotonic() - t0, proc.stdout + proc.stderr
    assert proc.returncode not in (0, 130), log[-5000:]
    assert re.search(r"rank\s*:\s*1 \(local_rank\s*:\s*1\)", log) and "Signal 9 (SIGKILL)" in log, log[-5000:]
    assert "a worker failed" in log
    assert took < 240, f"took {took:.0f} s to notice a dead rank (a hang would last the 1800 s process-group timeout)"
    done = sorted(p.name for p in (out / "checkpoints").iterdir() if (p / "COMPLETE").is_file())
    assert done and done[-1] in ("checkpoint-1", "checkpoint-2"), done
    newest = out / "checkpoints" / done[-1]
    checkpoint.verify(newest)  # whole; resuming a 2-rank checkpoint with the same command: the SIGTERM test above
    assert f"the same command resumes from {newest} (step {done[-1].rpartition('-')[2]})" in log


# Loaded by every process of the run below through PYTHONPATH; acts in torchrun's workers only. On a CPU the batch
# plan has no memory estimate: `resolve` gives 2 rows with a 4 GiB estimate (1 GiB of it fixed) at the full budget
# and 1 row with 2 GiB under a lowered one, and writes down the limit it planned under. Rank 1 runs out of memory
# (torch.OutOfMemoryError raised in the model's forward) in training step 1 of a plan of 2 rows.
_OOM_SITE = '''
import os

if "RANK" in os.environ:
    import dataclasses, json

    import torch
    from lora_runtime import batching, loop
    from transformers import TrainerCallback

    def resolve(config, backend, rows):
        limit = batching._LOWERED.get()
        with open(os.environ["SEEN"], "a") as f:
            f.write(json.dumps({"rank": int(os.environ["RANK"]), "limit": limit}) + "\\n")
        micro = 2 if limit is None else 1
        plan = batching.fixed_plan(config, int(os.environ["WORLD_SIZE"]), micro, False)
        gib = batching.GIB * (4 if limit is None else 2)
        return dataclasses.replace(plan, estimated_peak_bytes=gib, estimated_fixed_bytes=gib / 4)

    class Fault(TrainerCallback):
        def __init__(self, micro):
            self.micro = micro

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            def hook(module, args):
                if module.training and self.micro == 2 and os.environ["RANK"] == "1" and state.global_step == 0:
                    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

            model.register_forward_pre_hook(hook)

    def train(config, plan, *args, **kwargs):
        callbacks = [*(config.callbacks or []), Fault(plan.micro)]
        return real_train(dataclasses.replace(config, callbacks=callbacks), plan, *args, **kwargs)

    batching.resolve, real_train, loop.train = resolve, loop.train, train
'''


def test_an_oom_in_step_1_on_one_rank_starts_every_worker_again_planned_for_less(tiny_llama_dir, even_shards,
                                                                                  tmp_path):
    """`--gpus 2` with micro_batch_size "auto": rank 1 runs out of memory in step 1 (rank 0 waits in the gradient
    all-reduce, so it cannot plan again alone); it asks the launcher, which starts torchrun again with the lower
    budget on every rank, and the run trains to the end on the smaller plan."""
    from lora_runtime.batching import CONTEXT_BYTES, FRAGMENTATION, GIB, RELAUNCH_REQUEST

    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_OOM_SITE)
    out, seen = tmp_path / "run", tmp_path / "seen.jsonl"
    args = [*_train_args(tiny_llama_dir, even_shards, out), "--micro-batch-size", "auto", "--max-steps", "3"]
    env = _env() | {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]), "SEEN": str(seen)}
    proc = subprocess.run([sys.executable, "-m", "lora_cli", "train", *args, "--gpus", "2"], env=env,
                          capture_output=True, text=True, timeout=TIMEOUT)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    need, activations = 4 * GIB * FRAGMENTATION + CONTEXT_BYTES, 3 * GIB * FRAGMENTATION
    limits = [json.loads(line) for line in seen.read_text().splitlines()]
    lowered = pytest.approx(need - 0.15 * activations)
    assert sorted(((r["limit"] or [0])[0], r["rank"]) for r in limits) == [(0, 0), (0, 1), (lowered, 0), (lowered, 1)]
    assert ("rank 1 ran out of memory in training step 1 with micro_batch_size 2 (CUDA out of memory. Tried to "
            "allocate 2.00 GiB): starting every worker again, planned for 4.8 GiB, the 5.3 GiB the plan that ran out "
            "of memory in step 1 needed, its 3.2 GiB of activations cut to 85% (re-plan 1 of at most 3)") in log
    resolved = json.loads((out / "lora_sft_config.json").read_text())["resolved"]
    assert resolved["micro_batch_size"] == 1
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3]
    assert (out / "adapter_model.safetensors").is_file()
    assert not list(out.glob(RELAUNCH_REQUEST.format(rank="*") + "*"))  # the request was taken
