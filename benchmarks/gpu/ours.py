"""Our `lora_runtime.lora_sft` on pre-packed shards, several settings one after another in one process:

    python -m benchmarks.gpu.ours MODEL SHARDS OUT --runs unsloth_auto_mb8,unsloth_gc_mb8 [--steps 20]

Run names: <backend>_<gc>_mb<micro|auto>[_q4][_notf32][_liger|_plain|_compile][_pw|_most|_nopw][_cg|_nocg][_off|_nooff][_b<GiB>][_log<N>][_nopick|_pick<N>] (auto_auto_mbauto = the usage
guide's literal call; backend auto may run either backend: lora_runtime.compiled.prefers decides by the budget). backend auto | unsloth | peft (never unsloth and peft in one process: importing unsloth patches
transformers); gc auto | gc (forced on) | nogc; _b16 = a 16 GiB budget: `max_memory_gib=16` and the process capped at
16 GiB (`torch.cuda.set_per_process_memory_fraction`), so the run cannot use more; _liger / _plain = kernels="liger" /
"none" (the peft backend's fused kernels on or off), _compile = kernels="compile" (its compiled path), _pw / _nopw =
selective_recompute="pointwise" / "most" / "off", _off / _nooff = activation_offload=True / False, _cg / _nocg = cuda_graphs=True
/ False (each "auto" where not named), _log10 = logging_steps=10, _nopick = the chunked loss makes logits for every
token whatever the share of targets (`lora_runtime.chunked_loss.PICK_SHARE` -1 for the run), _pick<N> = PICK_SHARE
N/100 for the run: logits for the target tokens alone where at most N% of a batch's tokens are targets (_pick100:
whenever the trainer gives the count). Everything else is
lora_sft's defaults as training-hub's (lr 2e-4 linear, warmup 10, weight decay 0.01, clip 0.3, logging every step),
LoRA r=16 alpha=32 on all linear projections. A TrainerCallback times the steady window between the ends of the
first logged step after warm-up and the last step (device synchronised there only) and counts the trainer's own real
tokens in it (`Windows`).
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from benchmarks.gpu import common


class Windows:
    """The steady window of a lora_sft run, timed where the device is known to be done: each logged step's
    cumulative real tokens (the trainer's own count), and the wall clock, device synchronised, at the end of step 1
    (start-up), of the first logged step after `warmup` (`first`) and of the last step. The trainer logs a step's loss
    while the next step runs (a step late), and the last step at once, so times taken when a log arrives would give
    the window one step too few."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.first: int | None = None  # the window's first step: logged (its token count is known), after warm-up
        self.t_start = 0.0
        self.ends: dict[int, float] = {}  # step → perf_counter at its end, device synchronised
        self.seen: dict[int, int] = {}  # step → real tokens trained through it
        self.losses: dict[int, float] = {}
        self.first_step_unix: float | None = None
        self.logged: list[float] = []  # the trainer's own tokens/s per logged step, as its log line shows it

    def summary(self) -> dict:
        first, last = self.first, max(self.ends, default=0)
        if first is None or last <= first or first not in self.seen or last not in self.seen:
            return {"error": f"no logged step after warm-up ({self.warmup} steps) and before the last ({last})",
                    "first_step_unix": self.first_step_unix}
        steady_s, steady_tok, steps = self.ends[last] - self.ends[first], self.seen[last] - self.seen[first], last - first
        return {"tokens_per_s": steady_tok / steady_s, "steady_steps": steps, "step_s_mean": steady_s / steps,
                "tokens_per_step": steady_tok / steps, "first_step_s": self.ends[1] - self.t_start,
                "first_step_unix": self.first_step_unix, "warmup_s": self.ends[first] - self.t_start,
                "loss_first": self.losses.get(min(self.losses, default=0)),
                "loss_last": self.losses.get(max(self.losses, default=0)),
                "loss_nonfinite_step": common.first_nonfinite(sorted(self.losses.items())),
                "logged_tokens_per_s": self.logged}


def _meter_callback(windows: Windows):
    import torch
    from transformers import TrainerCallback

    class Meter(TrainerCallback):
        late_log_ok = True  # it only records: the trainer may log a step while the next one runs

        def on_train_begin(self, args, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            common.sync()
            windows.t_start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            step = state.global_step
            last = step >= state.max_steps or control.should_training_stop
            # transformers' flow callback, which runs first, has set should_log
            starts = windows.first is None and step > windows.warmup and control.should_log and not last
            if step == 1 or starts or last:  # the only steps that wait for the device
                common.sync()
                windows.ends[step] = time.perf_counter()
                if step == 1:
                    windows.first_step_unix = time.time()
                if starts:
                    windows.first = step

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:  # state.global_step is the logged step's while a late log is written
                windows.seen[state.global_step] = int(logs.get("tokens_seen", state.num_input_tokens_seen))
                windows.losses[state.global_step] = float(logs["loss"])
                if "tokens_per_s" in logs:
                    windows.logged.append(round(float(logs["tokens_per_s"])))

    return Meter()


GC_TOKENS = {"auto": "auto", "gc": True, "nogc": False}
OPTIONS = {"q4": ("load_in_4bit", True), "notf32": ("tf32", False), "liger": ("kernels", "liger"),
           "plain": ("kernels", "none"), "compile": ("kernels", "compile"), "pw": ("selective_recompute", "pointwise"),
           "most": ("selective_recompute", "most"), "nopw": ("selective_recompute", "off"),
           "off": ("activation_offload", True), "nooff": ("activation_offload", False), "cg": ("cuda_graphs", True),
           "nocg": ("cuda_graphs", False)}
# the order of the options in a run's label (`scenarios._ours_label`), whatever their order in the name
ORDER = ("load_in_4bit", "tf32", "kernels", "max_memory_gib", "selective_recompute", "activation_offload",
         "cuda_graphs", "logging_steps")


def parse(name: str) -> dict:
    """lora_sft's options from a run name, BACKEND_GC_mbMICRO[_OPTION...]; a part it does not know raises, naming it."""
    parts = name.split("_")
    kw: dict = {}
    unknown = []
    for p in parts[3:]:
        if p in OPTIONS:
            key, value = OPTIONS[p]
            kw[key] = value
        elif p[:1] == "b" and p[1:].replace(".", "").isdigit():
            kw.setdefault("max_memory_gib", float(p[1:]))
        elif p[:3] == "log" and p[3:].isdigit():
            kw.setdefault("logging_steps", int(p[3:]))
        elif _pick_part(p) is not None:  # not a lora_sft option: see `pick_share`
            pass
        else:
            unknown.append(p)
    if len(parts) < 3 or parts[1] not in GC_TOKENS or not parts[2].startswith("mb") or unknown:
        raise ValueError(f"run name {name!r}: expected BACKEND_{'|'.join(GC_TOKENS)}_mb(auto|N) then any of "
                         f"{', '.join(OPTIONS)}, bGIB, logN, nopick, pickN"
                         + (f"; unknown: {', '.join(unknown)}" if unknown else ""))
    micro = parts[2].removeprefix("mb")
    return dict(backend=parts[0], micro_batch_size=micro if micro == "auto" else int(micro),
                gradient_checkpointing=GC_TOKENS[parts[1]], **{k: kw[k] for k in ORDER if k in kw})


def config(model_dir: str, shards: str, kw: dict, seq_len: int):
    """The LoraSftConfig `train` hands lora_sft, for the decisions taken before it (which backend, Unsloth first)."""
    from lora_runtime import LoraSftConfig

    return LoraSftConfig(model_dir, shards, tempfile.gettempdir(), max_seq_len=seq_len,
                         target_modules=common.LORA_TARGETS, **kw)


def import_unsloth_first(model_dir: str, shards: str, kw: dict, seq_len: int = 2048) -> None:
    """What lora_sft does first in a user's script, done before the harness's own callbacks import transformers (else
    Unsloth warns that it was imported after transformers and some of its patches may not apply)."""
    from lora_runtime.backends import import_unsloth_first as first

    first(config(model_dir, shards, kw, seq_len))


def train(model_dir: str, shards: str, out: str, kw: dict, steps: int, seq_len: int, callbacks: list):
    """lora_sft as every run of the harness calls it: LoRA r=16 alpha=32 on the 7 projections, a log every step
    (unless `kw` says), no checkpoint before the end; `kw` from `parse`."""
    from lora_runtime import lora_sft

    kw = {"logging_steps": 1, **kw}
    return lora_sft(model_dir, shards, out, lora_r=16, lora_alpha=32, target_modules=common.LORA_TARGETS,
                    max_steps=steps, max_seq_len=seq_len, save_steps=10**6, callbacks=callbacks, **kw)


def arguments(steps: int) -> argparse.ArgumentParser:
    """The command line shared with profile.py: MODEL SHARDS OUT --runs A,B [--steps N] [--seq-len L]."""
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("shards")
    ap.add_argument("out")
    ap.add_argument("--runs", required=True)
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--seq-len", type=int, default=2048)
    return ap


def pick_share(name: str) -> float | None:
    """The chunked loss's `PICK_SHARE` for run `name`: -1 (never pick) with _nopick, N/100 with _pickN, else None.

    >>> [pick_share(n) for n in ("auto_auto_mbauto", "auto_auto_mbauto_nopick", "auto_auto_mbauto_pick0",
    ...                          "auto_auto_mbauto_pick100")]
    [None, -1.0, 0.0, 1.0]
    """
    return next((share for p in name.split("_")[3:] if (share := _pick_part(p)) is not None), None)


def _pick_part(part: str) -> float | None:
    if part == "nopick":
        return -1.0
    return int(part[4:]) / 100 if part[:4] == "pick" and part[4:].isdigit() else None


def run_one(model_dir: str, shards: str, name: str, steps: int, warmup: int, seq_len: int) -> dict:
    import torch

    windows = Windows(warmup)
    kw = parse(name)
    import_unsloth_first(model_dir, shards, kw, seq_len)
    fraction = common.cap_memory(kw.get("max_memory_gib"))
    t0 = time.perf_counter()
    allocator = common.allocator_counts()
    from lora_runtime import chunked_loss

    share = chunked_loss.PICK_SHARE
    if (given := pick_share(name)) is not None:
        chunked_loss.PICK_SHARE = given
    try:
        with tempfile.TemporaryDirectory() as out:
            result = train(model_dir, shards, out, kw, steps, seq_len, [_meter_callback(windows)])
            saved = json.loads((Path(out) / "lora_sft_config.json").read_text())
    finally:
        used, chunked_loss.PICK_SHARE = chunked_loss.PICK_SHARE, share
    payload = {"run": name, **{k: v for k, v in kw.items()}, "pick_share": used,
               "backend_used": result.backend, "steps": result.steps,
               "final_loss": result.final_loss, "total_s": time.perf_counter() - t0, "seq_len": seq_len,
               "memory_fraction": fraction,
               # each retry frees cached blocks and waits for the device; each cudaMalloc may too
               **{k: v - allocator[k] for k, v in common.allocator_counts().items()}}
    resolved = saved.get("resolved") or {}  # the batch plan lora_sft ran with (batching.BatchPlan.to_dict)
    for key in ("micro_batch_size", "gradient_checkpointing", "recomputed_layers", "offloaded_layers",
                "estimated_peak_gib", "cuda_graphs"):
        payload[f"resolved_{key}"] = resolved.get(key)
    for key in ("selective_recompute", "activation_offload"):  # the saved config is the one "auto" was made into
        payload[f"resolved_{key}"] = saved.get(key)
    payload.update(windows.summary())
    payload.update(common.memory())
    del result
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return payload


def main() -> None:
    ap = arguments(steps=20)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--shape", default="qwen1.5b")
    ap.add_argument("--prefix", default="ours")
    ap.add_argument("--budget-s", type=float, default=1e9)
    a = ap.parse_args()
    t0 = time.perf_counter()
    names = a.runs.split(",")
    unsloth = _unsloth_runs(a.model_dir, a.shards, names, a.seq_len)
    if unsloth and len(unsloth) < len(names):  # Unsloth patches transformers for good: its runs get a process of
        # their own, run first and to its end (never two processes on the GPU at once)
        budget = ["--budget-s", str(max(10.0, a.budget_s - (time.perf_counter() - t0)))]
        subprocess.run([sys.executable, "-m", "benchmarks.gpu.ours", *_argv_with_runs(unsloth), *budget], check=False)
        names = [n for n in names if n not in unsloth]
    for name in names:
        tag = f"{a.prefix}_{name}"
        if time.perf_counter() - t0 > a.budget_s:
            common.write_result(a.out, tag, {"run": name, "error": "skipped: out of budget"})
            continue
        try:
            payload = {"shape": a.shape, **run_one(a.model_dir, a.shards, name, a.steps, a.warmup, a.seq_len)}
            gc_on = payload["gradient_checkpointing"] is True
            if "tokens_per_s" in payload:
                payload["mfu_6N"] = payload["tokens_per_s"] * common.flops_per_token(a.shape, True) / 790e12
                payload["mfu_matmul"] = payload["tokens_per_s"] * common.flops_per_token(a.shape, gc_on) / 790e12
        except Exception as e:
            traceback.print_exc()
            payload = {"run": name, "shape": a.shape, "error": f"{type(e).__name__}: {e}"[:2000], **common.memory()}
        common.write_result(a.out, tag, payload)


def _unsloth_runs(model_dir: str, shards: str, names: list[str], seq_len: int) -> list[str]:
    """The runs that train with Unsloth (`trains_with_unsloth`), decided in a process of its own: the decision reads
    the free GPU memory, and this process must not hold a CUDA context while another trains."""
    code = ("import json, sys; from benchmarks.gpu.ours import trains_with_unsloth as u; "
            "print(json.dumps([n for n in sys.argv[4:] if u(sys.argv[1], sys.argv[2], n, int(sys.argv[3]))]))")
    done = subprocess.run([sys.executable, "-c", code, model_dir, shards, str(seq_len), *names], stdout=subprocess.PIPE,
                          text=True)  # its errors go to this process's log
    if done.returncode != 0:
        raise RuntimeError(f"deciding the runs' backends failed (exit {done.returncode}; the traceback is above)")
    return json.loads(done.stdout.strip().splitlines()[-1])


def trains_with_unsloth(model_dir: str, shards: str, name: str, seq_len: int) -> bool:
    """Whether run `name` trains with Unsloth, decided as lora_sft decides (lora_runtime.compiled.prefers)."""
    from lora_runtime.compiled import prefers

    kw = parse(name)
    if kw["backend"] != "auto":
        return kw["backend"] == "unsloth"
    return not prefers(config(model_dir, shards, kw, seq_len))[0]


def _argv_with_runs(runs: list[str]) -> list[str]:
    argv = list(sys.argv[1:])
    at = argv.index("--runs")
    argv[at + 1] = ",".join(runs)
    return argv


if __name__ == "__main__":
    main()
