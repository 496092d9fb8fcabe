"""Scenarios over several GPUs of one machine (and the card's ceilings): each runs one harness module that launches
its own processes (`lora-cli train --gpus N` under torchrun, or one process over all GPUs)."""

from __future__ import annotations

from benchmarks.gpu import sides
from benchmarks.gpu.runner import Session


def visible_gpus(s: Session) -> int:
    """GPUs on this machine, from the card line ('NVIDIA H200 x4'); 1 on a CPU."""
    try:
        return int(s.card.rsplit("x", 1)[1])
    except (IndexError, ValueError):
        return 1


def _gpus(s: Session) -> int:
    return s.a.gpus or visible_gpus(s)


def _qwen(s: Session) -> tuple:
    s.define("build_qwen1.5b", sides.build("qwen1.5b"))
    s.want("build_qwen1.5b", ["build_qwen1.5b"])
    return (lambda s_, res: sides.model_dir(s_, "qwen1.5b"), lambda s_, res: s_.data / "shards_qwen1.5b_2048")


def _rows_of(s: Session, scenario: str, key: str, role: str = "ours", **fields) -> list[dict]:
    proc = s.procs.get(key)
    if not proc or not proc.payloads:
        return [s.row(scenario, key, None, key, role, **fields)]
    return [s.row(scenario, key, name, name, role, **fields) for name in proc.payloads]


def ddp_scaling_plan(s: Session) -> None:
    """Data parallel, `lora-cli train --gpus N` against `--gpus 1` with the same effective batch (1 GPU accumulates
    what N do at once), micro 8 a GPU, Qwen2.5-1.5B shape: all-rank tokens/s (median per step after step 5 from
    metrics.jsonl), scaling efficiency tok/s(N) / (N x tok/s(1)), and the largest loss gap to the 1-GPU curve."""
    model, shards = _qwen(s)
    n = _gpus(s)
    s.define("ddp", sides.module("scaling", model, shards, lambda s_, res: res, "--gpus", f"1,{n}", "--backend",
                                 "unsloth", "--fallback", "peft", "--ebs", str(8 * n), "--micro", "8", "--steps", "20",
                                 "--logs", lambda s_, res: s_.work / "logs"))
    s.want("ddp", ["ddp"])


def ddp_scaling_rows(s: Session) -> list[dict]:
    return _rows_of(s, "ddp-scaling", "ddp", feed="lora-data shards, rows of 2048", config={"micro_per_gpu": 8})


def resume_plan(s: Session) -> None:
    """Reliability under `lora-cli train --gpus 2`: a resumed run's losses against an uninterrupted one (steps 11-20),
    and a rank SIGKILLed after step 5: the launcher exits non-zero naming the rank, the same command resumes."""
    model, shards = _qwen(s)
    s.define("resume", sides.module("resume", model, shards, lambda s_, res: res, "--gpus", "2",
                                    "--work", lambda s_, res: s_.work / "resume"))
    s.want("resume", ["resume"])


def resume_rows(s: Session) -> list[dict]:
    return _rows_of(s, "resume-dead-rank", "resume", config={"gpus": 2, "micro_per_gpu": 8})


def _llama70b_args(s: Session) -> list:
    return ["--tok", s.data / "tok_llama8b", "--shards", s.data / "shards_llama8b_8192"]


def splitting_plan(s: Session) -> None:
    """A Llama-3.1-70B-shaped model (random bf16 weights, 141 GB) that one H200 cannot train, with
    `lora_sft(enable_model_splitting=True)` over every GPU of one process: 8,192-token rows, micro 1, checkpointing
    on; the arithmetic of why one GPU is not enough, tokens/s and the peak of each GPU."""
    s.define("split", sides.module("split", lambda s_, res: res, *_llama70b_args(s), "--steps", "8", "--budget-s",
                                   "540"))
    s.want("split", ["split"])


def splitting_rows(s: Session) -> list[dict]:
    return _rows_of(s, "model-splitting", "split", config={"micro_batch_size": 1, "gradient_checkpointing": True})


def fsdp_plan(s: Session) -> None:
    """The same 70B shape at 8k context sharded with FSDP (`lora-cli train --sharding fsdp --gpus N`) against
    model splitting on the same weights in the same invocation (fsdp.py)."""
    s.define("fsdp", sides.module("fsdp", lambda s_, res: res, *_llama70b_args(s), "--gpus", str(_gpus(s)),
                                  "--steps", "8", "--budget-s", "1500", cap_s=1700))
    s.want("fsdp", ["fsdp"])


def fsdp_rows(s: Session) -> list[dict]:
    out = _rows_of(s, "fsdp", "fsdp", config={"micro_batch_size": 1, "gradient_checkpointing": True})
    for r in out:
        r["role"] = "peer" if r["name"].startswith("split") else "ours"
    return out


def ceilings_plan(s: Session) -> None:
    """The card's two ceilings: a bf16 8192³ matmul (TFLOP/s) and a 2 GiB device-to-device copy (TB/s)."""
    s.define("ceilings", sides.Side(lambda s_, runs, res, cap: [sides.PY, "benchmarks/gpu/ceilings.py",
                                                               res / "ceilings.json"],
                                    cap_s=120, run_field=None, family="ceilings"))
    s.want("ceilings", ["ceilings"])


def ceilings_rows(s: Session) -> list[dict]:
    payload, _ = s.result("ceilings")
    row = s.row("ceilings", "ceilings", None, "bf16 matmul and device copy", "card")
    row.update({k: payload.get(k) for k in ("bf16_matmul_tflops", "copy_tb_s")})
    return [row]


SCENARIOS = {
    "ddp-scaling": (ddp_scaling_plan, ddp_scaling_rows),
    "resume-dead-rank": (resume_plan, resume_rows),
    "model-splitting": (splitting_plan, splitting_rows),
    "fsdp": (fsdp_plan, fsdp_rows),
    "ceilings": (ceilings_plan, ceilings_rows),
}
