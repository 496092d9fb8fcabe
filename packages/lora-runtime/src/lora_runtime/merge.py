"""`merge_adapter(adapter_dir, model_path, out_dir)`: base model + LoRA adapter → one merged safetensors model.

Written to a staging dir and renamed into place, so `out_dir` is either absent or complete (an earlier merge it
replaces is set aside until then, never deleted first); what a killed merge left beside it is cleared by the next
merge into the same `out_dir`. The tokenizer from
`adapter_dir` (where lora_sft saves it) or else from `model_path` is copied along, so `out_dir` loads on its own.
An existing `out_dir` is replaced only if an earlier merge wrote it (it holds MARKER); any other non-empty directory,
a file, the current directory, and one that is or holds the adapter or the base model, are refused before anything is
loaded. A base with tied embeddings whose lm_head or embed_tokens is adapted is untied first
(`untie_adapted_embeddings`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from lora_runtime.errors import CheckpointError

MARKER = "MERGED_BY_LORA_SFT"
STAGING = ".lora-sft-merge-staging"  # in a merge's staging dir while it is one (`_clear_killed` removes no other)


class AdapterMismatch(CheckpointError):
    """The adapter's tensors do not fit the base model given (another model's shapes)."""


class MergeDiskFull(CheckpointError):
    """The disk filled while the merged model was written; the partial write is removed."""


def merge_adapter(adapter_dir: str | Path, model_path: str | Path, out_dir: str | Path, *,
                  dtype: str = "auto", trust_remote_code: bool = False) -> Path:
    """Load `model_path`, apply the adapter, `merge_and_unload`, save as safetensors; returns `out_dir`.

    dtype: "auto" keeps the base checkpoint's dtype; or "float32" / "bfloat16" / "float16".
    """
    adapter_dir, out = Path(adapter_dir), Path(out_dir)
    from lora_runtime.checkpoint import check_adapter, holds_an_adapter

    _check_out_dir(out, adapter_dir, Path(model_path))
    if not holds_an_adapter(adapter_dir):
        raise FileNotFoundError(f"{adapter_dir}: no adapter_config.json; pass the directory lora_sft wrote the "
                                "adapter to (its ckpt_output_dir, or a checkpoints/checkpoint-<step> dir)")
    check_adapter(adapter_dir)  # a torn, truncated or flipped adapter file is an error naming it, before any import
    _warn_if_another_base(adapter_dir, model_path)
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    adapted = load_adapted(base, adapter_dir, model_path)
    untie_adapted_embeddings(adapted)
    merged = adapted.merge_and_unload()
    out.parent.mkdir(parents=True, exist_ok=True)
    _clear_killed(out)
    with contextlib.ExitStack() as held:
        return _write(merged, out, held, adapter_dir, model_path, trust_remote_code)


def _write(merged: Any, out: Path, held: contextlib.ExitStack, adapter_dir: Path, model_path: str | Path,
           trust_remote_code: bool) -> Path:
    """Save into a staging dir of ours, then put it in `out`'s place (the earlier merge set aside until then)."""
    from transformers import AutoTokenizer

    tmp = _staging(out, "tmp", held)  # ours alone: no sibling is touched
    try:
        tmp.chmod(0o755)
        merged.save_pretrained(tmp, safe_serialization=True)
        tok_src = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else model_path
        AutoTokenizer.from_pretrained(tok_src, trust_remote_code=trust_remote_code).save_pretrained(tmp)
        (tmp / MARKER).write_text(f"adapter: {adapter_dir.resolve()}\nbase: {model_path}\n")
    except BaseException as e:
        from lora_runtime.checkpoint import disk_full_reason

        reason = disk_full_reason(e, out.parent) if isinstance(e, Exception) else None  # before the cleanup frees space
        shutil.rmtree(tmp, ignore_errors=True)
        if reason is not None:
            raise MergeDiskFull(f"disk full ({reason}) while writing the merged model to {out}; the partial write was "
                                "removed: free space and merge again") from e
        raise
    aside = None  # the earlier merge, set aside (in a directory of ours) until the new one is in place: an error in
    try:  # between puts it back, a kill leaves it whole beside the new one, never neither
        if out.exists():
            aside = _staging(out, "replaced", held)
            out.rename(aside / out.name)
        tmp.rename(out)
    except BaseException:
        if aside is not None and not out.exists() and (aside / out.name).exists():
            (aside / out.name).rename(out)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    (out / STAGING).unlink(missing_ok=True)  # in place now: a merge's output, no longer its staging dir
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    return out


def merged_from(merged: Path, run_dir: Path) -> bool:
    """Whether the merge in `merged` is of an adapter in `run_dir` (its final adapter or one of its checkpoints), as
    its MARKER names it (absolute since merges wrote it so)."""
    try:
        line = next(x for x in (merged / MARKER).read_text(encoding="utf-8").splitlines() if x.startswith("adapter: "))
    except (OSError, StopIteration):
        return False
    adapter, run = Path(line.removeprefix("adapter: ")), run_dir.resolve()
    return adapter.is_absolute() and (adapter == run or run in adapter.parents)


def _staging(out: Path, kind: str, held: contextlib.ExitStack) -> Path:
    """A new `.<out>.<kind>-XXXX` dir beside `out`, marked as a merge's (STAGING) and locked (a flock on the dir,
    held until `held` closes and dropped by the OS if this process dies: `_clear_killed` tells a killed merge's)."""
    d = Path(tempfile.mkdtemp(prefix=f".{out.name}.{kind}-", dir=out.parent))
    fd = os.open(d, os.O_RDONLY)
    held.callback(os.close, fd)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:  # a filesystem without flock on directories (NFS): unmarked, so never taken for a killed one's
        return d
    (d / STAGING).touch()
    return d


def _clear_killed(out: Path) -> None:
    """What a killed merge into `out` left beside it (its staging dirs, marked and no longer locked): a partial write
    is removed; an earlier merge it had set aside is put back where `out` is missing, else removed."""
    ours = re.compile(rf"\.{re.escape(out.name)}\.(tmp|replaced)-[A-Za-z0-9_]+")  # mkdtemp's suffixes: no dot
    for d in sorted(p for p in out.parent.iterdir() if ours.fullmatch(p.name)):
        if not (d / STAGING).is_file():
            continue  # not a merge's: never touched
        try:
            fd = os.open(d, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue  # a live merge's (or no telling)
        try:
            if (d / out.name / MARKER).is_file() and not out.exists():
                (d / out.name).rename(out)
            shutil.rmtree(d, ignore_errors=True)
        finally:
            os.close(fd)


def load_adapted(base: Any, adapter_dir: str | Path, model_path: str | Path) -> Any:
    """PeftModel.from_pretrained(base, adapter_dir); an adapter of another model's shapes (PEFT lists every
    mismatched tensor, a screenful per layer) or module names (another architecture) is one error naming both."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(base, str(adapter_dir))
    except (RuntimeError, ValueError) as e:
        if type(e).__name__ == "NoMatchingPeftModuleError":  # another architecture: no module of the adapter's names
            first = str(e).splitlines()[0].split(". ")[0]
        elif isinstance(e, RuntimeError) and "size mismatch" in str(e):
            first = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), "")
        else:
            raise
        trained_on = adapter_base(Path(adapter_dir))
        if trained_on is not None and Path(trained_on).expanduser().resolve() == Path(model_path).expanduser().resolve():
            where = "; it was trained on a model at that path, whose files have changed since"
        else:
            where = f"; it was trained on {trained_on}" if trained_on else ""
        raise AdapterMismatch(f"{adapter_dir}: the adapter does not fit {model_path} ({first.rstrip('.')}){where}: "
                              "pass the base model it was trained on") from None


def adapter_base(adapter_dir: Path) -> str | None:
    """The base model an adapter names (adapter_config.json's base_model_name_or_path), None if it names none."""
    import json

    try:
        base = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None
    return str(base) if base else None


def _warn_if_another_base(adapter_dir: Path, model_path: str | Path) -> None:
    """Say so where `model_path` is not the model the run recorded training on (config.json or weights differ); the
    merge goes on (an adapter may be meant for a sibling checkpoint), but it is not the model trained."""
    import json

    from lora_runtime.checkpoint import CONFIG_NAME, model_identity
    from lora_runtime.distributed import print0

    try:
        run = json.loads((adapter_dir / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    trained_on = (run.get("resolved") or {}).get("model") if isinstance(run, dict) else None
    if trained_on is not None and model_identity(model_path) not in (None, trained_on):
        print0(f"warning: {model_path} is not the model {adapter_dir} was trained on ({run.get('model_path')}: its "
               "config.json or weights differ); merging into it anyway")


def untie_adapted_embeddings(model) -> bool:
    """A base whose output embeddings share the input embeddings' weight (tie_word_embeddings: Qwen2.5-0.5B/1.5B,
    Llama-3.2-1B/3B), with an adapter on either: give the output embeddings a copy of the weight and untie the config,
    so merging changes only the layer adapted (merged into the shared weight, an lm_head adapter changed the
    embeddings too, and the reverse). Returns whether it untied."""
    import torch

    base = model.get_base_model()
    configs = {id(c): c for c in (base.config, base.config.get_text_config())}.values()
    if not any(getattr(c, "tie_word_embeddings", False) for c in configs):
        return False
    layers = [base.get_output_embeddings(), base.get_input_embeddings()]
    owners = [_weight_owner(layer) for layer in layers]
    if any(o is None for o in owners) or all(o is layer for o, layer in zip(owners, layers, strict=True)):
        return False  # neither is adapted: they stay tied
    out = owners[0]
    out.weight = torch.nn.Parameter(out.weight.detach().clone(), requires_grad=False)
    for c in configs:
        if hasattr(c, "tie_word_embeddings"):
            c.tie_word_embeddings = False
    return True


def _weight_owner(layer):
    """The module under PEFT's wrappers (a LoRA layer's base_layer, modules_to_save's original) that holds the weight."""
    while layer is not None:
        inner = getattr(layer, "base_layer", None)
        inner = getattr(layer, "original_module", None) if inner is None else inner
        if inner is None:
            return layer
        layer = inner
    return None


def _check_out_dir(out: Path, adapter_dir: Path, model_path: Path) -> None:
    """Never delete what merge_adapter did not write: the run dir, the base model, a file (the adapter's own weights
    among them), the current directory, or any other user directory."""
    target = out.resolve()
    for name, p in (("adapter", adapter_dir), ("base model", model_path)):
        if p.exists() and (target == p.resolve() or target in p.resolve().parents):
            raise FileExistsError(f"{out}: the merge output would replace the {name} directory {p}; pass a new --out")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a directory; pass a new --out (a directory to create)")
    try:
        here = Path.cwd().resolve()
    except FileNotFoundError:  # the working directory was removed: nothing there to replace
        here = None
    if here is not None and (target == here or target in here.parents):
        raise FileExistsError(f"{out}: is the current directory or holds it, which the merged model would replace; "
                              "pass a new --out")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise FileExistsError(f"{out}: exists and was not written by a merge (no {MARKER} there); pass a new --out "
                              "or remove it yourself")
