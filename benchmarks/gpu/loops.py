"""Hand-written Unsloth training loops: the "Unsloth, hand loop" peer and our fast-path candidates, one model load,
variants run one after another in one process (the peer first, so compilation lands in its warm-up):

    python -m benchmarks.gpu.loops MODEL RECORDS OUT [--4bit] [--variants rows8_gc,packed8_gc,...]

Variant names: <layout>[fit]<micro><gc>[_varlen][_b<GiB>]
  rows8     8 packed rows of 2048 as a [8, 2048] batch, plain causal attention over each row (what a naive hand loop
            does: samples in a row see each other), pads masked out of the loss only.  = the peer
  packed8   the same 8 rows flattened to [1, 16384] with `packed_seq_lengths` + position ids reset per sample:
            padding-free varlen attention, no cross-sample attention (pad tails are their own segments).
  packed16  16 rows a step ([1, 32768]).
  gc / nogc gradient checkpointing ("unsloth" offloaded) on / off (switched with FastLanguageModel.for_training).
  fit16     the largest micro batch of 16, 8, 4, 2, 1 that runs a step under the cap (with _b<GiB>).
  _b24      the process capped at 24 GiB (torch.cuda.set_per_process_memory_fraction) for this variant.
  _varlen   torch 2.11's varlen_attn lacks enable_gqa, so Unsloth runs SDPA once per run of equal-length samples;
            this routes packed attention to aten's flash varlen kernel (GQA native) instead.
Loss: Unsloth's own fused chunked cross-entropy (labels passed, logits never materialised). AdamW fused, lr 2e-4.
"""

from __future__ import annotations

import argparse
import gc as _gc
import time
import traceback

from benchmarks.gpu import common

SEQ_LEN = 2048
DEV = "cuda"  # "cpu" only for a smoke test of the harness on a machine without a GPU
DEFAULT_VARIANTS = "rows8_gc,packed8_gc,packed8_gc_varlen,packed8_nogc_varlen,packed16_nogc_varlen"


def patch_flash_varlen() -> str:
    """Give Unsloth a GQA-capable varlen kernel on torch builds whose varlen_attn lacks `enable_gqa` (2.11).

    Returns what was done, for the log. Unsloth reads these module globals at call time.
    """
    import importlib
    import sys

    import torch

    ad = sys.modules.get("unsloth.utils.attention_dispatch") or importlib.import_module(
        "unsloth.utils.attention_dispatch")

    if ad._TORCH_VARLEN_ATTN is not None and ad._LEAN_VARLEN:
        return "unsloth already uses torch varlen flash"
    if not hasattr(torch.ops.aten, "_flash_attention_forward"):
        return "no aten flash kernel: left per-segment SDPA"

    def varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
        window_size = tuple(window_size)
        return ad._LeanFlashVarlen.apply(q, k, v, cu_q, max_q, window_size == (-1, 0), scale, window_size[0],
                                         window_size[1])

    ad._TORCH_VARLEN_ATTN = varlen
    ad._LEAN_VARLEN = True
    ad._varlen_can_use_cudnn = lambda *a, **k: False
    return "patched: packed attention -> aten._flash_attention_forward varlen (GQA native)"


def load(model_dir: str, four_bit: bool):
    import torch
    from unsloth import FastLanguageModel

    model, tok = FastLanguageModel.from_pretrained(
        model_name=model_dir, max_seq_length=SEQ_LEN, dtype=torch.bfloat16, load_in_4bit=four_bit,
        use_gradient_checkpointing="unsloth",
    )
    model = FastLanguageModel.get_peft_model(
        model, r=16, lora_alpha=32, lora_dropout=0.0, target_modules=common.LORA_TARGETS, bias="none",
        use_gradient_checkpointing="unsloth", random_state=3407,
    )
    return model, tok


def make_batches(ids, lens, micro: int, layout: str, pad_id: int, label_rows=None):
    """Yield (kwargs for model(...), real token count) forever, cycling over the packed rows. The labels are every
    non-padding token, or `label_rows` ([R, seq_len], IGNORE_INDEX where no loss is taken) where given."""
    import torch

    n_rows = ids.shape[0]
    i = 0
    while True:
        pick = [(i + j) % n_rows for j in range(micro)]
        i += micro
        rows = torch.from_numpy(ids[pick])
        if label_rows is None:
            labels = rows.clone()
            labels[rows == pad_id] = -100
        else:
            labels = torch.from_numpy(label_rows[pick])
        real = sum(sum(lens[r]) for r in pick)
        if layout == "rows":
            yield {"input_ids": rows.to(DEV, non_blocking=True), "labels": labels.to(DEV, non_blocking=True)}, real
            continue
        seg: list[int] = []
        for r in pick:
            seg += lens[r]
            tail = SEQ_LEN - sum(lens[r])
            if tail:
                seg.append(tail)
        pos = torch.cat([torch.arange(n) for n in seg]).unsqueeze(0)
        yield {
            "input_ids": rows.reshape(1, -1).to(DEV, non_blocking=True),
            "labels": labels.reshape(1, -1).to(DEV, non_blocking=True),
            "position_ids": pos.to(DEV, non_blocking=True),
            "packed_seq_lengths": torch.tensor(seg, dtype=torch.int32),
        }, real


def check_packed_isolation(model) -> dict:
    """Final hidden states of sample b packed after sample a vs b alone (relative L2 gap), next to the same gap
    when a and b share one plain causal row (contaminated): the packed gap must be far smaller (bf16 noise)."""
    import os

    import torch

    g = torch.Generator().manual_seed(0)
    a = torch.randint(10, 900, (1, 300), generator=g).to(DEV)
    b = torch.randint(10, 900, (1, 500), generator=g).to(DEV)
    ids = torch.cat([a, b], 1)
    pos = torch.cat([torch.arange(300), torch.arange(500)]).unsqueeze(0).to(DEV)
    model.eval()
    os.environ["UNSLOTH_RETURN_HIDDEN_STATES"] = "1"
    try:
        with torch.no_grad():
            hb = model(input_ids=b, use_cache=False).logits.float()
            hp = model(input_ids=ids, position_ids=pos, use_cache=False,
                       packed_seq_lengths=torch.tensor([300, 500], dtype=torch.int32)).logits[:, 300:].float()
            hc = model(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=pos,
                       use_cache=False).logits[:, 300:].float()
    finally:
        os.environ.pop("UNSLOTH_RETURN_HIDDEN_STATES", None)
        model.train()
    gap = float((hp - hb).norm() / hb.norm())
    contaminated = float((hc - hb).norm() / hb.norm())
    return {"packed_gap": gap, "contaminated_gap": contaminated, "isolated": gap < 0.1 * contaminated}


def parse_variant(name: str) -> dict:
    """`rows8_gc` → rows layout, micro 8, checkpointing on; `rowsfit16_gc_b24` → the largest micro of 16, 8, 4, 2, 1
    that completes a step under a 24 GiB cap (the process capped with set_per_process_memory_fraction).

    >>> parse_variant("rowsfit16_gc_b24")
    {'layout': 'rows', 'micro': 16, 'fit': True, 'gc': True, 'budget_gib': 24.0}
    """
    head, *rest = name.split("_")
    budget = [p for p in rest if p.startswith("b") and p[1:].replace(".", "").isdigit()]
    return {"layout": "rows" if head.startswith("rows") else "packed",
            "micro": int("".join(c for c in head if c.isdigit())), "fit": "fit" in head, "gc": "gc" in rest,
            "budget_gib": float(budget[0][1:]) if budget else None}


def _one_step(model, opt, batches) -> tuple[int, object]:
    kw, real = next(batches)
    loss = model(**kw).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return real, loss


def _halve_after_oom(opt, micro: int, tried: list[str], what: str) -> int:
    """Free what the failed step held and try half the micro batch next."""
    import torch

    tried.append(f"micro {micro}: {what}")
    opt.zero_grad(set_to_none=True)
    _gc.collect()
    torch.cuda.empty_cache()
    return micro // 2


def _largest_micro_that_fits(model, opt, data, layout: str, top: int) -> tuple[int, list[str]]:
    """Try one step at micro `top`, top/2, ... 1 under the current cap; the first that runs is the answer."""
    import torch

    ids, lens, pad_id = data
    tried = []
    micro = top
    while micro >= 1:
        try:
            _one_step(model, opt, make_batches(ids, lens, micro, layout, pad_id))
            common.sync()
            return micro, tried
        except (torch.OutOfMemoryError, RuntimeError) as e:  # Triton kernels report OOM as a RuntimeError
            if not isinstance(e, torch.OutOfMemoryError) and "out of memory" not in str(e).lower():
                raise
            micro = _halve_after_oom(opt, micro, tried, "out of memory")
    raise RuntimeError("no micro batch fits the budget: " + "; ".join(tried))


def run_variant(model, opt, data, name: str, steps: int, warmup: int) -> dict:
    import torch
    from unsloth import FastLanguageModel

    v = parse_variant(name)
    FastLanguageModel.for_training(model, use_gradient_checkpointing="unsloth" if v["gc"] else False)
    fraction = common.cap_memory(v["budget_gib"])
    ids, lens, pad_id = data
    _gc.collect()
    if DEV == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    micro, tried = v["micro"], []
    t_probe = time.perf_counter()
    if v["fit"]:
        micro, tried = _largest_micro_that_fits(model, opt, data, v["layout"], v["micro"])
    probe_s = time.perf_counter() - t_probe
    while True:  # one step fitting does not make every step fit (batches differ): the fitting search goes on
        batches = make_batches(ids, lens, micro, v["layout"], pad_id)
        meter = common.StepMeter(warmup=warmup)
        meter.start()
        try:
            for _ in range(steps):
                real, loss = _one_step(model, opt, batches)
                meter.step(real, loss.detach())
            break
        except torch.OutOfMemoryError:
            if not v["fit"] or micro == 1:
                raise
            micro = _halve_after_oom(opt, micro, tried, "out of memory after the probe step")
    out = {"variant": name, "layout": v["layout"], "micro_batch": micro, "gradient_checkpointing": v["gc"],
           "budget_gib": v["budget_gib"], "memory_fraction": fraction}
    if v["fit"]:
        out.update(fit_probe_s=probe_s, fit_tried=tried)
    out.update(meter.summary())
    out.update(common.memory())
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("records")
    ap.add_argument("out")
    ap.add_argument("--4bit", dest="four_bit", action="store_true")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--shape", default="qwen1.5b")
    ap.add_argument("--budget-s", type=float, default=1e9, help="skip the remaining variants past this wall time")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--profile", help="write a kernel-time breakdown of 2 steps of the last variant to this file")
    a = ap.parse_args()
    global SEQ_LEN
    SEQ_LEN = a.seq_len
    t0 = time.perf_counter()
    import importlib.util

    if importlib.util.find_spec("unsloth") is None:  # a peer that cannot run is a row with the reason
        for name in a.variants.split(","):
            common.write_result(a.out, f"loop_{name}", {"variant": name, "shape": a.shape,
                                                        "error": "ModuleNotFoundError: no module 'unsloth'"})
        return
    import torch

    global DEV
    DEV = "cuda" if torch.cuda.is_available() else "cpu"
    tag = "q4" if a.four_bit else "bf16"
    model, tok = load(a.model_dir, a.four_bit)
    load_s = time.perf_counter() - t0
    samples = common.tokenize(tok, common.read_records(a.records))
    ids, lens = common.pack_rows(samples, SEQ_LEN, tok.pad_token_id)
    print(f"loaded in {load_s:.1f}s; {len(samples)} samples -> {ids.shape[0]} rows, packing efficiency "
          f"{sum(map(sum, lens)) / ids.size:.3f}", flush=True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0, fused=True)
    for name in a.variants.split(","):
        if time.perf_counter() - t0 > a.budget_s:
            common.write_result(a.out, f"loop_{tag}_{name}", {"variant": name, "error": "skipped: out of budget"})
            continue
        payload = {"shape": a.shape, "precision": tag, "load_s": load_s}
        try:
            if name.endswith("_varlen"):
                payload["varlen_patch"] = patch_flash_varlen()
            if name.startswith("packed"):
                payload["isolation"] = check_packed_isolation(model)
            payload.update(run_variant(model, opt, (ids, lens, tok.pad_token_id), name, a.steps, a.warmup))
            gc_on = payload["gradient_checkpointing"]
            payload["mfu_matmul"] = payload["tokens_per_s"] * common.flops_per_token(a.shape, gc_on) / 790e12
            payload["mfu_6N"] = payload["tokens_per_s"] * common.flops_per_token(a.shape, True) / 790e12
        except Exception as e:
            traceback.print_exc()
            payload["error"] = f"{type(e).__name__}: {e}"[:2000]
            payload.update(common.memory())
        common.write_result(a.out, f"loop_{tag}_{name}", payload)
    if a.profile and "error" not in payload:
        try:
            profile(model, opt, (ids, lens, tok.pad_token_id), name, a.profile)
        except Exception:
            traceback.print_exc()


CATEGORIES = [  # kernel-name patterns → where the step's GPU time goes (first match wins)
    ("attention (flash)", ("flash_fwd", "flash_bwd", "fmha", "attention")),
    ("fp32 matmul (FFMA, no tensor cores)", ("f32f32", "sgemm")),
    ("matmul (cuBLAS/cutlass)", ("gemm", "cutlass", "sm90_xmma", "nvjet", "matmul", "splitk")),
    ("cross-entropy / lm_head chunks", ("cross_entropy", "_ce_", "logsumexp")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("copies / casts", ("copy", "cast", "convert", "memcpy", "memset", "fill")),
]


def profile(model, opt, data, name: str, path: str) -> None:
    """Two steps under torch.profiler: GPU time by kernel category, top kernels, and the host-side step time."""
    import json

    layout = "rows" if name.startswith("rows") else "packed"
    micro = int("".join(c for c in name.split("_")[0] if c.isdigit()))
    ids, lens, pad_id = data
    batches = make_batches(ids, lens, micro, layout, pad_id)
    common.sync()
    t0 = time.perf_counter()
    prof = common.profiled(lambda: _one_step(model, opt, batches))
    wall = (time.perf_counter() - t0) / 2
    kernels = [(e.key, e.self_device_time_total) for e in prof.key_averages()
               if str(e.device_type).endswith("CUDA") and e.self_device_time_total > 0]
    total = sum(t for _, t in kernels)
    cats: dict[str, float] = {}
    for key, t in kernels:
        low = key.lower()
        cat = next((c for c, pats in CATEGORIES if any(p in low for p in pats)), "other elementwise / triton")
        cats[cat] = cats.get(cat, 0.0) + t
    out = {"variant": name, "wall_ms_per_step": wall * 1e3, "gpu_busy_ms_per_step": total / 2e3,
           "by_category_ms_per_step": {c: t / 2e3 for c, t in sorted(cats.items(), key=lambda x: -x[1])},
           "top_kernels_ms_per_step": [(k[:120], t / 2e3) for k, t in sorted(kernels, key=lambda x: -x[1])[:25]]}
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print("PROFILE", json.dumps({k: out[k] for k in ("wall_ms_per_step", "gpu_busy_ms_per_step",
                                                     "by_category_ms_per_step")}), flush=True)


if __name__ == "__main__":
    main()
