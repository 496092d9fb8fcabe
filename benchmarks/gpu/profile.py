"""Where a training step's time goes: `lora_sft` runs under torch.profiler for a window of steps after warm-up.

    python -m benchmarks.gpu.profile MODEL SHARDS OUT --runs unsloth_nogc_mb2,unsloth_nogc_mb8 [--steps 14]

Run names as in ours.py. For each run, OUT/<shards dir name>_<run>.txt gets: the wall time of each profiled step (device
synchronised), the GPU's busy time in the window (sum of kernel times; busy ≪ wall means the host is the limit),
the host calls that wait for the device (stream/device synchronisations, blocking copies, `.item()`) per step with
the Python stacks they came from, and the operators by self CPU time. One summary line per run is printed.
Recording Python stacks slows the host several times over: a run whose host nearly keeps pace with the GPU (a pass
of 8k tokens on the compiled path) reads as host-bound inside the window; its wall times before the window are the
unprofiled ones.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from benchmarks.gpu import common
from benchmarks.gpu.ours import arguments, import_unsloth_first, parse, train

WAITS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "aten::_local_scalar_dense",
         "cudaMemcpy", "aten::nonzero")


def _profiler_callback(first: int, last: int, report: dict):
    import torch
    from transformers import TrainerCallback

    class Profile(TrainerCallback):
        prof = None

        def on_step_begin(self, args, state, control, **kw):
            torch.cuda.synchronize() if torch.cuda.is_available() else None
            report.setdefault("begin", {})[state.global_step] = time.perf_counter()
            if state.global_step == first:
                acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
                verbose = torch._C._profiler._ExperimentalConfig(verbose=True)  # Python frames on every event
                self.prof = torch.profiler.profile(activities=acts, with_stack=True, experimental_config=verbose)
                self.prof.__enter__()
                report["window_start"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            torch.cuda.synchronize() if torch.cuda.is_available() else None
            step = state.global_step - 1
            report.setdefault("wall", {})[step] = time.perf_counter() - report["begin"][step]
            if self.prof is not None and state.global_step == last:
                report["window_s"] = time.perf_counter() - report["window_start"]
                self.prof.__exit__(None, None, None)
                report["prof"], self.prof = self.prof, None

    return Profile()


def _analyse(name: str, report: dict, steps: int) -> tuple[str, dict]:
    prof = report["prof"]
    events = prof.key_averages()
    kernel_us = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA")
    window = report["window_s"]
    summary = {"run": name, "window_steps": steps, "step_s": window / steps, "gpu_busy_s": kernel_us / 1e6 / steps,
               "gpu_busy_frac": kernel_us / 1e6 / window}
    waits = {e.key: e.count / steps for e in events if any(e.key.startswith(w) for w in WAITS)}
    summary["waits_per_step"] = waits
    lines = [f"# {name}: {steps} steps profiled", json.dumps(summary, indent=1), "",
             "wall per step (s): " + ", ".join(f"{k}:{v:.3f}" for k, v in sorted(report["wall"].items())), "",
             "## host waits, by stack"]
    by_stack = prof.key_averages(group_by_stack_n=12)
    for e in sorted(by_stack, key=lambda e: -e.count):
        if any(e.key.startswith(w) for w in WAITS):
            lines.append(f"{e.key}: {e.count / steps:.1f}/step, cpu {e.cpu_time_total / 1e3 / steps:.1f} ms/step")
            lines += [f"    {frame}" for frame in e.stack]
    lines += ["", "## by self CPU time",
              events.table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=70),
              "", "## by device time", events.table(sort_by="self_cuda_time_total", row_limit=25,
                                                      max_name_column_width=70)]
    return "\n".join(lines), summary


def main() -> None:
    ap = arguments(steps=14)
    ap.add_argument("--window", type=int, default=4)
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in a.runs.split(","):
        kw = parse(name)
        import_unsloth_first(a.model_dir, a.shards, kw, a.seq_len)
        common.cap_memory(kw.get("max_memory_gib"))
        report: dict = {}
        last = a.steps - 1
        callback = _profiler_callback(last - a.window, last, report)
        with tempfile.TemporaryDirectory() as tmp:
            train(a.model_dir, a.shards, tmp, kw, a.steps, a.seq_len, [callback])
        text, summary = _analyse(name, report, a.window)
        (out / f"{Path(a.shards).name}_{name}.txt").write_text(text)  # runs of other shapes keep their own files

        print("PROFILE", json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
