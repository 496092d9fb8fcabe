"""`select_backend("auto"|"unsloth"|"peft")` → (Backend, reason). The reason is logged by the loop on rank 0.

`auto` picks unsloth only when CUDA is available AND unsloth imports cleanly (under torchrun too), and peft with
enable_model_splitting (measured with transformers+PEFT only) and where the peft backend's compiled path is the faster
one for the memory budget (`lora_runtime.compiled.prefers`: decided before anything imports Unsloth). Importing unsloth patches
transformers and TRL process-wide, so the probe for `auto` runs in a subprocess when CUDA is present (once per
environment: its answer is cached by package versions), and a peft run never imports it. A run that will use
unsloth imports it before transformers (`import_unsloth_first`), as Unsloth asks. (Unsloth also imports on a CPU, where it silently turns packing off: CUDA is checked first.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import lru_cache
from importlib.util import find_spec as importlib_util_find_spec
from pathlib import Path
from typing import TYPE_CHECKING

from lora_runtime.backends.base import Backend

if TYPE_CHECKING:
    from lora_runtime.config import LoraSftConfig

__all__ = ["Backend", "import_unsloth_first", "select_backend"]


PROBE = "from lora_runtime.backends.unsloth import import_unsloth; import_unsloth()"  # as the run will import it
PROBED_PACKAGES = ("unsloth", "unsloth_zoo", "torch", "transformers", "peft", "trl", "bitsandbytes", "triton")


@lru_cache(maxsize=1)
def unsloth_importable() -> tuple[bool, str]:
    """(ok, detail) from `import unsloth` in a child process, so this process stays unpatched. The answer is kept in
    the user's cache (`probe_cache_path`) keyed by this interpreter and the versions of the packages involved, so
    the 15-40 s child import happens once per environment, not once per run."""
    if "unsloth" in sys.modules:
        return True, "unsloth is imported in this process"
    if importlib_util_find_spec("unsloth") is None:
        return False, "unsloth is not installed (pip install 'lora-runtime[gpu]')"
    key = _probe_key()
    cached = _read_probe_cache().get(key)
    if cached is not None:
        return bool(cached["ok"]), f"{cached['detail']} (probed {cached['when']}, same versions)"
    probe = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=600,
                           env=_probe_env())
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        ok, detail = False, f"`import unsloth` failed: {last}"
    else:
        ok, detail = True, "unsloth imports cleanly"
    _write_probe_cache(key, ok, detail)
    return ok, detail


def probe_cache_path() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "lora-sft" / "backend-probe.json"


def _probe_key() -> str:
    from lora_runtime.backends.unsloth import TRL_PATCHES_ENV
    from lora_runtime.versions import installed

    env = [f"{v}={os.environ.get(v, '')}" for v in (TRL_PATCHES_ENV, "UNSLOTH_ALLOW_CPU")]
    return " ".join([sys.executable, *(f"{pkg}=={v or 'none'}" for pkg, v in installed(PROBED_PACKAGES).items()),
                     *env, PROBE])


def _read_probe_cache() -> dict:
    try:
        data = json.loads(probe_cache_path().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_probe_cache(key: str, ok: bool, detail: str) -> None:
    """Best effort (a read-only home only costs the next run another probe); written atomically."""
    import datetime

    data = {**_read_probe_cache(), key: {"ok": ok, "detail": detail,
                                         "when": datetime.date.today().isoformat()}}
    path = probe_cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass


def import_unsloth_first(config: LoraSftConfig, compiled: bool | None = None) -> None:
    """Import unsloth before transformers, peft or trl are, where this run will train with it: Unsloth patches
    them on import and warns ("should be imported before transformers, peft") that patches may not apply otherwise.

    Only where the backend is already certain (CUDA, no model splitting, no sharding to decide) and the probe says
    unsloth imports: a run that ends up on the peft backend must never carry Unsloth's patches.
    """
    from lora_runtime.distributed import dist_env
    from lora_runtime.kernels import embedding_targets

    if config.backend == "peft" or config.enable_model_splitting or config.activation_offload is True or "unsloth" in sys.modules:
        return
    if embedding_targets(config.target_modules):  # the peft backend's (select_backend)
        return
    if config.sharding == "fsdp" or (config.sharding == "auto" and dist_env().world_size > 1):
        return
    if any(m in sys.modules for m in ("transformers", "peft", "trl")):
        return  # too late to matter
    import torch

    if not torch.cuda.is_available():
        return
    if compiled is None:
        from lora_runtime.compiled import prefers

        compiled = prefers(config)[0]
    if compiled or (config.backend == "auto" and not unsloth_importable()[0]):
        return
    from lora_runtime.backends.unsloth import import_unsloth

    import_unsloth()


def _probe_env() -> dict[str, str]:
    """Under torchrun, the probe sees only this rank's GPU: N probes on GPU 0 would skew rank 0's free-memory reading
    (LOCAL_RANK=1 with CUDA_VISIBLE_DEVICES=4,5 → "5")."""
    env = dict(os.environ)
    if "LOCAL_RANK" in env:
        local = int(env["LOCAL_RANK"])
        visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d]
        env["CUDA_VISIBLE_DEVICES"] = visible[local] if local < len(visible) else str(local)
    return env


def select_backend(name: str = "auto", *, splitting: bool = False, sharding: str = "ddp",
                   compiled: tuple[bool, str] = (False, ""), offload: bool = False,
                   embeddings: list[str] | tuple[str, ...] = ()) -> tuple[Backend, str]:
    """The backend object and a one-line reason for choosing it (`splitting`: enable_model_splitting is on;
    `sharding`: the resolved "ddp" | "fsdp"; `compiled`: lora_runtime.compiled.prefers, decided before Unsloth's
    import; `offload`: activation_offload, which the peft backend does; `embeddings`: lm_head / embed_tokens among
    the LoRA targets, which Unsloth trains as whole matrices instead: `kernels.embedding_targets`; config validation
    refuses them with backend='unsloth')."""
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
    if compiled[0]:
        return _peft(), f"auto: {compiled[1]}"
    if offload:
        tail = f"; {compiled[1]}" if compiled[1] else ""
        return _peft(), f"auto: activation_offload=True runs on transformers+PEFT (Unsloth offloads its own way){tail}"
    if embeddings:
        return _peft(), (f"auto: a LoRA on {' and '.join(embeddings)} runs on transformers+PEFT (Unsloth would train "
                         "the whole matrix, as modules_to_save)")
    ok, detail = unsloth_importable()
    if not ok:
        return _peft(), f"auto: CUDA available but {detail}, so transformers+PEFT"
    tail = f"; {compiled[1]}" if compiled[1] else ""
    return _unsloth(), f"auto: CUDA available and {detail}{tail}"


def _peft() -> Backend:
    from lora_runtime.backends.peft import PeftBackend

    return PeftBackend()


def _unsloth() -> Backend:
    from lora_runtime.backends.unsloth import UnslothBackend

    return UnslothBackend()
