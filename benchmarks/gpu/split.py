"""Issue 6, model splitting: a Llama-3.1-70B-shaped model (random bf16 weights, 141 GB) that does not fit one H200,
trained with `lora_sft(..., enable_model_splitting=True)` over all visible GPUs of one process (device_map="balanced").

    python -m benchmarks.gpu.split OUT --tok .gpu/tok_llama8b --shards .gpu/shards_llama8b_8192 [--steps 8]

Phases, each timed and each leaving a result behind (`OUT/split_<shape>.json`, rewritten as it goes):
1. weights dir: /dev/shm/<shape> when /dev/shm has room, else /tmp/models/<shape>, else a result saying why not;
2. checkpoint: config.json + the tokenizer files of --tok + safetensors shards of ~5 GB with their index; tensors are
   drawn on the GPUs (N(0, 0.02), norms 1), copied to the host and written by 2 threads per GPU;
3. why one GPU is not enough: weights + LoRA state + activations vs the card's memory, printed and recorded;
4. lora_sft with a meter callback (steady tokens/s after --warmup steps, losses) and a budget guard that ends
   training early, after a whole step, when the rest would not fit in --budget-s; per-GPU peak memory;
5. the adapter is checked (adapter_model.safetensors), the weights dir is deleted (unless --keep-weights).
`--shape tiny-llama --cpu` runs the same code on a CPU (benchmarks/test_split_smoke.py).
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

from benchmarks.gpu import common

SHAPES = {  # Llama-3.1-70B: 70.55 G parameters
    "llama70b": dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                     num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=131072),
    "llama8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072),
    "tiny-llama": dict(vocab_size=1152, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096),
}
SHARD_BYTES = 5 * 10**9
HEADROOM_BYTES = 9 * 10**9  # tokenizer, tmpfs bookkeeping, what else lands there: 141 GB of weights → 150 GB asked
LORA_R = 16
GIB = 1024**3


def llama_config(shape: str, tok_dir: Path):
    """The LlamaConfig of `shape` with the special-token ids of the tokenizer in `tok_dir`."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig

    tok = AutoTokenizer.from_pretrained(tok_dir)
    spec = SHAPES[shape]
    if len(tok) > spec["vocab_size"]:
        raise ValueError(f"--tok {tok_dir} has {len(tok)} tokens > vocab_size {spec['vocab_size']} of --shape {shape}")
    cfg = LlamaConfig(**spec, tie_word_embeddings=False, rms_norm_eps=1e-5,
                      rope_parameters={"rope_type": "default", "rope_theta": 5e5},
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    cfg.dtype = torch.bfloat16
    return cfg


def param_specs(cfg) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every saved tensor, in module order, from the model transformers builds (on the meta device)."""
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    return [(n, tuple(t.shape)) for n, t in model.state_dict().items()]


def plan_shards(specs, shard_bytes: int = SHARD_BYTES) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Consecutive tensors grouped into shards of at most `shard_bytes` of bf16 (one bigger tensor stays alone).

    >>> [[n for n, _ in s] for s in plan_shards([("a", (2,)), ("b", (2,)), ("c", (3,))], 8)]
    [['a', 'b'], ['c']]
    """
    shards, cur, size = [], [], 0
    for name, shape in specs:
        n = 2 * _numel(shape)
        if cur and size + n > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, shape))
        size += n
    return shards + ([cur] if cur else [])


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def pick_weights_dir(shape: str, needed: int, override: str | None) -> tuple[Path | None, dict]:
    """The first candidate with `needed` bytes free (what an earlier copy there holds counts as free)."""
    import os

    candidates = [Path(override)] if override else [Path("/dev/shm") / shape, Path("/tmp/models") / shape]
    seen = {}
    for d in candidates:
        root = next((p for p in [d, *d.parents] if p.exists()), None)
        if root is None:
            continue
        free = shutil.disk_usage(root).free + (_dir_bytes(d) if d.exists() else 0)
        seen[str(d)] = free
        if free >= needed and os.access(root, os.W_OK):
            return d, {"needed_bytes": needed, "free_bytes": seen}
    return None, {"needed_bytes": needed, "free_bytes": seen}


def _dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


def write_checkpoint(out: Path, cfg, tok_dir: Path, devices: list[str], *, specs=None, writers_per_device: int = 2,
                     shard_bytes: int = SHARD_BYTES) -> dict:
    """config.json, the tokenizer files, random bf16 safetensors shards and their index; returns phase times."""
    t0 = time.perf_counter()
    specs = specs or param_specs(cfg)
    shards = plan_shards(specs, shard_bytes)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    workers = [devices[w % len(devices)] for w in range(len(devices) * writers_per_device)]
    times = [{"generate_s": 0.0, "write_s": 0.0} for _ in workers]
    errors: list[BaseException] = []
    stop = threading.Event()

    def work(w: int) -> None:
        try:
            for k in range(w, len(shards), len(workers)):
                if not stop.is_set():
                    _write_shard(shards[k], out / names[k], workers[w], seed=k, times=times[w])
        except BaseException as e:  # re-raised in the main thread below
            errors.append(e)
            stop.set()

    threads = [threading.Thread(target=work, args=(w,), daemon=True) for w in range(len(workers))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:  # SIGTERM in the main thread: let the writers finish their shard, so the dir can be deleted after
        stop.set()
        for t in threads:
            t.join()
    if errors:
        raise errors[0]
    _release_gpus()
    total = sum(2 * _numel(s) for _, s in specs)
    index = {"metadata": {"total_size": total, "total_parameters": total // 2},
             "weight_map": {n: names[k] for k, shard in enumerate(shards) for n, _ in shard}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    for f in Path(tok_dir).iterdir():  # verbatim, so the shards' tokenizer fingerprint matches
        if f.is_file() and f.name not in ("config.json", "generation_config.json"):
            shutil.copy(f, out / f.name)
    cfg.save_pretrained(out)  # last: a dir with config.json is complete
    wall = time.perf_counter() - t0
    return {"params": total // 2, "weights_bytes": total, "shards": len(shards), "writer_threads": len(workers),
            "devices": sorted(set(devices)), "generate_s_max_thread": max(t["generate_s"] for t in times),
            "write_s_max_thread": max(t["write_s"] for t in times),
            "generate_s_sum": sum(t["generate_s"] for t in times), "write_s_sum": sum(t["write_s"] for t in times),
            "checkpoint_wall_s": wall, "checkpoint_gb_per_s": total / 1e9 / wall}


def _release_gpus() -> None:
    """Give the generator's cached blocks back and restart the peak counters, so peaks below are training's."""
    import torch

    for i in range(torch.cuda.device_count()):
        with torch.cuda.device(i):
            torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(i)


def _write_shard(shard, path: Path, device: str, seed: int, times: dict) -> None:
    import torch
    from safetensors.torch import save_file

    t0 = time.perf_counter()
    g = torch.Generator(device=device).manual_seed(seed)
    tensors = {}
    for name, shape in shard:
        if len(shape) == 1:  # RMSNorm weights
            tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
        else:
            t = torch.empty(shape, dtype=torch.bfloat16, device=device).normal_(0.0, 0.02, generator=g)
            tensors[name] = t.cpu()
            del t
    t1 = time.perf_counter()
    save_file(tensors, str(path), metadata={"format": "pt"})
    times["generate_s"] += t1 - t0
    times["write_s"] += time.perf_counter() - t1


def fit_arithmetic(cfg, seq_len: int, weights_bytes: int, card_bytes: int | None) -> dict:
    """Bytes one GPU would need to train: bf16 weights, LoRA r=16 on all 7 projections in fp32 (param, grad, 2 Adam
    moments), and activations of one 1×seq_len row with gradient checkpointing: a bf16 hidden state saved per layer,
    one layer recomputed (~10 hidden + 5 intermediate wide bf16 tensors) and the logits (bf16, fp32 copy, fp32
    log-softmax and fp32 gradient: 14 bytes per vocab entry)."""
    h, i, v, layers = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_hidden_layers
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    lora_params = layers * LORA_R * ((h + h) * 2 + (h + kv) * 2 + (h + i) * 3)
    parts = {
        "weights_bf16": weights_bytes,
        "lora_fp32_param_grad_adam2": lora_params * 16,
        "act_checkpoints": layers * seq_len * h * 2,
        "act_one_layer_recompute": seq_len * (10 * h + 5 * i) * 2,
        "act_logits_loss": seq_len * v * 14,
    }
    need = sum(parts.values())
    return {"lora_params": lora_params, "bytes": parts, "need_bytes": need, "need_gib": need / GIB,
            "card_bytes": card_bytes, "card_gib": card_bytes / GIB if card_bytes else None,
            "weights_share_of_card": weights_bytes / card_bytes if card_bytes else None,
            "need_over_card": need / card_bytes if card_bytes else None,
            "fits_one_gpu": need <= card_bytes if card_bytes else None, "seq_len": seq_len}


def _fit_line(fit: dict) -> str:
    """One line for the log: what one GPU would have to hold, part by part, against its memory."""
    parts = " + ".join(f"{k} {v / GIB:.1f}" for k, v in fit["bytes"].items())
    card = f"{fit['card_gib']:.1f} GiB card: {fit['need_over_card']:.2f}x" if fit["card_bytes"] else "no GPU here"
    return f"FIT one GPU, 1x{fit['seq_len']} row, LoRA r={LORA_R}: {parts} = {fit['need_gib']:.1f} GiB vs {card}"


class _Budget(Exception):
    """SIGTERM (the caller's timeout): unwind to the cleanup and the result file."""


def _on_sigterm(signum, frame):
    raise _Budget("SIGTERM: stopped by the caller's timeout")


def _callback(meter: common.StepMeter, deadline: float, reserve_s: float, info: dict):
    """Meter every logged step; after a step, end training (as a completed run, so the adapter is written) when one
    more step plus `reserve_s` would pass `deadline`; record per-GPU memory when training starts."""
    import torch
    from transformers import TrainerCallback

    class SplitMeter(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            meter.start()
            self.seen = 0
            info["train_begin_s"] = time.perf_counter()
            info["allocated_at_train_begin_gib"] = [torch.cuda.memory_allocated(i) / GIB
                                                    for i in range(torch.cuda.device_count())]
            dmap = getattr(model, "hf_device_map", None) or {}
            info["device_map_modules"] = {str(d): sum(1 for v in dmap.values() if v == d) for d in set(dmap.values())}
            info["param_devices"] = sorted({str(p.device) for p in model.parameters()})

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                seen = int(logs.get("tokens_seen", state.num_input_tokens_seen))
                meter.step(seen - self.seen, logs["loss"])
                self.seen = seen

        def on_step_end(self, args, state, control, **kw):
            now = time.perf_counter()
            last = now - getattr(self, "t_last", info["train_begin_s"])
            self.t_last = now
            if state.global_step < state.max_steps and now + last + reserve_s > deadline:
                info["stopped_by_budget_after_step"] = state.global_step
                state.max_steps = state.global_step  # a finished run to lora_runtime: the adapter is saved
                control.should_training_stop = True

    return SplitMeter()


def train(a, model_dir: Path, deadline: float) -> dict:
    """lora_sft with model splitting over every visible GPU; tokens/s, losses, per-GPU peaks, the adapter's size."""
    import torch
    from lora_runtime import lora_sft

    seq_len = a.seq_len or json.loads((Path(a.shards) / "manifest.json").read_text())["seq_len"]
    meter, info = common.StepMeter(warmup=a.warmup), {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="split_out_") as tmp:
        res = lora_sft(str(model_dir), a.shards, tmp, backend=a.backend, enable_model_splitting=not a.cpu, lora_r=LORA_R,
                       lora_alpha=2 * LORA_R, target_modules=common.LORA_TARGETS, max_seq_len=seq_len,
                       micro_batch_size=1, gradient_checkpointing=True, max_steps=a.steps, save_steps=10**6,
                       logging_steps=1, save_model=True, callbacks=[_callback(meter, deadline, a.reserve_s, info)])
        adapter = Path(tmp) / "adapter_model.safetensors"
        saved = {"adapter_saved": adapter.is_file(), "adapter_bytes": adapter.stat().st_size if adapter.is_file()
                 else None, "adapter_files": sorted(p.name for p in Path(tmp).iterdir())}
    n = torch.cuda.device_count()
    peaks = [torch.cuda.max_memory_allocated(i) / GIB for i in range(n)]
    return {"seq_len": seq_len, "steps_requested": a.steps, "steps": res.steps, "tokens_seen": res.tokens_seen,
           "backend_used": res.backend, "final_loss": res.final_loss, "losses": meter.losses,
           "load_and_setup_s": info.get("train_begin_s", t0) - t0, "lora_sft_total_s": time.perf_counter() - t0,
           "peak_alloc_gib_per_gpu": peaks, "peak_reserved_gib_per_gpu": [torch.cuda.max_memory_reserved(i) / GIB
                                                                          for i in range(n)],
           "peak_alloc_gib": max(peaks, default=None), "peak_alloc_gib_sum": sum(peaks), **saved,
           **{k: v for k, v in info.items() if k != "train_begin_s"},
           **{("meter_error" if k == "error" else k): v for k, v in meter.summary().items()}}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="results folder")
    ap.add_argument("--tok", required=True, help="tokenizer dir (copied next to the weights)")
    ap.add_argument("--shards", required=True, help="shard dir prepared with that tokenizer")
    ap.add_argument("--shape", default="llama70b", choices=sorted(SHAPES))
    ap.add_argument("--backend", default="peft")
    ap.add_argument("--seq-len", type=int, default=None, help="default: the shards' seq_len")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2, help="steps left out of the steady tokens/s")
    ap.add_argument("--budget-s", type=float, default=540)
    ap.add_argument("--reserve-s", type=float, default=45, help="kept for adapter save, cleanup and the result")
    ap.add_argument("--min-train-s", type=float, default=150, help="skip training when less is left after writing")
    ap.add_argument("--weights-dir", default=None, help="instead of /dev/shm/SHAPE, /tmp/models/SHAPE")
    ap.add_argument("--keep-weights", action="store_true")
    ap.add_argument("--reuse-weights", action="store_true", help="train on a complete checkpoint already in the dir")
    ap.add_argument("--cpu", action="store_true", help="draw the weights on the CPU (tiny shapes)")
    ap.add_argument("--no-train", action="store_true", help="write the checkpoint only")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    a = parse_args(argv)
    t0 = time.perf_counter()
    name = "split_" + a.shape.replace("-", "")
    payload: dict = {"shape": a.shape, "backend": a.backend, "phases": {}}
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    weights: list[Path] = []  # set once chosen, so the cleanup below finds it
    try:
        _phases(a, name, payload, t0 + a.budget_s, weights)
    except BaseException as e:  # SIGTERM, OOM, a lora_sft error: all end in the result file
        traceback.print_exc()
        payload["error"] = f"{type(e).__name__}: {e}"[:2000]
    finally:
        if weights and weights[0].exists() and not a.keep_weights:
            t = time.perf_counter()
            shutil.rmtree(weights[0], ignore_errors=True)
            payload["phases"]["delete_weights_s"] = time.perf_counter() - t
        payload["total_s"] = time.perf_counter() - t0
        signal.signal(signal.SIGTERM, previous)
    return _save(a, name, payload, final=True)


def _phases(a, name: str, payload: dict, deadline: float, weights: list[Path]) -> None:
    """Weights dir → checkpoint → fit arithmetic → training, recording into `payload` as each phase ends."""
    import torch

    devices = ["cpu"] if a.cpu else [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if not devices:
        raise RuntimeError("no CUDA device visible; pass --cpu for a tiny shape")
    payload["device_count"] = torch.cuda.device_count()
    cfg = llama_config(a.shape, Path(a.tok))
    specs = param_specs(cfg)
    total = 2 * sum(_numel(s) for _, s in specs)
    chosen, where = pick_weights_dir(a.shape, total + HEADROOM_BYTES, a.weights_dir)
    payload["weights_dir"] = {"path": str(chosen) if chosen else None, **where}
    if chosen is None:
        payload["error"] = (f"no room for {total / 1e9:.1f} GB of weights: need {where['needed_bytes']:,} bytes "
                            f"free, have {where['free_bytes']} bytes")
        return
    weights.append(chosen)
    _save(a, name, payload, final=False)
    if a.reuse_weights and (chosen / "config.json").exists():
        ck = {"weights_bytes": total, "params": total // 2, "reused": True}
    else:
        ck = write_checkpoint(chosen, cfg, Path(a.tok), devices, specs=specs)
    payload["phases"]["checkpoint"] = ck
    card = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None
    seq = a.seq_len or json.loads((Path(a.shards) / "manifest.json").read_text())["seq_len"]
    payload["fit"] = fit_arithmetic(cfg, seq, ck["weights_bytes"], card)
    print(_fit_line(payload["fit"]), flush=True)
    _save(a, name, payload, final=False)
    left = deadline - time.perf_counter()
    if a.no_train:
        payload["train"] = {"skipped": "--no-train"}
    elif left < a.min_train_s:
        payload["error"] = f"skipped training: {left:.0f} s left after writing the weights < --min-train-s"
    else:
        payload["train"] = train(a, chosen, deadline)
        payload["fit"]["measured_peak_sum_gib"] = payload["train"]["peak_alloc_gib_sum"]
        for k in ("tokens_per_s", "peak_alloc_gib", "warmup_s"):
            payload[k] = payload["train"].get(k)


def _save(a, name: str, payload: dict, final: bool) -> dict:
    """Partial results are written silently; the final one prints the `RESULT` line and a summary line."""
    import contextlib
    import io

    with contextlib.redirect_stdout(sys.stdout if final else io.StringIO()):
        common.write_result(a.out, name, payload)
    if final:
        tr, ck, fit = payload.get("train") or {}, payload["phases"].get("checkpoint") or {}, payload.get("fit") or {}
        print(f"RESULT {name} summary: " + json.dumps({
            "gpus": payload.get("device_count"), "params": ck.get("params"),
            "checkpoint_s": ck.get("checkpoint_wall_s"), "load_s": tr.get("load_and_setup_s"),
            "steps": tr.get("steps"), "tokens_per_s": tr.get("tokens_per_s"),
            "peak_gib_per_gpu": tr.get("peak_alloc_gib_per_gpu"), "one_gpu_need_gib": fit.get("need_gib"),
            "card_gib": fit.get("card_gib"), "adapter_bytes": tr.get("adapter_bytes"),
            "total_s": payload.get("total_s"), "error": payload.get("error")}, default=str), flush=True)
    return payload


if __name__ == "__main__":
    main()
