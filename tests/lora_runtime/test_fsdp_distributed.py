"""FSDP2 for real, on the CPU: `lora-cli train --gpus 2 --sharding fsdp` (2 gloo ranks) against one process of the
same effective batch (2 ranks × micro 1 × accum 2 == 1 process × micro 1 × accum 4; fp32: the ranks' first
accumulation pass skips its reduce-scatter, the second reduces the sum). One 2-rank run serves every test
(each launch costs a minute of imports on 2 cores): rank 1 is SIGKILLed after step 3, and the same command resumes.

- the loss curve (steps 1-2 before the kill, 3-8 after the resume) and the final adapter equal the single process's
  (measured over 24 steps: 5e-6 on the loss, 2e-6 on the adapter; the reduce-scatter sums in another order than one
  process's backward), and the adapter is a plain PEFT adapter;
- the merged export from the sharded run is base + adapter;
- a 2-rank checkpoint resumes in ONE process (sharding="fsdp" on a 1-rank group) to the same adapter.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import _runs
import pytest
import torch
from lora_runtime import lora_sft
from lora_runtime.distributed import teardown
from lora_runtime.metrics import read_metrics
from safetensors.torch import load_file

pytestmark = pytest.mark.slow
TIMEOUT = 300
RUN = {**_runs.RUN, "max_steps": 8, "save_steps": 2, "save_total_limit": None, "gradient_accumulation_steps": 1,
       "micro_batch_size": 1, "effective_batch_size": 4, "bf16": False}
LOSS_TOL, ADAPTER_TOL = 1e-5, 1e-5


def _cli_args(model: Path, shards: Path, out: Path, **over) -> list[str]:
    args = ["--model", str(model), "--shards", str(shards), "--output", str(out)]
    for key, value in {**RUN, **over}.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else f"--no-{key.replace('_', '-')}")
        elif value is not None:
            args += [flag, ",".join(value) if isinstance(value, list) else str(value)]
    return args


def _train(model: Path, shards: Path, out: Path, *, gpus: int, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "lora_cli", "train", *_cli_args(model, shards, out, sharding="fsdp")]
    if gpus > 1:
        cmd += ["--gpus", str(gpus)]
    clean = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    return subprocess.run(cmd, env=clean | {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", **(env or {})},
                          capture_output=True, text=True, timeout=TIMEOUT)


def _losses(out: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]


def _assert_same_adapter(got_dir: Path, want_dir: Path) -> None:
    want, got = load_file(want_dir / "adapter_model.safetensors"), load_file(got_dir / "adapter_model.safetensors")
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=ADAPTER_TOL, rtol=0, msg=k)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_llama_dir, llama_shards) -> Path:
    """The reference: one process, no sharding, micro 1 × accum 4."""
    out = tmp_path_factory.mktemp("one_process")
    lora_sft(str(tiny_llama_dir), str(llama_shards), str(out), **RUN, sharding="ddp")
    return out


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, tiny_llama_dir, llama_shards) -> tuple[Path, str, str]:
    """(output dir, log of the killed launch, log of the resumed one)."""
    from lora_cli.stop import FAULT_KILL_RANK_ENV

    out = tmp_path_factory.mktemp("fsdp2") / "run"
    killed = _train(tiny_llama_dir, llama_shards, out, gpus=2, env={FAULT_KILL_RANK_ENV: "1:3"})
    again = _train(tiny_llama_dir, llama_shards, out, gpus=2)
    assert again.returncode == 0, (again.stdout + again.stderr)[-5000:]
    return out, killed.stdout + killed.stderr, again.stdout + again.stderr


def test_a_sigkilled_fsdp_rank_resumes_and_the_run_equals_one_process(one_process, two_ranks, tiny_llama_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, killed, resumed = two_ranks
    assert "Signal 9 (SIGKILL)" in killed and "a worker failed" in killed, killed[-5000:]
    assert killed.count("sharding: FSDP2 over 2 rank(s), 2 decoder layers + root; fp32 throughout") == 1
    assert "batch: micro 1 × 2 processes × accumulation 2 = effective 4 rows/step" in resumed
    assert f"resuming from {out / 'checkpoints' / 'checkpoint-2'}" in resumed  # step 3 died before its checkpoint
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r] == list(range(1, 9))
    assert _losses(out) == pytest.approx(_losses(one_process), abs=LOSS_TOL)
    _assert_same_adapter(out, one_process)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, out)  # a plain PEFT adapter
    assert sum("lora_" in n for n, _ in model.named_parameters()) == len(load_file(out / "adapter_model.safetensors"))


def test_merged_export_from_a_sharded_run_is_base_plus_adapter(two_ranks, tiny_llama_dir, tmp_path):
    from lora_runtime.merge import merge_adapter
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = two_ranks[0]
    merged = merge_adapter(out, tiny_llama_dir, tmp_path / "merged")
    ids = torch.tensor([[5, 17, 123, 400, 9, 77, 301, 64]])
    with torch.no_grad():
        want = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32),
                                         out)(input_ids=ids).logits
        got = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_a_two_rank_checkpoint_resumes_in_one_process(one_process, two_ranks, tiny_llama_dir, llama_shards, tmp_path,
                                                       capsys):
    """checkpoint-4 of the 2-rank run (LoRA weights and AdamW state gathered, data position per rank) → one process,
    micro 1 × accum 4: the same rows per step, so the same last 4 losses and the same adapter."""
    src = two_ranks[0]
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(src / "checkpoints" / "checkpoint-4", out / "checkpoints" / "checkpoint-4")
    shutil.copy(src / "metrics.jsonl", out / "metrics.jsonl")

    try:  # in this process (no torchrun): sharding="fsdp" on a 1-rank group
        lora_sft(str(tiny_llama_dir), str(llama_shards), str(out), **RUN, sharding="fsdp")
    finally:
        teardown()
    log = capsys.readouterr().out
    assert f"resuming from {out / 'checkpoints' / 'checkpoint-4'}" in log and "sharding: FSDP2 over 1 rank(s)" in log
    assert "batch: micro 1 × 1 process × accumulation 4 = effective 4 rows/step" in log
    assert json.loads((out / "checkpoints" / "checkpoint-8" / "data_state.json").read_text())["world_size"] == 1
    assert _losses(out)[-4:] == pytest.approx(_losses(one_process)[-4:], abs=LOSS_TOL)
    _assert_same_adapter(out, one_process)
