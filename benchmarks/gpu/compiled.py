"""The transformers + PEFT path with its host overhead taken out, measured variant by variant in one process:

    python -m benchmarks.gpu.compiled MODEL RECORDS_OR_SHARDS OUT [--variants liger_v_m2,flce_v_c_m8_gc,...]

Variant names: <kernels>[_v][_c][_a]_m<micro>[_gc][_b<GiB>][_ab<percent>][_off][_ol<N>][_cpp][_sg][_cg][_fl|_fl0][_fa]
               [_lh][_inputs|_all][_clip]
  kernels   liger (RoPE, RMSNorm, SwiGLU, fused linear + cross-entropy), flce (liger's fused loss only),
            ck (lora_runtime.chunked_loss), none (transformers' loss over the whole logits)
  _v        packed attention through lora_runtime.attention (aten FlashAttention-2 varlen over one flattened row);
            without it: SDPA over [micro, 2048] rows with transformers' block-diagonal masks from position_ids
  _c        each decoder layer compiled on its own (torch.compile, one graph shared by all layers)
  _a        bf16 autocast with PEFT's cast of each LoRA input to the fp32 adapter dtype turned off (bf16 LoRA
            matmuls on fp32 adapter weights); without it, PEFT runs the LoRA matmuls in fp32
  _m8       8 packed rows of 2048 a step; _gc: non-reentrant checkpointing on every layer; _b24: capped at 24 GiB
  _ab50     the compiled layers save at most 50% of the activations they would (torch._functorch.config.
            activation_memory_budget: the partitioner recomputes the cheapest ops first)
  _off      the compiled layers offload saved activations to the host (torch._functorch.config.
            enable_activation_offloading, on a side stream, reloads prefetched)
  _ol6      6 decoder layers, spread over the model, keep their saved activations in pinned host memory
            (lora_runtime.offload, what activation_offload=True runs); the link's bandwidth is reported with it
  _cpp      Inductor's C++ wrapper launches the compiled layers' kernels (torch._inductor.config.cpp_wrapper)
  _sg       after warm-up, compiled layers check only the guards that tell their variants apart
            (torch.compiler.set_stance(skip_guard_eval_unsafe=True))
  _fl       LoRA's B product folded into the base GEMM of the widening projections (gate, up: lora_runtime.fused_lora);
            _fl0 of every projection; with _fl, _fa also LoRA's A product into the base GEMM of the narrowing ones
            (k, v under grouped-query attention, down), as the compiled path does without a selective_recompute level
  _cg       the compiled layers replay CUDA graphs (mode="reduce-overhead"; needs _v and _c); every pass has one
            shape: the sample boundaries are padded with empty samples to micro × `CU_CAPACITY`
  _lh       lora_sft's own varlen hook (backends.base.flatten_hook) fed [micro, 2048] rows, as lora_sft's collator does
  _inputs   (lora-data shards) the loss on every token of a sample but its first (lora-data's train_on_inputs);
            _all on every non-padding token, as records JSONL always are. Without either, shards train where
            lora_sft does: their loss mask, never a sample's first token (lora_runtime.collate.labels). On one H100
            the varlen feed (_v, eager or compiled, either hook) with every non-padding token labelled had NaN
            gradients in the first step and a NaN loss from the second; with lora_sft's labels it trained (SDPA rows
            trained either way), and on one H200 so did _inputs, beside _all turning NaN again:
            `grads_nonfinite_step1` and `loss_nonfinite_step` report it
  _clip     gradients clipped to norm 0.3 before each step, as lora_sft does by default (AdamW runs at a fixed 2e-4)
A run whose loss turned NaN is no measure of speed: a GEMM over NaN draws less power and clocks higher on a
power-capped card (benchmarks.gpu.common.first_nonfinite). Rows of the varlen feed with every token labelled (records
JSONL, `_all`) read high for that reason.
Every variant loads the model afresh (liger patches a model type's module; compile wraps layer instances). The first
step's loss is the same for every variant up to bf16 noise (LoRA B starts at zero): `loss_first` is the check.
"""

from __future__ import annotations

import argparse
import gc
import time
import traceback
from pathlib import Path

from benchmarks.gpu import common, loops

SEQ_LEN = 2048
CLIP = 0.3  # _clip: lora_sft's (training-hub's) max_grad_norm
CU_CAPACITY = 128  # under _cg a pass holds at most micro × this many samples (more fail the variant)


def parse(name: str) -> dict:
    """A variant's name → its settings.

    >>> v = parse("flce_v_c_m8_gc_b24_ab40")
    >>> {k: v[k] for k in ("kernels", "varlen", "compile", "autocast", "micro", "gc", "budget_gib", "activation_budget")}
    {'kernels': 'flce', 'varlen': True, 'compile': True, 'autocast': False, 'micro': 8, 'gc': True, \
'budget_gib': 24.0, 'activation_budget': 0.4}
    >>> sorted(k for k, on in parse("ck_v_c_a_m2_off_cpp_sg_cg").items() if on is True)
    ['autocast', 'compile', 'cpp', 'cudagraphs', 'offload', 'skip_guards', 'varlen']
    >>> parse("ck_v_c_a_m4_ol6")["offloaded_layers"], parse("ck_v_c_a_m4")["offloaded_layers"]
    (6, 0)
    """
    parts = name.split("_")
    micro = next(int(p[1:]) for p in parts if p.startswith("m") and p[1:].isdigit())
    budget = [float(p[1:]) for p in parts if p.startswith("b") and p[1:].replace(".", "").isdigit()]
    act = [int(p[2:]) / 100 for p in parts if p.startswith("ab") and p[2:].isdigit()]
    offloaded = [int(p[2:]) for p in parts if p.startswith("ol") and p[2:].isdigit()]
    if "cg" in parts and not {"v", "c"} <= set(parts):
        raise ValueError(f"{name}: _cg replays the compiled layers' graphs over padded boundaries: it needs _v and _c")
    if {"inputs", "all"} <= set(parts):
        raise ValueError(f"{name}: _inputs and _all are two kinds of labels: name one")
    if "lh" in parts and ("v" not in parts or "cg" in parts):
        raise ValueError(f"{name}: _lh is lora_sft's varlen hook: it needs _v, and graphs are not set up for it here")
    if "fa" in parts and "fl" not in parts:
        raise ValueError(f"{name}: _fa folds LoRA A beside _fl's B: it needs _fl (under _fl0 every projection folds B)")
    return {"kernels": parts[0], "varlen": "v" in parts, "compile": "c" in parts, "autocast": "a" in parts,
            "micro": micro, "gc": "gc" in parts, "budget_gib": budget[0] if budget else None,
            "activation_budget": act[0] if act else 1.0, "offload": "off" in parts, "cpp": "cpp" in parts,
            "skip_guards": "sg" in parts, "cudagraphs": "cg" in parts,
            "offloaded_layers": offloaded[0] if offloaded else 0,
            "fuse_lora": "all" if "fl0" in parts else "widening" if "fl" in parts else None,
            "fold_a": "fa" in parts, "clip": "clip" in parts, "lora_hook": "lh" in parts,
            "labels": "inputs" if "inputs" in parts else "all" if "all" in parts else None}


def partitioner(v: dict) -> dict:
    """torch._functorch.config settings for the variant's compiled layers."""
    out: dict = {"activation_memory_budget": v["activation_budget"]}
    if v["offload"]:
        out.update(enable_activation_offloading=True, activation_offload_separate_stream=True,
                   activation_offload_sink_wait=True, activation_reload_prefetch=True)
    return out


def build(model_dir: str, v: dict):
    import torch
    from lora_runtime import attention
    from lora_runtime.backends.base import checkpoint_layers, flatten_hook
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    attn = attention.register() if v["varlen"] else "sdpa"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation=attn,
                                                 device_map={"": 0})
    model.config.use_cache = False
    if v["kernels"] == "ck":
        from lora_runtime import chunked_loss

        chunked_loss.apply(model)
    elif v["kernels"] != "none":
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        every = v["kernels"] == "liger"
        _apply_liger_kernel_to_instance(model=model, rope=every, rms_norm=every, swiglu=every, cross_entropy=False,
                                        fused_linear_cross_entropy=True)
    torch.manual_seed(3407)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, bias="none",
                                             target_modules=common.LORA_TARGETS, task_type="CAUSAL_LM"))
    if v["autocast"]:
        for module in model.modules():
            if hasattr(module, "lora_A"):
                module.cast_input_dtype_enabled = False
    if v["fuse_lora"] is not None:
        from lora_runtime import fused_lora

        fused_lora.apply(model, 0.0 if v["fuse_lora"] == "all" else fused_lora.MIN_WIDENING, fold_a=v["fold_a"])
    if v["varlen"] and v["lora_hook"]:
        model.register_forward_pre_hook(flatten_hook(keep_seq_lengths=False, boundaries=True), with_kwargs=True)
    elif v["varlen"]:
        def hook(module, args, kwargs):
            kwargs = dict(kwargs)
            kwargs.update(attention.boundaries(kwargs.pop("packed_seq_lengths"), "cuda"))
            if v["compile"]:  # one bound for every batch: no recompilation on a new longest sample
                kwargs["max_length_q"] = SEQ_LEN
            if v["cudagraphs"]:  # one shape for every pass: trailing empty samples
                cu = kwargs["cu_seq_lens_q"]
                room = v["micro"] * CU_CAPACITY + 1 - cu.numel()
                if room < 0:
                    raise ValueError(f"{cu.numel() - 1} samples in a pass: more than micro × {CU_CAPACITY}")
                kwargs["cu_seq_lens_q"] = torch.cat([cu, cu[-1:].expand(room)])
            return args, kwargs
        model.register_forward_pre_hook(hook, with_kwargs=True)
    else:
        model.register_forward_pre_hook(flatten_hook(keep_seq_lengths=False, flatten=False), with_kwargs=True)
    if v["gc"]:
        checkpoint_layers(model)
    model.train()  # from_pretrained leaves eval mode: no checkpointing, and liger's loss would build the logits
    if v["compile"]:
        for layer in model.base_model.model.model.layers:
            layer.compile(mode="reduce-overhead" if v["cudagraphs"] else None)
    if v["offloaded_layers"]:  # after compiling: the copies run around each compiled layer
        from lora_runtime import offload

        offload.attach(model, 0, v["offloaded_layers"])
    return model


def batches(data, micro: int, varlen: bool, rows: bool = False, labels: str | None = None):
    """loops' packed batches ([1, micro·2048]) for varlen; the same rows as [micro, 2048] for SDPA masks, or with
    `rows` for lora_sft's varlen hook (it flattens them and makes the boundaries from `packed_seq_lengths`)."""
    ids, lens, pad_id, label_rows = data
    if label_rows is not None and labels != "all":  # shards: lora_sft's labels unless every token is asked for
        label_rows = label_rows[labels or "mask"]
    elif labels == "inputs":
        raise ValueError("_inputs needs lora-data shards (records JSONL carry no sample boundaries to mask)")
    else:
        label_rows = None
    for kw, real in loops.make_batches(ids, lens, micro, "packed", pad_id, label_rows):
        if not varlen or rows:
            kw = {k: (t.reshape(micro, -1) if k != "packed_seq_lengths" else t) for k, t in kw.items()}
        yield kw, real


def run(model_dir: str, data, name: str, steps: int, warmup: int, profile: str | None = None) -> dict:
    import torch

    v = parse(name)
    fraction = common.cap_memory(v["budget_gib"])
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model = build(model_dir, v)
    build_s = time.perf_counter() - t0
    import contextlib

    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    if v["activation_budget"] < 1.0:
        from lora_runtime.compiled import grouped_query_flop_counts

        grouped_query_flop_counts()
    settings = contextlib.ExitStack()  # read when the layers compile, at the first steps
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0, fused=True)
    feed = batches(data, v["micro"], v["varlen"], v["lora_hook"], v["labels"])
    meter = common.StepMeter(warmup=warmup)
    bad_step1: list[str] | None = None  # the first step's gradients that are NaN or infinite

    def step():
        nonlocal bad_step1
        kw, real = next(feed)
        if v["cudagraphs"]:
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=v["autocast"]):
            loss = model(**kw).loss
        loss.backward()
        if bad_step1 is None:  # before any update (one sync)
            bad_step1 = [n for n, p in model.named_parameters() if p.grad is not None and not p.grad.isfinite().all()]
        if v["clip"]:
            torch.nn.utils.clip_grad_norm_(params, CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return real, loss

    host = []  # seconds the host spends issuing a step (before the meter waits for the GPU)
    try:
        settings.enter_context(functorch_config.patch(**partitioner(v)))
        settings.enter_context(inductor_config.patch(cpp_wrapper=v["cpp"]))
        meter.start()
        for i in range(steps):
            if v["skip_guards"] and i == warmup:
                torch.compiler.set_stance(skip_guard_eval_unsafe=True)
            t = time.perf_counter()
            real, loss = step()
            host.append(time.perf_counter() - t)
            meter.step(real, loss.detach())
        steady = sorted(host[warmup + 1:]) or [0.0]
        out = {"variant": name, **v, "memory_fraction": fraction, "build_s": build_s, **meter.summary(),
               "host_s_median": steady[len(steady) // 2], **common.memory(),
               "grads_nonfinite_step1": len(bad_step1 or []), "grads_nonfinite_names": (bad_step1 or [])[:4]}
        if v["offloaded_layers"]:
            from lora_runtime.offload import host_link_bandwidth

            off = getattr(model, "activation_offload", None)
            out.update(link_gb_s=host_link_bandwidth(0) / 1e9, offloaded_gib_per_step=(off.bytes_per_step / 2**30) if off else None)
        if profile:
            _profile(step, profile)
    finally:
        torch.compiler.set_stance(skip_guard_eval_unsafe=False)
        settings.close()
        model = opt = None  # the step closure holds them too
        gc.collect()
        torch.cuda.empty_cache()
        torch._dynamo.reset()
    out["mfu_matmul"] = out.get("tokens_per_s", 0) * common.flops_per_token("qwen1.5b", v["gc"]) / 790e12
    return out


def _profile(step, path: str) -> None:
    """Two more steps under torch.profiler: ops by host time and by GPU time, into `path`."""
    avg = common.profiled(step).key_averages()
    with open(path, "w") as f:
        f.write(avg.table(sort_by="self_cpu_time_total", row_limit=45, max_name_column_width=70))
        f.write(avg.table(sort_by="self_device_time_total", row_limit=60, max_name_column_width=70))
        f.write("\nGPU time by kind of kernel (self time of kernels, both steps):\n")
        kinds: dict[str, float] = {}
        for e in avg:
            if e.device_type.name == "CUDA" and e.self_device_time_total > 0:
                kind = _kind(e.key)
                kinds[kind] = kinds.get(kind, 0.0) + e.self_device_time_total
        total = sum(kinds.values()) or 1.0
        for k, us in sorted(kinds.items(), key=lambda x: -x[1]):
            f.write(f"{k:<28} {us / 1e3:10.1f} ms {100 * us / total:5.1f}%\n")


# the first kind whose keys a kernel's name holds (FlashAttention's names hold "cutlass" too: attention goes first)
KERNEL_KINDS = (("attention", ("flash", "fmha")), ("loss (Triton)", ("softmax_grad",)),
                ("matmul", ("gemm", "nvjet", "cutlass", "sm90_xmma", "cublas")),
                ("fused (Triton)", ("triton_",)), ("copy", ("memcpy", "memset", "copy_")),
                ("reduction", ("reduce",)), ("elementwise (aten)", ("elementwise", "vectorized")))


def _kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(k in low for k in keys)), "other")


def shard_rows(shards: str):
    """The rows of lora-data shards (ids [R, seq_len] int64, per-row sample lengths, pad id, lora_sft's labels):
    the token stream lora_sft trains on."""
    import numpy as np
    from lora_data.shards import ShardReader
    from lora_runtime.collate import labels

    reader = ShardReader(shards)
    if reader.seq_len != SEQ_LEN:
        raise ValueError(f"{shards}: rows of {reader.seq_len}, this benchmark packs {SEQ_LEN}")
    rows = list(reader)
    ids = np.stack([r.input_ids.astype(np.int64) for r in rows])
    return (ids, [r.seq_lens.tolist() for r in rows], reader.pad_id,
            {"mask": np.stack([labels(r.input_ids, r.loss_mask, r.seq_lens) for r in rows]),
             # lora-data's train_on_inputs: every token of a sample
             "inputs": np.stack([labels(r.input_ids, np.ones_like(r.loss_mask), r.seq_lens) for r in rows])})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("records", help="records JSONL (tokenized and packed here) or a lora-data shards directory")
    ap.add_argument("out")
    ap.add_argument("--variants", default="liger_m2,liger_v_m2,flce_v_c_m2,liger_v_m8,flce_v_c_m8,flce_v_c_m8_gc")
    ap.add_argument("--steps", type=int, default=14)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--budget-s", type=float, default=1e9)
    ap.add_argument("--profile", help="VARIANT=PATH: two more steps of VARIANT under torch.profiler, tables to PATH")
    a = ap.parse_args()
    t0 = time.perf_counter()
    from lora_data import MANIFEST_NAME
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(a.model_dir)
    if (Path(a.records) / MANIFEST_NAME).is_file():  # lora-data shards: lora_sft's own token stream
        ids, lens, pad_id, label_rows = shard_rows(a.records)
    else:
        samples = common.tokenize(tok, common.read_records(a.records))
        ids, lens = common.pack_rows(samples, SEQ_LEN, tok.pad_token_id)
        pad_id, label_rows = tok.pad_token_id, None
    for name in a.variants.split(","):
        if time.perf_counter() - t0 > a.budget_s:
            common.write_result(a.out, f"compiled_{name}", {"variant": name, "error": "skipped: out of budget"})
            continue
        try:
            target, _, path = (a.profile or "").partition("=")
            payload = run(a.model_dir, (ids, lens, pad_id, label_rows), name, a.steps, a.warmup,
                          path if target == name else None)
        except Exception as e:
            traceback.print_exc()
            payload = {"variant": name, "error": f"{type(e).__name__}: {e}"[:2000], **common.memory()}
        print({k: payload.get(k) for k in ("variant", "tokens_per_s", "peak_alloc_gib", "step_s_median", "host_s_median",
                                           "loss_first", "loss_last", "loss_nonfinite_step", "grads_nonfinite_step1",
                                           "grads_nonfinite_names", "link_gb_s", "offloaded_gib_per_step", "error")},
              flush=True)
        common.write_result(a.out, f"compiled_{name}", payload)


if __name__ == "__main__":
    main()
