"""Shared pieces of the GPU peer harness: environment, model shapes, data, packing, step timing and result files.

Every figure a run writes is one JSON file under the results folder with the card, the package versions, the command,
the warm-up time (compile included) apart from the steady-state tokens/s, and the peak memory.
Nothing here imports torch at module import, so `make_data` and the CPU side can use it cheaply.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "UNSLOTH_DISABLE_STATISTICS": "1",
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "WANDB_DISABLED": "true",
}
for _k, _v in OFFLINE_ENV.items():
    os.environ.setdefault(_k, _v)

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Random-weight shapes (shared/gpu/README.md). Non-embedding params + tied embedding give ~1.54 G for Qwen2.5-1.5B.
SHAPES = {
    "qwen1.5b": dict(
        arch="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
        num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e6,
        max_position_embeddings=32768, rms_norm_eps=1e-6,
    ),
    "tiny": dict(  # CPU smoke tests of the harness only
        arch="qwen2", vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e6,
        max_position_embeddings=4096, rms_norm_eps=1e-6,
    ),
    "llama8b": dict(
        arch="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False, rope_theta=5e5,
        max_position_embeddings=131072, rms_norm_eps=1e-5,
    ),
}


def flops_per_token(shape: str, gradient_checkpointing: bool = True) -> float:
    """LoRA training FLOPs a token, matmuls only: forward 2N, input-gradient backward 2N (frozen base: no weight
    gradients), recomputation 2N more with checkpointing (the lm_head is not recomputed; ignored here)."""
    s = SHAPES[shape]
    h, i, n_l = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"]
    head = h // s["num_attention_heads"]
    attn = h * h * 2 + 2 * h * head * s["num_key_value_heads"]
    n = n_l * (attn + 3 * h * i) + h * s["vocab_size"]
    return (6 if gradient_checkpointing else 4) * n


def build_model(shape: str, out_dir: str | Path, tokenizer_dir: str | Path) -> Path:
    """Random bf16 weights from a config, built on the GPU, saved with the tokenizer: users' `from_pretrained` path."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, Qwen2Config

    out = Path(out_dir)
    if (out / "config.json").exists():
        return out
    if shape == "llama8b" and torch.cuda.is_available():  # 16 GB: drawn on the GPUs, written by threads (split.py)
        from benchmarks.gpu import split

        cfg = split.llama_config(shape, Path(tokenizer_dir))
        split.write_checkpoint(out, cfg, Path(tokenizer_dir), [f"cuda:{i}" for i in range(torch.cuda.device_count())])
        return out
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    spec = dict(SHAPES[shape])
    arch = spec.pop("arch")
    theta = spec.pop("rope_theta")
    spec["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
    spec.update(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    cfg = (Qwen2Config if arch == "qwen2" else LlamaConfig)(**spec)
    cfg.dtype = torch.bfloat16
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(out)
    del model
    import shutil

    for f in Path(tokenizer_dir).iterdir():  # verbatim, so the shards' tokenizer fingerprint matches
        if f.is_file() and f.name not in ("config.json", "generation_config.json"):
            shutil.copy(f, out / f.name)
    return out


def read_records(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def render_texts(tokenizer, records: list[dict]) -> list[str]:
    """The text training-hub feeds TRL: the chat template rendered, loss on everything (its `chat_template` path)."""
    return [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in records]


def tokenize(tokenizer, records: list[dict]) -> list[list[int]]:
    return tokenizer(render_texts(tokenizer, records), add_special_tokens=False)["input_ids"]


def pack_rows(samples: list[list[int]], seq_len: int, pad_id: int):
    """Best-fit-decreasing packing into rows of `seq_len`; returns (ids [R, seq_len] int64, per-row sample lengths).

    >>> ids, lens = pack_rows([[1, 2, 3], [4, 5, 6, 7], [8]], 4, 0)
    >>> ids.tolist(), lens
    ([[4, 5, 6, 7], [1, 2, 3, 8]], [[4], [3, 1]])
    """
    import numpy as np

    order = sorted(range(len(samples)), key=lambda i: -len(samples[i]))
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        n = len(samples[i])
        if n > seq_len:
            raise ValueError(f"sample {i} has {n} tokens > seq_len {seq_len}")
        best = min((f, r) for r, f in enumerate(free) if f >= n) if any(f >= n for f in free) else None
        if best is None:
            rows.append([i])
            free.append(seq_len - n)
        else:
            rows[best[1]].append(i)
            free[best[1]] -= n
    ids = np.full((len(rows), seq_len), pad_id, dtype=np.int64)
    lens = []
    for r, members in enumerate(rows):
        flat = [t for i in members for t in samples[i]]
        ids[r, : len(flat)] = flat
        lens.append([len(samples[i]) for i in members])
    return ids, lens


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def profiled(step, n: int = 2):
    """`n` calls of `step` under torch.profiler (host and CUDA activity), the device synchronised at the end."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            step()
        sync()
    return prof


@dataclass
class StepMeter:
    """Wall time per optimizer step (device synchronised), real tokens per step; the first `warmup` steps
    (compilation, autotuning, allocator growth) are reported apart from the steady state."""

    warmup: int
    marks: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    t_start: float = 0.0
    first_step_unix: float | None = None  # wall clock of the first optimizer step: start-up = this - process start

    def start(self) -> None:
        sync()
        self.t_start = time.perf_counter()

    def step(self, n_tokens: int, loss: float | None = None) -> None:
        """Marks a step's end, once the device is done with it."""
        sync()
        self.marks.append(time.perf_counter())
        if self.first_step_unix is None:
            self.first_step_unix = time.time()
        self.tokens.append(int(n_tokens))
        if loss is not None:
            self.losses.append(float(loss))

    def summary(self) -> dict:
        w = self.warmup
        if len(self.marks) <= w + 1:
            return {"error": f"only {len(self.marks)} steps, need > {w + 1}", "first_step_unix": self.first_step_unix}
        steady_s = self.marks[-1] - self.marks[w]
        steady_tok = sum(self.tokens[w + 1 :])
        step_s = [b - a for a, b in zip(self.marks[w:], self.marks[w + 1 :], strict=False)]
        return {
            "tokens_per_s": steady_tok / steady_s,
            "steady_steps": len(self.marks) - w - 1,
            "step_s_median": sorted(step_s)[len(step_s) // 2],
            "tokens_per_step": steady_tok / (len(self.marks) - w - 1),
            "first_step_s": self.marks[0] - self.t_start,
            "first_step_unix": self.first_step_unix,
            "warmup_s": self.marks[w] - self.t_start,
            "loss_first": self.losses[0] if self.losses else None,
            "loss_last": self.losses[-1] if self.losses else None,
            "loss_nonfinite_step": first_nonfinite(enumerate(self.losses, 1)),
        }


def first_nonfinite(losses) -> int | None:
    """The first step whose loss is NaN or infinite, of (step, loss) pairs in order; None if every one is finite. A
    run past it is not training: its kernels work on NaN, and a GEMM over NaN draws less power, so on a power-capped
    card it clocks higher and reads faster than one that trains (Qwen2.5-1.5B shape on one H100 at its 700 W cap:
    1,845-1,965 MHz against 1,725-1,905 MHz for lora_sft's finite run; benchmarks/RESULTS.md, `frontier`).

    >>> first_nonfinite([(1, 12.2), (2, float("nan")), (3, 4.0)]), first_nonfinite([(1, 1.0)])
    (2, None)
    """
    return next((step for step, loss in losses if not math.isfinite(loss)), None)


def versions() -> dict:
    from importlib import metadata

    out = {"python": sys.version.split()[0]}
    for pkg in ("torch", "transformers", "peft", "trl", "accelerate", "unsloth", "unsloth_zoo", "bitsandbytes",
                "training-hub", "triton", "liger-kernel"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[pkg] = metadata.version(pkg)
    return out


def card() -> str:
    if "torch" not in sys.modules:  # a process that failed before importing torch: do not pay for it now
        from benchmarks.gpu.rows import card as smi_card

        return smi_card()
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    return f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"


def cap_memory(budget_gib: float | None) -> float | None:
    """Cap this process's CUDA caching allocator at `budget_gib` (None: the whole card); returns the fraction set.

    `torch.cuda.set_per_process_memory_fraction` makes any allocation past the cap raise an out-of-memory error, so
    a run measured under a budget cannot have used more. No-op without CUDA.
    """
    import torch

    if not torch.cuda.is_available():
        return None
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    fraction = 1.0 if budget_gib is None else min(1.0, budget_gib * 1024**3 / total)
    torch.cuda.set_per_process_memory_fraction(fraction)
    return fraction


def memory() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {}
    g = 1024**3
    return {
        "peak_alloc_gib": torch.cuda.max_memory_allocated() / g,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / g,
    }


def allocator_counts() -> dict:
    """The CUDA caching allocator's running counts since the process began: allocations retried after freeing its
    cache (`alloc_retries`, a device sync each) and memory taken from the driver (`device_allocs`). {} on a CPU."""
    import torch

    if not torch.cuda.is_available():
        return {}
    stats = torch.cuda.memory_stats()
    return {"alloc_retries": stats.get("num_alloc_retries", 0), "device_allocs": stats.get("num_device_alloc", 0)}


def write_result(out_dir: str | Path, name: str, payload: dict) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "name": name,
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "card": card(),
        "command": " ".join(sys.argv),
        "versions": versions(),
        **payload,
    }
    path = out / f"{name}.json"
    path.write_text(json.dumps(payload, indent=1, default=str))
    print(f"RESULT {name}: " + json.dumps({k: payload.get(k) for k in ("tokens_per_s", "peak_alloc_gib", "warmup_s",
                                                                     "error")}, default=str), flush=True)
    return path


def asdict_safe(obj) -> dict:
    return asdict(obj)
