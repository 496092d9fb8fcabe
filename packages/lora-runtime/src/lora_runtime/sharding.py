"""`sharding="auto" | "ddp" | "fsdp"`: data parallelism with full replicas (DDP) or FSDP2 shards.

With `fsdp`, PyTorch's own `torch.distributed.fsdp.fully_shard` (FSDP2) wraps each decoder layer, then the root
(torchtune's `lora_finetune_distributed` layout): every GPU keeps 1/world of the frozen base weights, of the LoRA
weights and of their AdamW state, and all-gathers one layer at a time. On CUDA the shards compute in bf16 and the
LoRA gradients are reduce-scattered in fp32 (`MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`); the LoRA
weights themselves stay fp32 (PEFT creates them so). On a CPU (gloo) everything is fp32. Activation checkpointing is
the backend's own (transformers' per-layer checkpointing, as the memory plan decided): FSDP2's hooks sit inside it,
so a recomputed layer is all-gathered again in backward. Accumulation passes before the last skip the
reduce-scatter (the model's `no_sync`, which accelerate enters), keeping only the small LoRA gradients unsharded.

Loading (`load_sharded`): rank 0 reads the weights into host memory; the other ranks build the model on the meta
device, allocate only their shards, and receive rank 0's weights by broadcast: one copy in host RAM, not world.

Why we call `fully_shard` ourselves instead of letting the Trainer/accelerate do FSDP (`fsdp_config={"fsdp_version":
2}`): accelerate's path takes over model loading, the checkpoint format and the optimizer saving (its own FSDP
state-dict types) and needs an accelerate FSDP plugin per run; ours is a dozen lines, runs the same on a CPU with
gloo as on CUDA with NCCL (the tests), and keeps our checkpoints as they are. The Trainer must not wrap the sharded
model in DDP: the model is marked as prepared (`_is_accelerate_prepared`), which accelerate's `prepare_model` honours.

Checkpoints (any world size can resume any other: every file holds full, unsharded tensors keyed by name):
- the adapter: the LoRA weights all-gathered (only they, never the base) and written by rank 0 as a plain PEFT
  `adapter_model.safetensors`;
- `optimizer.pt`: the AdamW state gathered to rank 0 (`get_optimizer_state_dict(full_state_dict=True)`, keyed by
  parameter name), loaded back with `broadcast_from_rank0` into whatever sharding the resumed run has. It is the size
  of two copies of the LoRA weights in fp32, small beside the base; the scheduler and data position are as for DDP.

QLoRA: bitsandbytes' 4/8-bit weights are refused with fsdp (config.py says what to do instead).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lora_runtime.distributed import dist_env, print0

OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"


# ---------------------------------------------------------------------------------------------------- the decision
def per_gpu_weight_bytes(model_config: Any, world_size: int, four_bit: bool) -> float:
    """Weight bytes one GPU holds under FSDP with `world_size` ranks: its 1/world shard of every weight plus two
    unsharded decoder layers (the one computing and the next, prefetched) and the unsharded embeddings/head (the
    root's parameters, gathered around the whole forward and backward). 4-bit weights are not sharded: full size.

    >>> from types import SimpleNamespace as C
    >>> c = C(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, vocab_size=128256,
    ...       num_attention_heads=64, num_key_value_heads=8)  # Llama-3.1-70B shape
    >>> round(per_gpu_weight_bytes(c, 1, False) / 2**30, 1), round(per_gpu_weight_bytes(c, 8, False) / 2**30, 1)
    (131.4, 22.6)
    """
    from lora_runtime.batching import _dims, weight_bytes

    total = weight_bytes(model_config, four_bit)
    if four_bit or world_size <= 1:
        return total
    h, _, n, vocab = _dims(model_config)
    c = getattr(model_config, "text_config", None) or model_config
    root = vocab * h * (1 if getattr(c, "tie_word_embeddings", False) else 2) * 2.0
    layer = (total - root) / n
    return total / world_size + 2 * layer * (1 - 1 / world_size) + root * (1 - 1 / world_size)


def decide(config: Any, world_size: int, *, cuda: bool, model_config: Any = None,
           free_bytes: float | None = None) -> tuple[str, str]:
    """("ddp" | "fsdp", reason). `auto` shards only where a replica cannot train: on CUDA, under torchrun, when the
    bf16 base + one micro batch of activations (transformers+PEFT estimate, checkpointing as configured, on for auto)
    + headroom exceed the free memory of one GPU."""
    if config.sharding != "auto":
        return config.sharding, f"sharding='{config.sharding}' requested"
    if not cuda:
        return "ddp", "auto: no CUDA GPU, so replicas (ddp)"
    if world_size <= 1:
        return "ddp", "auto: one process, nothing to shard over (ddp)"
    if config.load_in_4bit or config.load_in_8bit:
        return "ddp", "auto: bitsandbytes 4/8-bit weights are not sharded by FSDP2, so replicas (ddp)"
    if config.enable_model_splitting:
        return "ddp", "auto: enable_model_splitting places the layers instead"
    if model_config is None or free_bytes is None:
        return "ddp", "auto: no model config or free memory to size it by (ddp)"
    from lora_runtime.batching import GIB, peft_footprint

    try:
        fp = peft_footprint(model_config, four_bit=False)
    except AttributeError as e:
        return "ddp", f"auto: cannot size {type(model_config).__name__} ({e}), so ddp"
    micro = config.micro_batch_size if isinstance(config.micro_batch_size, int) else 1
    gc = config.gradient_checkpointing in ("auto", True)
    need = fp.need(micro * config.max_seq_len, gc)
    act = fp.peak(micro * config.max_seq_len, gc) - fp.peak(0, gc)
    numbers = (f"bf16 base {fp.weights / GIB:.1f} GiB + activations of {micro} × {config.max_seq_len} tokens "
               f"{act / GIB:.1f} GiB, with overheads {need / GIB:.1f} GiB vs {free_bytes / GIB:.1f} GiB free on one GPU")
    if need <= free_bytes:
        return "ddp", f"auto: a replica fits ({numbers}), so ddp"
    shard = per_gpu_weight_bytes(model_config, world_size, four_bit=False)
    return "fsdp", f"auto: a replica does not fit ({numbers}), so fsdp: {shard / GIB:.1f} GiB of weights per GPU"


def resolve_sharding(config: Any) -> Any:
    """The config with `sharding` made concrete ("ddp" | "fsdp") and the reason logged on rank 0."""
    import dataclasses

    import torch

    world = dist_env().world_size
    cuda = torch.cuda.is_available()
    model_config = free = None
    if config.sharding == "auto" and cuda and world > 1 and not (config.load_in_4bit or config.load_in_8bit):
        from transformers import AutoConfig

        from lora_runtime.batching import memory_budget

        model_config = AutoConfig.from_pretrained(config.model_path, trust_remote_code=config.trust_remote_code)
        free = memory_budget(config, lowered=False)[0]  # a re-plan after an out-of-memory error keeps the mode
    mode, reason = decide(config, world, cuda=cuda, model_config=model_config, free_bytes=free)
    print0(f"sharding: {mode} ({reason})")
    return dataclasses.replace(config, sharding=mode).validate(world_size=world)


# ---------------------------------------------------------------------------------------------------- wrapping
def ensure_process_group() -> None:
    """FSDP2 needs a process group even for one process (world size 1): a 1-rank group on an in-memory store."""
    import torch
    import torch.distributed as dist

    from lora_runtime.distributed import init_process_group

    init_process_group()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def decoder_layers(model: Any) -> list[Any]:
    """The model's decoder layers: modules whose class transformers keeps whole (`_no_split_modules`)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if any(c.__name__ in names for c in type(m).__mro__)]  # FSDP2 subclasses
    if not layers:
        raise RuntimeError(f"sharding='fsdp': found no decoder layers in {type(base).__name__} (its "
                           "_no_split_modules is empty); pass sharding='ddp'")
    return layers


def shard_model(model: Any, precision: str) -> Any:
    """fully_shard each decoder layer, then the root; returns the (same, now sharded) model."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    ensure_process_group()
    cuda = torch.cuda.is_available()
    mesh = init_device_mesh("cuda" if cuda else "cpu", (dist_env().world_size,))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if precision == "bf16" \
        else MixedPrecisionPolicy()
    layers = decoder_layers(model)
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    model._is_accelerate_prepared = True  # accelerate's prepare_model returns it as is: no DDP around FSDP
    model.no_sync = functools.partial(_no_gradient_sync, model)  # what accelerate calls between accumulation passes
    print0(f"sharding: FSDP2 over {dist_env().world_size} rank(s), {len(layers)} decoder layers + root; "
           f"{'bf16 compute, fp32 gradient reduction' if precision == 'bf16' else f'{precision} throughout'}")
    return model


def load_sharded(backend: Any, config: Any, plan: Any, precision: str) -> tuple[Any, Any]:
    """(sharded LoRA model, tokenizer) with ONE copy of the weights in host memory however many ranks: rank 0 loads
    them (backend.load + add_lora, on the CPU); every other rank builds the same model on the meta device (no
    memory); all shard it, the others allocate their shards (`to_empty`), and rank 0's full weights (base, LoRA
    init) and buffers (rotary tables) are broadcast into every rank's shards."""
    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    ensure_process_group()
    main = dist_env().is_main
    if dist_env().world_size == 1:
        model, tokenizer = backend.load(config, plan)
        return shard_model(backend.add_lora(model, config, plan), precision), tokenizer
    model, tokenizer = backend.load(config, plan) if main else _meta_model(config)
    model = backend.add_lora(model, config, plan)
    full = dict(model.state_dict()) if main else {}
    model = shard_model(model, precision)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if not main:
        model.to_empty(device=device)
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)
    return model, tokenizer


def _meta_model(config: Any) -> tuple[Any, Any]:
    """What the peft backend's `load` builds (fsdp runs only with it), on the meta device: shapes, no weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from lora_runtime.backends.peft import attn_implementation

    cuda = torch.cuda.is_available()
    tokenizer = AutoTokenizer.from_pretrained(config.model_path, trust_remote_code=config.trust_remote_code)
    model_config = AutoConfig.from_pretrained(config.model_path, trust_remote_code=config.trust_remote_code)
    dtype = torch.bfloat16 if cuda and config.bf16 and torch.cuda.is_bf16_supported() else torch.float32
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config, dtype=dtype, attn_implementation=attn_implementation(
            config), trust_remote_code=config.trust_remote_code)
    model.config.use_cache = False
    return model, tokenizer


@contextlib.contextmanager
def _no_gradient_sync(model: Any) -> Iterator[None]:
    """Accumulation passes before the last keep their (LoRA-only, small) unsharded gradients and skip the
    reduce-scatter; the last pass reduces the sum once."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def is_sharded(model: Any) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


# ---------------------------------------------------------------------------------------------------- state
def gather_trainable(model: Any) -> dict[str, Any]:
    """Every trainable (LoRA) weight as a full CPU tensor, keyed by its parameter name, on rank 0 ({} elsewhere).
    A collective: every rank calls it. The frozen base is never gathered."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            full = p.full_tensor() if isinstance(p, DTensor) else p
            if dist_env().is_main:
                out[name] = full.detach().to("cpu", copy=True)
    return out


def save_adapter(model: Any, out_dir: str | Path, trainable: dict[str, Any]) -> Path:
    """Rank 0: the gathered LoRA weights as a plain PEFT adapter (`PeftModel.from_pretrained` loads it)."""
    model.save_pretrained(out_dir, state_dict=trainable, safe_serialization=True, save_embedding_layers=False)
    return Path(out_dir)


def load_adapter(model: Any, checkpoint_dir: str | Path) -> None:
    """Every rank: the checkpoint's PEFT adapter into the sharded LoRA weights (each rank keeps its shard)."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    saved = load_file(str(Path(checkpoint_dir) / "adapter_model.safetensors"))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    # PEFT's own renaming (it drops the adapter name) maps each parameter to its saved key; tensors tell them apart
    import torch

    tags = {n: torch.empty(0) for n in names}
    renamed = get_peft_model_state_dict(model, state_dict=tags, save_embedding_layers=False)
    by_id = {id(t): n for n, t in tags.items()}
    state: dict[str, Any] = {by_id[id(t)]: saved[key] for key, t in renamed.items()}
    missing = sorted(set(names) - set(state))
    if missing:
        raise RuntimeError(f"{checkpoint_dir}: the adapter lacks {len(missing)} LoRA weight(s), e.g. {missing[0]}")
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))


def save_optimizer(model: Any, optimizer: Any, scheduler: Any, out_dir: str | Path) -> None:
    """Every rank: gather the sharded AdamW state to rank 0, which writes it (and the scheduler) into `out_dir`."""
    import torch
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    state = get_optimizer_state_dict(model, _inner(optimizer),
                                     options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist_env().is_main:
        torch.save(state, Path(out_dir) / OPTIMIZER_FILE)
        torch.save(scheduler.state_dict(), Path(out_dir) / SCHEDULER_FILE)


def load_optimizer(model: Any, optimizer: Any, scheduler: Any, checkpoint_dir: str | Path) -> None:
    """Every rank: rank 0 reads the full AdamW state and broadcasts it into this run's shards (any world size)."""
    import torch
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    path = Path(checkpoint_dir)
    state = torch.load(path / OPTIMIZER_FILE, map_location="cpu", weights_only=True) if dist_env().is_main else {}
    set_optimizer_state_dict(model, _inner(optimizer), state,
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    scheduler.load_state_dict(torch.load(path / SCHEDULER_FILE, map_location="cpu", weights_only=True))


def _inner(optimizer: Any) -> Any:
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps torch's
