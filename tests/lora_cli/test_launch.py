"""The torchrun command line, the device check and the already-under-torchrun guard (no processes started here)."""

from __future__ import annotations

import sys

import pytest
from lora_cli.launch import LaunchError, LaunchPlan, check_devices, needs_launch, torchrun_command, under_torchrun

TAIL = ["-m", "lora_cli", "train", "--lora-r", "8"]


def test_single_node_uses_a_standalone_rendezvous():
    cmd = torchrun_command(LaunchPlan(8), ["--lora-r", "8"])
    assert cmd == [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "8", "--nnodes", "1",
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
