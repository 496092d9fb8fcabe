"""The kinds of measurement process a scenario can ask for, and how each is launched (see runner.Side).

Model weights are random bf16 tensors built from a shape's config on the device and saved, so every side loads them
through the users' `from_pretrained` path; tokenizer, records and lora-data shards come prepared from DATA
(`python -m benchmarks.gpu prepare DATA` on a CPU machine: the device needs no polars).
"""

from __future__ import annotations

from benchmarks.gpu.runner import PY, Session, Side

# Lanes: with --lanes N the groups below are spread over N GPUs of one machine (one GPU each, run side by side);
# the processes of a group run one after another, so a warm process follows its cold one.
# The order without lanes: what a budget needs most first (training-hub, never the fastest peer, last).
GROUPS = [["ours", "ours_warm", "ours_card"], ["ours_peft"], ["loop", "loop_warm"],
          ["build_llama8b", "ours8b", "loop8b"], ["parity_ours", "parity_ours_compile", "parity_trl"], ["th", "th_b8"]]
ORDER = ["build_qwen1.5b", "build_tiny", "ours", "ours_peft", "loop", "ours_card", "build_llama8b", "ours8b", "loop8b",
         "parity_ours", "parity_ours_compile", "parity_trl", "ours_warm", "loop_warm", "th", "th_b8"]


def model_dir(s: Session, shape: str):
    return s.work / "models" / shape


def build(shape: str) -> Side:
    def argv(s: Session, runs, res, cap):
        code = (f"from benchmarks.gpu import common; common.build_model({shape!r}, {str(model_dir(s, shape))!r}, "
                f"{str(s.data / ('tok_' + shape))!r})")
        return [PY, "-c", code]

    return Side(argv, cap_s=240, run_field=None, family="build", est_s=40)


def ours(shape: str, seq_len: int, steps: int | None = None, variant: str = "") -> Side:
    """`lora_sft` on the shards (`shards_{shape}_{seq_len}{variant}`), several runs in one process (ours.py)."""
    def argv(s: Session, runs, res, cap):
        n = steps or s.a.steps + s.a.warmup + 1
        shards = s.data / f"shards_{shape}_{seq_len}{variant}"
        return [PY, "-m", "benchmarks.gpu.ours", model_dir(s, shape), shards, res,
                "--runs", ",".join(runs), "--steps", n, "--warmup", min(s.a.warmup, n - 2), "--shape", shape,
                "--seq-len", seq_len, "--budget-s", max(10, cap - 40)]

    return Side(argv, cap_s=330, run_field="run", family="ours", est_s=40, per_run_s=20)


def loop(shape: str, seq_len: int, steps: int | None = None, variant: str = "") -> Side:
    """The Unsloth hand loop on the same records (`records{variant}.jsonl`), packed into rows (loops.py)."""
    def argv(s: Session, runs, res, cap):
        n = steps or s.a.steps + s.a.warmup + 1
        return [PY, "-m", "benchmarks.gpu.loops", model_dir(s, shape), s.data / f"records{variant}.jsonl", res,
                "--variants", ",".join(runs), "--steps", n, "--warmup", min(s.a.warmup, n - 2), "--shape", shape,
                "--seq-len", seq_len, "--budget-s", max(10, cap - 40)]

    return Side(argv, cap_s=240, run_field="variant", family="loop", est_s=80, per_run_s=8)


def th(cap_gib: float | None, shape: str = "qwen1.5b") -> Side:
    """training-hub's lora_sft on the same raw records (peers.py th), micro 8, capped at `cap_gib`."""
    def argv(s: Session, runs, res, cap):
        extra = ["--cap-gib", cap_gib] if cap_gib else []
        return [PY, "-m", "benchmarks.gpu.peers", "th", model_dir(s, shape), s.data / "records.jsonl", res,
                "--steps", s.a.steps + s.a.warmup + 1, "--warmup", s.a.warmup, "--shape", shape, *extra]

    return Side(argv, cap_s=180, run_field=None, family="th", est_s=90)


def parity_side(which: str, compiled: bool = False, levers: dict | None = None, tag: str = "") -> Side:
    """One side of the loss-parity run (parity.py side DIR ours|trl), 100 steps on a 4-layer model; `compiled`: ours
    on the peft backend's compiled path (kernels="compile"), with `levers` (more lora_sft options) under the losses
    file's suffix `_compile{tag}`."""
    def argv(s: Session, runs, res, cap):
        backend = "peft" if s.cpu or compiled else "unsloth"
        extra = ["--kernels", "compile", "--tag", f"_compile{tag}"] if compiled else []
        for key, value in (levers or {}).items():
            extra += ["--lever", f"{key}={str(value).lower() if isinstance(value, bool) else value}"]
        return [PY, "-m", "benchmarks.gpu.parity", "side", s.work / "parity", which, "--backend", backend,
                "--steps", s.a.parity_steps, "--no-lm-head", *extra]

    return Side(argv, cap_s=180, run_field=None, family=f"parity_{which}{'_compile' + tag if compiled else ''}",
                est_s=65)


def module(name: str, *args, cap_s: float = 590, family: str = "multi") -> Side:
    """A harness module run as is: `python -m benchmarks.gpu.NAME ARGS... RES`, args may be callables of the session."""
    def argv(s: Session, runs, res, cap):
        return [PY, "-m", f"benchmarks.gpu.{name}", *(a(s, res) if callable(a) else a for a in args)]

    return Side(argv, cap_s=cap_s, run_field="name", family=family)
