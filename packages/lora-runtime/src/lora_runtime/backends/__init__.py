"""`select_backend("auto"|"unsloth"|"peft")` → (Backend, reason). The reason is logged by the loop on rank 0.

`auto` picks unsloth only when CUDA is available AND unsloth imports cleanly (under torchrun too), and peft with
enable_model_splitting (measured with transformers+PEFT only). Importing unsloth patches
transformers and TRL process-wide, so the probe for `auto` runs in a subprocess when CUDA is present, and a peft
run never imports it. (Unsloth also imports on a CPU, where it silently turns packing off: CUDA is checked first.)
"""

from __future__ import annotations

import os
import subprocess
import sys
from functools import lru_cache
from importlib.util import find_spec as importlib_util_find_spec

from lora_runtime.backends.base import Backend

__all__ = ["Backend", "select_backend"]


@lru_cache(maxsize=1)
def unsloth_importable() -> tuple[bool, str]:
    """(ok, detail) from `import unsloth` in a child process, so this process stays unpatched."""
    if importlib_util_find_spec("unsloth") is None:
        return False, "unsloth is not installed (pip install 'lora-runtime[gpu]')"
    probe = subprocess.run([sys.executable, "-c", "import unsloth"], capture_output=True, text=True, timeout=600,
                           env=_probe_env())
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        return False, f"`import unsloth` failed: {last}"
    return True, "unsloth imports cleanly"


def _probe_env() -> dict[str, str]:
    """Under torchrun, the probe sees only this rank's GPU: N probes on GPU 0 would skew rank 0's free-memory reading
    (LOCAL_RANK=1 with CUDA_VISIBLE_DEVICES=4,5 → "5")."""
    env = dict(os.environ)
    if "LOCAL_RANK" in env:
        local = int(env["LOCAL_RANK"])
        visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d]
        env["CUDA_VISIBLE_DEVICES"] = visible[local] if local < len(visible) else str(local)
    return env


def select_backend(name: str = "auto", *, splitting: bool = False, sharding: str = "ddp") -> tuple[Backend, str]:
    """The backend object and a one-line reason for choosing it (`splitting`: enable_model_splitting is on;
    `sharding`: the resolved "ddp" | "fsdp")."""
    if name not in ("auto", "unsloth", "peft"):
        raise ValueError(f"backend must be one of auto, unsloth, peft; got {name!r}")
    if name == "peft":
        return _peft(), "backend='peft' requested"
    import torch

    cuda = torch.cuda.is_available()
    if name == "unsloth":
        if not cuda:
            raise RuntimeError("backend='unsloth' needs a CUDA GPU (on a CPU Unsloth silently turns packing off); "
                               "use backend='peft' or 'auto'")
        return _unsloth(), "backend='unsloth' requested"
    if not cuda:
        return _peft(), "auto: no CUDA device, so transformers+PEFT"
    if sharding == "fsdp":
        return _peft(), "auto: sharding='fsdp' runs with transformers+PEFT (Unsloth's patched models are not FSDP2-tested)"
    if splitting:
        return _peft(), ("auto: enable_model_splitting (accelerate's device map over the GPUs) is measured with "
                         "transformers+PEFT only")
    ok, detail = unsloth_importable()
    if not ok:
        return _peft(), f"auto: CUDA available but {detail}, so transformers+PEFT"
    return _unsloth(), f"auto: CUDA available and {detail}"


def _peft() -> Backend:
    from lora_runtime.backends.peft import PeftBackend

    return PeftBackend()


def _unsloth() -> Backend:
    from lora_runtime.backends.unsloth import UnslothBackend

    return UnslothBackend()
