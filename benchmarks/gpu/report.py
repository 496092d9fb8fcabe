"""RESULTS.md from the results file, and the short table a device call prints last.

    python -m benchmarks.gpu report [--results benchmarks/results.jsonl] [--out benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks.gpu import rows

MD = Path(__file__).resolve().parents[1] / "RESULTS.md"
STACK = ("torch", "transformers", "peft", "trl", "unsloth", "training-hub", "liger-kernel", "tokenizers", "polars", "python")
DETAILS = {  # extra figures shown in the details column, with their format
    "max_window_gap": "worst 10-step window gap {:.2%}", "scaling_efficiency": "scaling {:.2f}",
    "loss_max_abs_gap_vs_1gpu": "loss gap vs 1 GPU {:.5f}", "resume_max_abs_gap_after_10": "resume loss gap {:.5f}",
    "fault_names_rank_1": "dead rank named: {}", "fault_exit_s": "launcher exit {:.0f} s",
    "fault_resumed_from": "{}", "bf16_matmul_tflops": "bf16 matmul {:.0f} TFLOP/s", "copy_tb_s": "copy {:.2f} TB/s",
    "peak_alloc_gib_per_gpu": "peak per GPU {}", "speedup_vs_trl": "{:.2f}x TRL's preparation",
    "packing_efficiency": "packing efficiency {:.4f}", "vs_encode_batch": "{:.2f}x the bare encode_batch",
    "records": "{} records", "note": "{}",
}
OTHER = {
    "compiled-parts": "What each part of the compiled path is worth, without the Trainer around it (`python -m "
                      "benchmarks.gpu.compiled MODEL RECORDS OUT --variants ...`, MODEL from `common.build_model`): "
                      "Qwen2.5-1.5B shape, rows of 2048, LoRA r=16 on the 7 projections, AdamW fused, one process a "
                      "variant set, every step synchronised. The note gives the host's time issuing a step. Rows "
                      "fed records JSONL (all those before 2026-12-06 11:20) and `_all` variants label every "
                      "non-padding token: on the varlen feed that made the first step's gradients NaN and the loss "
                      "NaN from step 2 (measured on one H100; a GEMM over NaN draws less power and clocks higher at "
                      "the power cap), so their speeds read high. On shards without a labels flag a variant trains "
                      "on lora_sft's labels.",
    "trainer-overhead": "Where `lora_sft` on the compiled path loses time against the same path without the Trainer "
                        "(`compiled-parts`): `python -m benchmarks.gpu.profile` (the run under torch.profiler, GPU busy "
                        "time against wall time, host waits by stack) and `benchmarks.gpu.ours` with another logging "
                        "cadence. Qwen2.5-1.5B shape, rows of 2048, the harness's lora_sft call.",
    "cuda-graphs": "lora_sft on the compiled path with `cuda_graphs=True` beside the same call without it "
                   "(`python -m benchmarks.gpu.ours MODEL SHARDS OUT --runs auto_nogc_mbauto_cg_bB,auto_nogc_mbauto_bB`, "
                   "MODEL from `common.build_model`): Qwen2.5-1.5B shape, rows of 2048, the harness's lora_sft call "
                   "under a budget of B GiB.",
    "most-memory": "The allocated peak of `selective_recompute=\"most\"` without offload by pass size, uncapped "
                   "(`python -m benchmarks.gpu.ours MODEL SHARDS OUT --runs auto_auto_mbN_most_nooff`, MODEL from "
                   "`common.build_model`): Qwen2.5-1.5B shape, rows of 2048, the harness's lora_sft call; what "
                   "`batching.most_bytes_per_token` and `MOST_WORKING_SCALE` are fitted to.",
    "partitioner": "What one compiled decoder layer keeps for backward by the partitioner's activation memory "
                   "budget, on a CPU (`python -m benchmarks.partitioner --shape SHAPE --budgets ... --out ...`): the "
                   "shape's layer with LoRA r=16 on the 7 projections, frozen bf16 base under bf16 autocast, "
                   "attention as an opaque op keeping what FlashAttention-2 keeps. More backward matmuls than at "
                   "budget 1 mean a projection is recomputed. `selective_recompute=\"pointwise\"` uses 0.7.",
    "offload-host": "What activation offload costs the host, on a CPU (`python -m benchmarks.offload_host --shape "
                    "SHAPE --out ...`): the Python of lora_runtime.offload a saved tensor (28 small compiled blocks "
                    "with and without it), and how many tensors of at least offload.MIN_BYTES one compiled decoder "
                    "layer of the shape saves in a pass (the partitioner's saved tensors). CUDA calls are not in it.",
    "prepare": "CPU data preparation (pytest-benchmark `benchmarks/test_prepare.py`): `lora_data.prepare` against "
               "TRL SFTTrainer's own preparation of the same chat corpus, generated text or real docstrings (same template, "
               "assistant-only mask, best-fit-decreasing packing, rows of 4,096; both produce the same tokens). "
               "tokens/s here is prepared tokens per second.",
    "train-step": "One optimizer step of a backend on packed rows of 2048 tokens (pytest-benchmark `benchmarks/"
                  "test_train.py`: the regression gate's training cases), Qwen2.5-1.5B shape.",
}


def _num(v, fmt: str = "{:,.0f}") -> str:
    return "" if v is None else fmt.format(v)


def _details(r: dict) -> str:
    out = []
    for k, fmt in DETAILS.items():
        v = r.get(k)
        if v is None or v == "":
            continue
        if isinstance(v, list):
            v = "/".join(f"{x:.1f}" for x in v)
        try:
            out.append(fmt.format(v))
        except (ValueError, TypeError):
            out.append(f"{k} {v}")
    cfg = r.get("config") or {}
    if isinstance(cfg, dict):
        shown = ("resolved_micro_batch_size", "resolved_gradient_checkpointing", "resolved_recomputed_layers",
                 "resolved_offloaded_layers", "resolved_estimated_peak_gib", "resolved_selective_recompute",
                 "resolved_activation_offload", "resolved_cuda_graphs", "micro_batch", "caches", "fit_tried",
                 "alloc_retries")
        picked = {k: v for k, v in cfg.items() if k in shown and v not in (None, [])}
        out += [f"{k.replace('resolved_', '')} {v}" for k, v in picked.items()]
        if cfg.get("note"):  # what a correction of the row changed
            out.append(str(cfg["note"]))
    if r.get("loss_nonfinite_step") is not None:
        out.append(f"**loss NaN/inf from step {r['loss_nonfinite_step']}**: not a training speed")
    if r.get("error"):
        out.append("**error**: " + str(r["error"]).replace("|", "/").replace("\n", " ")[:160])
    return "; ".join(out)


def table(rs: list[dict], scenario_column: bool = True) -> str:
    """Markdown table of rows (one scenario run or several)."""
    sc, sep = ("| scenario ", "|---") if scenario_column else ("", "")
    lines = [f"{sc}| run | role | shape | budget GiB | tok/s | × best peer | peak GiB | start-up s | warm-up s "
             f"| details |", f"{sep}|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rs:
        budget = "card" if r.get("budget_gib") is None else f"{r['budget_gib']:g}"
        if str(r.get("card") or "").startswith("cpu") or r.get("role") == "card":
            budget = ""
        first = f"| {r.get('scenario')} " if scenario_column else ""
        lines.append(
            f"{first}| {r.get('name')} | {r.get('role')} | {r.get('shape') or ''}"
            f"{'@' + str(r['seq_len']) if r.get('seq_len') else ''} | {budget} | {_num(r.get('tokens_per_s'))} "
            f"| {_num(r.get('vs_best_peer'), '{:.2f}')} | {_num(r.get('peak_gib'), '{:.1f}')} "
            f"| {_num(r.get('startup_s'), '{:.1f}')} | {_num(r.get('warmup_s'), '{:.1f}')} | {_details(r)} |")
    return "\n".join(lines)


def _stack(r: dict) -> str:
    v = r.get("versions") or {}
    return ", ".join(f"{k} {v[k]}" for k in STACK if k in v)


def _describe(scenario: str) -> str:
    from benchmarks.gpu.__main__ import SCENARIOS

    if scenario in SCENARIOS:
        return " ".join((SCENARIOS[scenario][0].__doc__ or "").split())
    return OTHER.get(scenario, "")


def render(rs: list[dict]) -> str:
    out = ["# Benchmark results", "",
           "Generated from `benchmarks/results.jsonl` by `python -m benchmarks.gpu report`: edit the data, not this "
           "file. Run a scenario with `python -m benchmarks.gpu SCENARIO` (a GPU machine without network: `bash "
           "benchmarks/gpu/run.sh SCENARIO`); its rows are appended to the results file with the card, the package "
           "versions, the command and the date.", "",
           "Columns: **tok/s** real (non-pad) tokens a second over the timed steps after warm-up; **× best peer** "
           "ours over the fastest peer measured in the same run that fits the same memory budget; **peak GiB** "
           "`torch.cuda.max_memory_allocated` (weights included); **start-up s** process start to the first "
           "optimizer step (imports, load, compilation: only a process's first run has one); **warm-up s** train "
           "start to the end of the warm-up steps (compilation, autotuning). A budget caps the process with "
           "`torch.cuda.set_per_process_memory_fraction`. Peers are fed the same records; the details column and "
           "the results file say how each was configured.", ""]
    order = list(dict.fromkeys(r["scenario"] for r in rs))
    for scenario in order:
        mine = [r for r in rs if r["scenario"] == scenario]
        out += [f"## {scenario}", "", _describe(scenario), ""]
        runs = list(dict.fromkeys(r["run_id"] for r in sorted(mine, key=lambda r: r.get("date") or "", reverse=True)))
        for run_id in runs:
            group = [r for r in mine if r["run_id"] == run_id]
            first = group[0]
            commands = list(dict.fromkeys(r.get("command") for r in group if r.get("command")))
            out += [f"### {(first.get('date') or '')[:16].replace('T', ' ')} UTC · {first.get('card')}", "",
                    f"Stack: {_stack(first)}.", ""]
            out += ([f"Command: `{commands[0]}`"] if len(commands) == 1 else
                    ["Commands (one process each; the row's own is in the results file):",
                     *(f"- `{c}`" for c in commands)])
            out += ["", table(group, scenario_column=False), ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu report")
    ap.add_argument("--results", default=str(rows.RESULTS))
    ap.add_argument("--out", default=str(MD))
    a = ap.parse_args(argv)
    Path(a.out).write_text(render(rows.read(a.results)), encoding="utf-8")
    print(f"wrote {a.out}")
