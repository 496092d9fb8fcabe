"""Single-GPU scenarios: each is `plan(session)` (which runs of which side it needs) and `rows(session)` (the rows
it writes once every process has run). The docstring of each plan function is what RESULTS.md says it measures.

Shapes: Qwen2.5-1.5B (rows of 2048) and Llama-3.1-8B (rows of 8192), random bf16 weights; LoRA r=16 alpha=32 on
q,k,v,o,gate,up,down; AdamW lr 2e-4; tokens/s counts real (non-pad) tokens over the timed steps after warm-up.
"""

from __future__ import annotations

import json
import shutil

from benchmarks.gpu import rows, sides
from benchmarks.gpu.runner import Session

BUDGETS = (8, 16, 24, 40)  # GiB; None = the whole card
FEED_OURS = "lora-data shards prepared on a CPU from DATA/records.jsonl (rows of {seq}, best-fit-decreasing)"
FEED_LOOP = ("the same records tokenized with the model's tokenizer, packed best-fit-decreasing into rows of {seq}; "
             "[micro, {seq}] batches, pads masked from the loss, Unsloth's fused cross-entropy, AdamW fused")
FEED_TH = "the same raw records.jsonl given to training-hub (its tokenization, sample packing, micro 8, max_seq_len 2048)"


def _backend(s: Session) -> str:
    """What ours runs with: the default `backend="auto"` (unsloth on a GPU where it imports, decided once and cached);
    peft on the CPU (the smoke test)."""
    return "peft" if s.cpu else "auto"


def _ours_run(s: Session, gc: str = "auto", micro: str = "auto", budget: float | None = None, q4: bool = False,
              level: str | None = None, offload: bool | None = None, graphs: bool | None = None) -> str:
    """The run's name for benchmarks.gpu.ours (its parts from `ours.OPTIONS`, the table its parser reads); level
    (selective_recompute: "off", "pointwise", "most"), offload and graphs: None = their "auto"."""
    from benchmarks.gpu.ours import OPTIONS

    part = {option: name for name, option in OPTIONS.items()}
    asked = [("load_in_4bit", q4 or None), ("selective_recompute", level), ("cuda_graphs", graphs),
             ("activation_offload", offload)]
    name = f"{_backend(s)}_{gc}_mb{micro}" + "".join(f"_{part[kv]}" for kv in asked if kv[1] is not None)
    return name + (f"_b{budget:g}" if budget else "")


def _ours_label(run: str) -> str:
    from benchmarks.gpu.ours import parse, pick_share

    kw = parse(run)
    args = [f"{k}={v!r}" for k, v in kw.items() if k != "backend" and v != "auto"]
    label = f"ours lora_sft({', '.join(args)})" if args else "ours lora_sft() defaults"
    share = pick_share(run)
    if share is None:
        return label
    if share < 0:
        return label + ", logits for every token"
    return label + f", logits for the target tokens alone where at most {share:.0%} of the tokens are targets"


def _ours_config(payload: dict) -> dict:
    keys = ("backend_used", "micro_batch_size", "resolved_micro_batch_size", "gradient_checkpointing",
            "resolved_gradient_checkpointing", "resolved_recomputed_layers", "resolved_offloaded_layers",
            "resolved_estimated_peak_gib", "resolved_selective_recompute", "resolved_activation_offload",
            "resolved_cuda_graphs", "pick_share",
            "max_memory_gib", "load_in_4bit", "memory_fraction", "alloc_retries", "device_allocs", "steady_steps")
    return {k: payload[k] for k in keys if k in payload}


def _loop_config(payload: dict) -> dict:
    keys = ("micro_batch", "gradient_checkpointing", "fit_tried", "memory_fraction", "load_s")
    return {k: payload[k] for k in keys if k in payload}


def _define_qwen(s: Session) -> None:
    shape = _shape(s)
    s.define(f"build_{shape}", sides.build(shape))
    if not (sides.model_dir(s, shape) / "config.json").exists():
        s.want(f"build_{shape}", [f"build_{shape}"])
    s.define("ours", sides.ours(shape, 2048))
    s.define("loop", sides.loop(shape, 2048))


def _define_llama8b(s: Session) -> None:
    """The Llama-3.1-8B shape's processes (rows of 8192, a few steps: one is slow), built first where missing."""
    s.define("build_llama8b", sides.build("llama8b"))
    if not (sides.model_dir(s, "llama8b") / "config.json").exists():
        s.want("build_llama8b", ["build_llama8b"])
    s.define("ours8b", sides.ours("llama8b", 8192, steps=s.a.warmup + 6))
    s.define("loop8b", sides.loop("llama8b", 8192, steps=s.a.warmup + 6))


def _shape(s: Session) -> str:
    return "tiny" if s.cpu else "qwen1.5b"


# ---- throughput ------------------------------------------------------------------------------------------------
BIG_CARD_GIB = 120  # an H200's 139 GiB: 24 rows peak near 100 GiB, and the plan asks about 109 GiB of the card
BIG_CARD_MICROS = (20, 24)


def _throughput_runs(s: Session) -> list[str]:
    return [_ours_run(s)] + ([] if s.cpu else [_ours_run(s, "gc", "8"), _ours_run(s, "gc", "8", q4=True)])


def throughput_plan(s: Session) -> None:
    """Whole card, Qwen2.5-1.5B shape, rows of 2048: ours with the usage guide's defaults, with checkpointing forced
    on, and QLoRA, beside the Unsloth hand loop (micro 8, checkpointing on) and training-hub's lora_sft, all fed the
    same records, in the same invocation. On a card of 120 GiB or more (an H200), ours also at micro batches of 20
    and 24, in a process of their own after the loop's: whether a pass larger than the 16 rows auto stops at would
    pay there."""
    _define_qwen(s)
    s.want("ours", _throughput_runs(s))
    if rows.card_gib(s.cpu) >= BIG_CARD_GIB:
        s.define("ours_card", sides.ours(_shape(s), 2048))
        s.want("ours_card", [_ours_run(s, micro=str(m)) for m in BIG_CARD_MICROS])
    s.want("loop", ["rows8_gc"])
    key = "th" if "frontier" not in s.scenarios else "th_b8"  # a config that fits 8 GiB runs the same on the card
    s.define(key, sides.th(8 if key == "th_b8" else None, _shape(s)))
    s.want(key, [key])


def throughput_rows(s: Session) -> list[dict]:
    shape, seq = _shape(s), 2048
    th_key = "th" if "frontier" not in s.scenarios else "th_b8"
    out = [_ours_row(s, "throughput", r, "ours", seq) for r in _throughput_runs(s)]
    out += [_ours_row(s, "throughput", r, "ours_card", seq) for r in s.wanted.get("ours_card", [])]
    out.append(_loop_row(s, "throughput", "loop", "rows8_gc", "Unsloth hand loop, micro 8, checkpointing on", seq))
    out.append(s.row("throughput", th_key, None, "training-hub lora_sft, micro 8", "peer", feed=FEED_TH,
                     config={"micro_batch_size": 8, "gradient_checkpointing": "unsloth"}))
    for r in out:
        r["shape"], r["seq_len"] = r["shape"] or shape, seq
        if r["role"] == "peer":
            r["budget_gib"] = None  # compared at the whole card
    return rows.add_ratios(out)


def _ours_row(s: Session, scenario: str, run: str, key: str, seq: int) -> dict:
    from benchmarks.gpu.ours import parse

    payload = s.result(key, run)[0]
    return s.row(scenario, key, run, _ours_label(run), "ours", feed=FEED_OURS.format(seq=seq),
                 config=_ours_config(payload), budget_gib=parse(run).get("max_memory_gib"))


def _loop_row(s: Session, scenario: str, key: str, run: str, name: str, seq: int) -> dict:
    from benchmarks.gpu.loops import parse_variant

    return s.row(scenario, key, run, name, "peer", feed=FEED_LOOP.format(seq=seq),
                 config=_loop_config(s.result(key, run)[0]), budget_gib=parse_variant(run)["budget_gib"])


# ---- frontier --------------------------------------------------------------------------------------------------
def frontier_plan(s: Session) -> None:
    """Speed at a memory budget (8, 16, 24, 40 GiB and the whole card), Qwen2.5-1.5B shape, rows of 2048: ours via
    `lora_sft(max_memory_gib=B)` (the plan picks micro batch and checkpointing) against the Unsloth hand loop with
    checkpointing at the largest micro batch (of 16, 8, 4, 2, 1) that fits and training-hub's lora_sft (micro 8),
    every process capped at B with torch.cuda.set_per_process_memory_fraction. training-hub runs once under the
    smallest cap: a fixed configuration that fits 8 GiB runs unchanged under a larger one. Plus ours with
    `micro_batch_size=2`, ours under 8 GiB with `activation_offload=False` (auto runs selective_recompute="most" there
    with offload for the plan to weigh: this is the smaller pass that fits without), and the Llama-3.1-8B shape at
    8,192 tokens under a 24 GiB budget against the Unsloth loop under the same cap.
    `--shape qwen1.5b` or `--shape llama8b` runs one part."""
    if s.a.shape != "llama8b":
        _define_qwen(s)
        s.want("ours", [_ours_run(s)] + [_ours_run(s, budget=b) for b in BUDGETS] + [_ours_run(s, micro="2")]
               + ([] if s.cpu else [_ours_run(s, budget=8, offload=False)]))
        s.want("loop", ["rowsfit16_gc"] + [f"rowsfit16_gc_b{b}" for b in BUDGETS])
        s.define("th_b8", sides.th(8, _shape(s)))
        s.want("th_b8", ["th_b8"])
    if s.cpu or s.a.shape == "qwen1.5b":
        return
    _define_llama8b(s)
    s.want("ours8b", [_ours_run(s, budget=24)])
    s.want("loop8b", ["rowsfit4_gc_b24"])


def frontier_rows(s: Session) -> list[dict]:
    shape = _shape(s)
    fit = "Unsloth hand loop, checkpointing on, largest micro that fits"
    out = []
    if s.a.shape != "llama8b":
        out += [_ours_row(s, "frontier", r, "ours", 2048) for r in s.wanted.get("ours", [])
                if "_b" in r or r in (_ours_run(s), _ours_run(s, micro="2"))]
        out += [_loop_row(s, "frontier", "loop", run, fit, 2048) for run in s.wanted.get("loop", [])
                if "fit" in run]
        out.append(s.row("frontier", "th_b8", None, "training-hub lora_sft, micro 8 (capped at 8 GiB)", "peer",
                         feed=FEED_TH, config={"micro_batch_size": 8}, budget_gib=8))
    for r in out:
        r["shape"], r["seq_len"] = r["shape"] or shape, 2048
    if "ours8b" in s.wanted:
        big = [_ours_row(s, "frontier", _ours_run(s, budget=24), "ours8b", 8192),
               _loop_row(s, "frontier", "loop8b", "rowsfit4_gc_b24", fit, 8192)]
        for r in big:
            r["shape"], r["seq_len"] = "llama8b", 8192
        out += big
    return rows.add_ratios(out)


# ---- startup ---------------------------------------------------------------------------------------------------
def startup_plan(s: Session) -> None:
    """Start-up, process start to the first optimizer step (imports, model load, compilation), caches cold and warm:
    ours with the usage guide's defaults and the Unsloth hand loop (micro 8, checkpointing on), each first in a
    fresh process with empty compile caches (cold), then once more in a new process with the caches the first left
    (warm)."""
    _define_qwen(s)
    shape = _shape(s)
    s.want("ours", [_ours_run(s)], first=True)
    s.want("loop", ["rows8_gc"], first=True)
    s.define("ours_warm", sides.ours(shape, 2048, steps=s.a.warmup + 2))
    s.define("loop_warm", sides.loop(shape, 2048, steps=s.a.warmup + 2))
    s.want("ours_warm", [_ours_run(s)])
    s.want("loop_warm", ["rows8_gc"])


def startup_rows(s: Session) -> list[dict]:
    out = []
    for key, run, name, role in (("ours", _ours_run(s), "ours lora_sft() defaults", "ours"),
                                 ("loop", "rows8_gc", "Unsloth hand loop, micro 8", "peer")):
        first = s.procs.get(key)
        if first and first.runs and first.runs[0] != run:  # startup belongs to the first run of a process
            run = first.runs[0]
        for k, cache in ((key, "cold"), (f"{key}_warm", "warm")):
            r = s.row("startup", k, run if cache == "cold" else (s.wanted.get(k) or [k])[0], f"{name}, caches {cache}", role,
                      feed=FEED_OURS.format(seq=2048) if role == "ours" else FEED_LOOP.format(seq=2048),
                      config={"caches": cache, "first_run": run})
            r["shape"], r["seq_len"], r["budget_gib"] = r["shape"] or _shape(s), 2048, None
            out.append(r)
    return out


# ---- parity ----------------------------------------------------------------------------------------------------
# the compiled path's variants compared with TRL: as auto runs it (a pass of 2,048 tokens: CUDA graphs on), without
# graphs, and at each selective_recompute level
PARITY_COMPILED: dict[str, dict] = {"": {}, "_nocg": {"cuda_graphs": False},
                                    "_pw": {"selective_recompute": "pointwise"}, "_most": {"selective_recompute": "most"}}


def parity_plan(s: Session) -> None:
    """Loss parity of ours against TRL SFTTrainer + PEFT: 310 stdlib docstrings as chat records, a 4-layer random
    Llama with a BPE tokenizer trained on them, 100 steps of 4 x 512-token rows, LoRA r=16 on the 7 projections, the
    same optimizer and schedule, each side in its own process; 10-step window means compared (packing and data order
    differ, so single steps do not line up). Stated tolerance: 3% per window. On a GPU, ours five times: Unsloth, and
    the peft backend's compiled path as auto runs it (CUDA graphs on: 2,048 tokens a pass), with cuda_graphs=False,
    and with selective_recompute="pointwise" and "most"."""
    src, dst = s.data / "parity", s.work / "parity"
    shutil.rmtree(dst, ignore_errors=True)
    if (src / "shards" / "manifest.json").exists():
        shutil.copytree(src, dst)
    else:  # the CPU side builds it (the device has no polars): `python -m benchmarks.gpu prepare DATA`
        from benchmarks.gpu import parity

        dst.mkdir(parents=True)
        records_path, model_dir = parity.build(dst)
        parity.prepare(records_path, model_dir, dst)
    for side in ("ours", "trl"):
        s.define(f"parity_{side}", sides.parity_side(side))
        s.want(f"parity_{side}", [f"parity_{side}"])
    if not s.cpu:
        for tag, levers in PARITY_COMPILED.items():
            s.define(f"parity_ours_compile{tag}", sides.parity_side("ours", compiled=True, levers=levers, tag=tag))
            s.want(f"parity_ours_compile{tag}", [f"parity_ours_compile{tag}"])


def parity_rows(s: Session) -> list[dict]:
    out = [_parity_row(s, "ours", "parity_ours", "peft" if s.cpu else "unsloth")]
    for tag, levers in PARITY_COMPILED.items():
        if f"parity_ours_compile{tag}" in s.wanted:
            words = "".join(f", {k}={v!r}" for k, v in levers.items())
            out.append(_parity_row(s, f"ours_compile{tag}", f"parity_ours_compile{tag}",
                                   f"peft, kernels='compile'{words}"))
    return out


def _parity_row(s: Session, side: str, key: str, backend: str) -> dict:
    from benchmarks.gpu import parity

    work = s.work / "parity"
    sides_ = {}
    for name in (side, "trl"):
        p = work / f"losses_{name}.json"
        sides_[name] = json.loads(p.read_text()) if p.exists() else None
    payload: dict = {"shape": "parity-llama-4l", "seq_len": parity.SEQ_LEN}
    ours, trl = sides_[side], sides_["trl"]
    if ours and trl:
        cmp = parity.compare(ours["losses"], trl["losses"])
        payload.update(max_window_gap=cmp["max_gap_after_first"], first=cmp["first"], last_window=cmp["last_window"],
                       steps=len(ours["losses"]), wall_s={"ours": ours["wall_s"], "trl": trl["wall_s"]})
    else:
        keys = {side: key, "trl": "parity_trl"}
        payload["error"] = "; ".join(f"{k}: {s.result(keys[k])[0].get('error')}" for k, v in sides_.items() if not v)
    row = s.row("parity", key, None, f"ours ({backend}) vs TRL SFTTrainer + PEFT", "ours",
                feed="the same records.jsonl; ours from lora-data shards, TRL from its bfd packing (padding-free)",
                config={"backend": backend, "tolerance": 0.03})
    row.update({k: v for k, v in payload.items() if k not in ("date",)})
    if ours and trl:
        row["error"] = None
    return row


# ---- kernels ---------------------------------------------------------------------------------------------------
KERNEL_RUNS = ("peft_gc_mb8_plain", "peft_gc_mb8_liger", "peft_nogc_mb8_liger")


def kernels_plan(s: Session) -> None:
    """The peft backend (transformers + PEFT: the path of FSDP sharding, model splitting and machines where Unsloth
    does not import) with liger-kernel's RoPE, RMSNorm, SwiGLU and fused linear + cross-entropy (`kernels="liger"`)
    and without (`kernels="none"`), Qwen2.5-1.5B shape, rows of 2048, micro 8, SDPA attention with block-diagonal
    masks: with checkpointing (the peft backend's default on a GPU) and, with liger, without."""
    _define_qwen(s)
    s.define("ours_peft", sides.ours(_shape(s), 2048))
    s.want("ours_peft", list(KERNEL_RUNS))


def kernels_rows(s: Session) -> list[dict]:
    out = [_ours_row(s, "kernels", run, "ours_peft", 2048) for run in KERNEL_RUNS]
    for r in out:
        r["shape"], r["seq_len"] = r["shape"] or _shape(s), 2048
    return out


# ---- compiled --------------------------------------------------------------------------------------------------
COMPILED_BUDGETS = (40, 24, 16)


def compiled_plan(s: Session) -> None:
    """The peft backend's compiled path (lora_runtime.compiled), which `backend="auto"` takes where a pass of 8,192
    tokens fits the budget without recomputation, Qwen2.5-1.5B shape, rows of 2048: ours with the usage guide's
    defaults on the whole card and under 40, 24 and 16 GiB, and with `micro_batch_size=2`, against the Unsloth hand
    loop with checkpointing at the largest micro batch that fits under the same cap, and the hand loop at micro 2
    without checkpointing (packed rows, flash varlen: its fastest micro 2); ours with `selective_recompute="pointwise"`
    (and `activation_offload=False`) under 24 and 16 GiB (each layer's pointwise work recomputed: larger passes in the
    same memory), under 16 GiB also with CUDA graphs asked for (auto leaves them off under a level) and with "most"
    (the largest pass its estimate fits, 13 rows); `micro_batch_size=2` again with `cuda_graphs=False` (auto replays
    CUDA graphs for that pass: what they are worth) and the defaults with `cuda_graphs=True` (auto leaves them off for
    a large pass)."""
    _define_qwen(s)
    s.want("ours", [_ours_run(s)] + [_ours_run(s, budget=b) for b in COMPILED_BUDGETS] + [_ours_run(s, micro="2")]
           + [_ours_run(s, budget=b, level="pointwise", offload=False) for b in (24, 16)]
           + ([] if s.cpu else [_ours_run(s, budget=16, level="pointwise", offload=False, graphs=True),
                                _ours_run(s, budget=16, level="most", offload=False),
                                _ours_run(s, micro="2", graphs=False), _ours_run(s, "nogc", graphs=True)]))
    # the hand loop's micro 16 fits 16 GiB: that row is its configuration under every larger budget too
    s.want("loop", ["rowsfit16_gc_b16", "packed2_nogc_varlen", "rowsfit16_gc"]
           + [f"rowsfit16_gc_b{b}" for b in COMPILED_BUDGETS if b != 16])


def compiled_rows(s: Session) -> list[dict]:
    fit = "Unsloth hand loop, checkpointing on, largest micro that fits"
    out = [_ours_row(s, "compiled", r, "ours", 2048) for r in s.wanted.get("ours", [])]
    out += [_loop_row(s, "compiled", "loop", run, fit, 2048) for run in s.wanted.get("loop", []) if "fit" in run]
    for r in out:
        r["shape"], r["seq_len"] = r["shape"] or _shape(s), 2048
    out = rows.add_ratios(out)
    micro2 = _loop_row(s, "compiled", "loop", "packed2_nogc_varlen",
                       "Unsloth hand loop, micro 2, checkpointing off, packed rows", 2048)
    micro2["shape"], micro2["seq_len"] = micro2["shape"] or _shape(s), 2048
    for r in out:  # micro 2 against micro 2 (the peers above are compared at the memory budget)
        two = (r.get("config") or {}).get("micro_batch_size") == 2
        if r.get("role") == "ours" and two and micro2.get("tokens_per_s") and r.get("tokens_per_s"):
            r["vs_micro2_peer"] = r["tokens_per_s"] / micro2["tokens_per_s"]
    return [*out, micro2]


# ---- offload ---------------------------------------------------------------------------------------------------
OFFLOAD_BUDGETS = (16, 24)


def offload_plan(s: Session) -> None:
    """`activation_offload=True` (decoder layers' saved activations in pinned host memory, copied on a side stream
    while the GPU computes; the memory plan picks how many layers from the budget and the link's measured
    bandwidth), Qwen2.5-1.5B shape, rows of 2048, under 16 and 24 GiB: ours with it, with it and
    `selective_recompute="pointwise"`, and without either (both "off", not their "auto"), against the Unsloth hand loop with checkpointing at the
    largest micro batch that fits under the same cap; and the Llama-3.1-8B shape at 8,192 tokens under 24 GiB, ours
    with both against ours without and the Unsloth loop. `--shape qwen1.5b` or `--shape llama8b` runs one part."""
    if s.a.shape != "llama8b":
        _define_qwen(s)
        s.want("ours", [_ours_run(s, budget=b, **kw) for b in OFFLOAD_BUDGETS
                        for kw in ({"level": "off", "offload": False}, {"level": "off", "offload": True},
                                   {"offload": True, "level": "pointwise"})])
        s.want("loop", [f"rowsfit16_gc_b{b}" for b in OFFLOAD_BUDGETS])
    if s.cpu or s.a.shape == "qwen1.5b":
        return
    _define_llama8b(s)
    s.want("ours8b", [_ours_run(s, budget=24, level="off", offload=False),
                      _ours_run(s, budget=24, offload=True, level="pointwise")])
    s.want("loop8b", ["rowsfit4_gc_b24"])


def offload_rows(s: Session) -> list[dict]:
    fit = "Unsloth hand loop, checkpointing on, largest micro that fits"
    out = []
    if s.a.shape != "llama8b":
        out += [_ours_row(s, "offload", r, "ours", 2048) for r in s.wanted.get("ours", [])]
        out += [_loop_row(s, "offload", "loop", run, fit, 2048) for run in s.wanted.get("loop", [])]
        for r in out:
            r["shape"], r["seq_len"] = r["shape"] or _shape(s), 2048
    if "ours8b" in s.wanted:
        big = [_ours_row(s, "offload", r, "ours8b", 8192) for r in s.wanted.get("ours8b", [])]
        big.append(_loop_row(s, "offload", "loop8b", "rowsfit4_gc_b24", fit, 8192))
        for r in big:
            r["shape"], r["seq_len"] = "llama8b", 8192
        out += big
    return rows.add_ratios(out)


# ---- prompts ---------------------------------------------------------------------------------------------------
FEED_PROMPTS = ("lora-data shards of DATA/records_prompts.jsonl (every other record of records.jsonl with its long and "
                "short turns swapped: about half the tokens have a target), rows of 2048, best-fit-decreasing")


def prompts_plan(s: Session) -> None:
    """Long prompts and short answers (`make_shards.prompt_heavy`: about half the tokens of a batch have a target,
    the same tokens as the other scenarios' records), Qwen2.5-1.5B shape, rows of 2048, whole card: ours with the
    usage guide's defaults, where the chunked loss makes logits for the targets alone, and with every token making
    logits (`_nopick`), one after the other in one process, against the Unsloth hand loop at the largest micro batch
    that fits, checkpointing on, on the same records. Then where the share stops paying: on the usual records, where
    about 93% of the tokens have a target, so the default share (`_pick75`, named) makes logits for every token,
    against picking the targets at any share (`_pick100`), in a process of their own after the others."""
    _define_qwen(s)
    s.define("ours_prompts", sides.ours(_shape(s), 2048, variant="_prompts"))
    s.define("loop_prompts", sides.loop(_shape(s), 2048, variant="_prompts"))
    s.want("ours_prompts", [_ours_run(s), _ours_run(s) + "_nopick"])
    s.want("loop_prompts", ["rowsfit16_gc"])
    s.define("ours_usual", sides.ours(_shape(s), 2048))  # not "ours": other scenarios' rows never take these runs
    s.want("ours_usual", [_ours_run(s) + "_pick75", _ours_run(s) + "_pick100"])


def prompts_rows(s: Session) -> list[dict]:
    fit = "Unsloth hand loop, checkpointing on, largest micro that fits"
    out = [_ours_row(s, "prompts", r, "ours_prompts", 2048) for r in s.wanted.get("ours_prompts", [])]
    out.append(_loop_row(s, "prompts", "loop_prompts", "rowsfit16_gc", fit, 2048))
    for r in out:
        r["shape"], r["seq_len"] = r["shape"] or _shape(s), 2048
        r["feed"] = FEED_PROMPTS if r["role"] == "ours" else r["feed"].replace("the same records",
                                                                            "DATA/records_prompts.jsonl", 1)
    usual = [_ours_row(s, "prompts", r, "ours_usual", 2048) for r in s.wanted.get("ours_usual", [])]
    for r in usual:  # no peer ran on this feed
        r["shape"], r["seq_len"], r["best_peer"], r["vs_best_peer"] = r["shape"] or _shape(s), 2048, None, None
        r["name"] += " (the usual records)"
    return rows.add_ratios(out) + usual


SCENARIOS = {
    "compiled": (compiled_plan, compiled_rows),
    "offload": (offload_plan, offload_rows),
    "kernels": (kernels_plan, kernels_rows),
    "throughput": (throughput_plan, throughput_rows),
    "frontier": (frontier_plan, frontier_rows),
    "startup": (startup_plan, startup_rows),
    "parity": (parity_plan, parity_rows),
    "prompts": (prompts_plan, prompts_rows),
}
