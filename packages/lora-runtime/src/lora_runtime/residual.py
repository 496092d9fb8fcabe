"""Adapters whose init changed the base: PiSSA and OLoRA start the adapter from the base weights' leading directions
and train on W − s·B₀A₀ (the residual), which PEFT rebuilds at every load (an SVD or QR of every adapted matrix)
and vLLM does not rebuild at all (it adds the adapter to W as it is).

The final adapter is therefore saved as a plain LoRA on the original base (PEFT's own conversion, done here on the
saved tensors so that it works alike for every backend): with the start B₀, A₀ kept from before
the first step, s·B·A − s·B₀A₀ = s·[B, −B₀]·[A; A₀], a LoRA of rank 2r whose alpha keeps s. Checkpoints stay in the
trained form, which is what resuming loads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lora_runtime.distributed import print0

RESIDUAL_INITS = ("pissa", "olora")  # of config.BASE_REWRITING_INITS, those saved for the original base
START_NAME = "initial-adapter.safetensors"  # in checkpoints/: the adapter before the first step


def start_path(config: Any) -> Path:
    """Where the start is: this run's checkpoints/, or, for a run resumed from another run's checkpoint (that has
    none here), that run's."""
    from lora_runtime.checkpoint import checkpoints_dir

    own = checkpoints_dir(config.ckpt_output_dir) / START_NAME
    other = Path(config.resume_from).parent / START_NAME if config.resume_from else None
    return other if not own.is_file() and other is not None and other.is_file() else own


def convertible(config: Any, model: Any, *, say: bool = False) -> bool:
    """Whether the final adapter is saved on the original base. Not with DoRA (its magnitudes were fitted to the
    residual base), nor where an adapted weight is shared (tied lm_head and embed_tokens: the init rewrote both,
    which an adapter on one cannot undo); PEFT loads those as trained, redoing the init. `say`: log why not."""
    if config.init_lora_weights not in RESIDUAL_INITS:
        return False
    why = "DoRA's magnitudes were fitted to the rewritten base" if config.use_dora else (
        "it adapts a weight another module shares (tied lm_head and embed_tokens), which the init rewrote for both"
        if _adapts_a_shared_weight(model) else "")
    if why and say:
        print0(f"init_lora_weights={config.init_lora_weights!r}: the adapter is saved as trained ({why}): PEFT "
               "loads it by redoing the init on the base; vLLM would serve another model (serve the merged model)")
    return not why


def _adapts_a_shared_weight(model: Any) -> bool:
    from collections import Counter

    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    return any(uses[id(m.get_base_layer().weight)] > 1 for m in model.modules()
               if hasattr(m, "lora_A") and hasattr(m, "get_base_layer"))


def keep_start(config: Any, save: Any) -> None:
    """Rank 0, before the first step of a fresh run: the adapter as initialised (`save(dir)` writes it as the final
    save would), kept in checkpoints/ for `to_plain_lora`."""
    import os
    import tempfile

    from lora_runtime.checkpoint import ADAPTER_WEIGHTS, checkpoints_dir

    root = checkpoints_dir(config.ckpt_output_dir)
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".initial-") as tmp:
        save(Path(tmp))
        with open(Path(tmp) / ADAPTER_WEIGHTS, "rb") as f:
            os.fsync(f.fileno())
        os.replace(Path(tmp) / ADAPTER_WEIGHTS, root / START_NAME)


def to_plain_lora(adapter_dir: Path, start: Path, init: str) -> bool:
    """Rewrite the saved adapter in `adapter_dir` as a plain LoRA on the original base (see the module docstring);
    False (and said) when the start was not kept (a run resumed from a checkpoint copied without it)."""
    if not start.is_file():
        print0(f"init_lora_weights={init!r}: the adapter's start ({start}) is missing, so the adapter is saved as "
               "trained: PEFT loads it (redoing the init on the base), vLLM would not serve the model trained")
        return False
    from safetensors.torch import load_file, save_file

    from lora_runtime.checkpoint import ADAPTER_CONFIG, ADAPTER_WEIGHTS

    trained, initial = load_file(str(adapter_dir / ADAPTER_WEIGHTS)), load_file(str(start))
    out = {}
    for key, t in trained.items():
        a, b = ".lora_A." in key or ".lora_embedding_A" in key, ".lora_B." in key or ".lora_embedding_B" in key
        if not (a or b):
            out[key] = t
            continue
        out[key] = _stack(t, initial[key].to(t.dtype), a)
    save_file(out, str(adapter_dir / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    cfg = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    grow = 2 ** 0.5 if cfg.get("use_rslora") else 2  # alpha / r (or alpha / √r) unchanged with r doubled
    cfg.update(init_lora_weights=True, r=2 * cfg["r"], lora_alpha=_times(grow, cfg["lora_alpha"]))
    for name, times in (("rank_pattern", 2), ("alpha_pattern", grow)):
        if cfg.get(name):
            cfg[name] = {k: _times(times, v) for k, v in cfg[name].items()}
    (adapter_dir / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    print0(f"init_lora_weights={init!r}: the adapter is saved as a plain LoRA of rank {cfg['r']} on the original "
           "base (the trained adapter less its start), which PEFT and vLLM load as trained")
    return True


def _stack(trained: Any, start: Any, is_a: bool) -> Any:
    """[A; A₀] along the rank (A is r × in), [B, −B₀] (B is out × r)."""
    import torch

    return torch.cat([trained, start], dim=0) if is_a else torch.cat([trained, -start], dim=1)


def _times(factor: float, value: float) -> float | int:
    out = factor * value
    return int(out) if float(out).is_integer() else out
