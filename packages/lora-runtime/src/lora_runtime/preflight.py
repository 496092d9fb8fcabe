"""What `LoraSftConfig.validate()` checks against this machine and the model directory, before any data is prepared
or any model loaded: options that need CUDA, logging integrations whose package is missing, a model that ships its
own code, and `target_modules` the model does not have. Once the data is prepared, `position_note` warns of records
longer than the positions the model was trained for.

Cheap on purpose: torch is imported only when an option needs CUDA (and not at all with CUDA_VISIBLE_DEVICES=""),
transformers never. The model's module names are read from its safetensors headers (a few KB per file):

    model.layers.0.self_attn.q_proj.weight  [64, 64]   →  modules model, model.layers, ..., model.layers.0.self_attn.q_proj
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import struct
from pathlib import Path
from typing import Any

from lora_runtime.config import RECOMPUTE_LEVELS

# option → (is it on, why it needs CUDA, what to do instead)
_NEEDS_CUDA = {
    "load_in_4bit": (lambda c: c.load_in_4bit, "bitsandbytes 4-bit", "drop it to train the base model unquantized"),
    "load_in_8bit": (lambda c: c.load_in_8bit, "bitsandbytes 8-bit", "drop it to train the base model unquantized"),
    "flash_attention": (lambda c: c.flash_attention is True, "FlashAttention kernels",
                        "pass flash_attention=None (or False) for SDPA"),
    "backend": (lambda c: c.backend == "unsloth", "Unsloth's Triton kernels", "pass backend='peft' (or 'auto')"),
    "kernels": (lambda c: c.kernels in ("liger", "compile"),
                lambda c: "liger-kernel's Triton kernels" if c.kernels == "liger" else "Triton and FlashAttention-2",
                "pass kernels='auto' (or 'none')"),
    "selective_recompute": (lambda c: c.selective_recompute in RECOMPUTE_LEVELS, "the compiled decoder layers",
                            "pass selective_recompute='off'"),
    "cuda_graphs": (lambda c: c.cuda_graphs is True, "CUDA graphs of the compiled decoder layers",
                    "pass cuda_graphs='auto'"),
    "activation_offload": (lambda c: c.activation_offload is True, "a copy stream to pinned host memory",
                           "drop it (on a CPU the activations are in host memory already)"),
    "enable_model_splitting": (lambda c: c.enable_model_splitting, "it spreads one model over GPUs",
                               "drop it (a CPU run keeps the whole model in RAM anyway)"),
    "optim": (lambda c: c.optim.startswith("paged_"), "bitsandbytes' paged optimizer states",
              "pass optim='adamw_torch'"),
}


def cuda_available() -> bool:
    if os.environ.get("CUDA_VISIBLE_DEVICES", "x").strip() in ("", "-1"):
        return False
    import torch

    return torch.cuda.is_available()


def machine_issues(cfg: Any) -> list[str]:
    """Options this machine cannot honour (no CUDA; a logging package not installed), one issue each."""
    issues = []
    wanted = {name: why for name, (on, *why) in _NEEDS_CUDA.items() if on(cfg)}
    if wanted and not cuda_available():
        where = os.environ.get("CUDA_VISIBLE_DEVICES")
        seen = "no CUDA GPU is visible" + (f" (CUDA_VISIBLE_DEVICES={where!r})" if where is not None else "")
        for name, (why, fix) in wanted.items():
            why = why(cfg) if callable(why) else why
            issues.append(f"`{name}`={getattr(cfg, name)!r} needs CUDA ({why}) but {seen}: {fix}")
    from lora_runtime.compiled import asked_for, eligible
    from lora_runtime.kernels import liger_installed

    if asked_for(cfg) and cuda_available():
        ok, why = eligible(cfg, None, auto=False)
        if not ok:
            way_out = {"kernels": "kernels='auto'", "selective_recompute": "selective_recompute='off'",
                       "cuda_graphs": "cuda_graphs='auto'"}[asked_for(cfg).partition("=")[0]]
            issues.append(f"`{asked_for(cfg).replace('=', '`=', 1)} cannot run here: {why} (pass {way_out})")
    bnb_optim = "8bit" in cfg.optim or cfg.optim.startswith("paged_")
    if bnb_optim and importlib.util.find_spec("bitsandbytes") is None:
        issues.append(f"`optim`={cfg.optim!r} needs the bitsandbytes package, which is not installed: `uv pip "
                      "install bitsandbytes` (or pass optim='adamw_torch')")
    if cfg.kernels == "liger" and not liger_installed():
        issues.append("`kernels`='liger' needs the liger-kernel package, which is not installed: `uv pip install "
                      "liger-kernel` (or pass kernels='auto')")
    from lora_runtime.metrics import INTEGRATIONS

    for name, (fields, env, modules, hint) in INTEGRATIONS.items():
        asked = [f"`{f}`" for f in fields if getattr(cfg, f)] + [v for v in env if os.environ.get(v)]
        if asked and not any(importlib.util.find_spec(m) for m in modules):
            issues.append(f"{' and '.join(asked)} asks for {name} logging but the {modules[0]} package is not "
                          f"installed: {hint}, or drop the option")
    from lora_runtime.hub import push_issues

    return issues + mlflow_store_issues(cfg) + push_issues(cfg.push_to_hub)


def mlflow_store_issues(cfg: Any) -> list[str]:
    """A tracking URI the installed MLflow cannot use, which it says only when training starts, after the model has
    loaded, as a traceback: a file store (a plain path or a file: URI), refused by MLflow 3 unless
    MLFLOW_ALLOW_FILE_STORE is set, or a database without SQLAlchemy (mlflow-skinny). With MLflow asked for by an
    experiment or run name alone (`metrics.report_targets` turns MLflow on for either), MLflow's own default URI is
    checked (a local sqlite database or ./mlruns). Imports mlflow (~3 s), so only where MLflow logging is asked for."""
    from urllib.parse import urlparse

    if importlib.util.find_spec("mlflow") is None:
        return []
    uri = cfg.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    where = "`mlflow_tracking_uri`" if cfg.mlflow_tracking_uri else "MLFLOW_TRACKING_URI"
    if not uri:
        if not (cfg.mlflow_experiment_name or cfg.mlflow_run_name or os.environ.get("MLFLOW_EXPERIMENT_NAME")):
            return []
        import mlflow

        uri, where = str(mlflow.get_tracking_uri()), "MLflow's default tracking URI"
    scheme = urlparse(uri).scheme.split("+")[0]
    if scheme in ("sqlite", "postgresql", "mysql", "mssql"):
        if importlib.util.find_spec("sqlalchemy") is None:
            return [f"{where}={uri} is a database, which MLflow reaches through SQLAlchemy, not installed here "
                    "(mlflow-skinny lacks it): `uv pip install mlflow` (the full package)"]
        return []
    if not (scheme == "file" or (scheme == "" and not uri.startswith("databricks"))):
        return []
    try:
        from mlflow.environment_variables import MLFLOW_ALLOW_FILE_STORE
    except ImportError:  # an MLflow from before the refusal
        return []
    try:
        if MLFLOW_ALLOW_FILE_STORE.get():
            return []
    except ValueError:
        return [f"MLFLOW_ALLOW_FILE_STORE={os.environ.get('MLFLOW_ALLOW_FILE_STORE')!r} is not a boolean MLflow reads: "
                "set it to true or false"]
    return [f"{where}={uri} is a file store, which the installed MLflow refuses (its filesystem backend is in "
            "maintenance mode): set MLFLOW_ALLOW_FILE_STORE=true to keep it, or pass a database (sqlite:///PATH.db, "
            "with the full mlflow package) or an MLflow server's http(s):// address"]


def model_issues(cfg: Any) -> list[str]:
    """A local model dir whose config.json wants its own code, or that lacks a target module (hub ids: skipped)."""
    d = Path(str(cfg.model_path)).expanduser()
    model_config = read_config_json(d / "config.json")
    if model_config is None:
        return []  # not a local model dir (a hub id), or one the loader will report on
    issues = []
    if model_config.get("auto_map") and not cfg.trust_remote_code:
        issues.append(f"`model_path` {d}: config.json has auto_map (the model ships its own Python code), which is "
                      "never run unless you set `trust_remote_code` to True (only for a model you trust); or delete "
                      f"auto_map from config.json to train transformers' built-in {model_config.get('model_type')!r} "
                      "class")
    shapes = weight_shapes(d)  # the safetensors headers, read once for both checks
    if cfg.target_modules is not None and cfg.target_modules != "all-linear":
        issues += _target_issues(cfg.target_modules, d, shapes)
    issues += _pattern_issues(cfg, d, shapes)
    return issues


def _pattern_issues(cfg: Any, model_dir: Path, shapes: dict[str, list[int]]) -> list[str]:
    """rank_pattern / alpha_pattern keys that match no module of the model (PEFT matches a key as a regex against
    the end of a module's name, `(.*\\.)?key$`): a typo there trained every module at the default, with only PEFT's
    warning. `shapes`: weight_shapes(model_dir)."""
    if not shapes:
        return []
    modules = _modules(shapes)
    issues = []
    for field in ("rank_pattern", "alpha_pattern"):
        for key in getattr(cfg, field) or {}:
            try:
                if any(re.match(rf"(.*\.)?({key})$", m) for m in modules):
                    continue
            except re.error as e:
                issues.append(f"`{field}` key {key!r} is not a regular expression PEFT can match ({e})")
                continue
            issues.append(f"`{field}` key {key!r} matches no module of {model_dir}; its linear layers are "
                          f"{', '.join(_linear_names(shapes))}")
    return issues


def _modules(shapes: dict[str, list[int]]) -> set[str]:
    """Every module name the tensor names imply (each dotted prefix), and lm_head (absent where tied)."""
    return {".".join(k.split(".")[:i]) for k in shapes for i in range(1, k.count(".") + 1)} | {"lm_head"}


def _layers(shapes: dict[str, list[int]]) -> set[str]:
    """The modules with a weight matrix of their own (`weight`, or GPTQ/AWQ's `qweight`): those PEFT can adapt (a
    Mamba mixer's A_log or fused MoE experts' 3-D parameters make no layer of their module)."""
    return {k.rpartition(".")[0] for k, s in shapes.items() if len(s) >= 2 and k.endswith((".weight", ".qweight"))}


def _linear_names(shapes: dict[str, list[int]]) -> list[str]:
    """The names of a model's layers, embeddings aside."""
    return sorted({m.rpartition(".")[2] for m in _layers(shapes)} - {"embed_tokens", "wte", "wpe", "embed_in"})


def read_config_json(path: Path) -> dict | None:
    """A model's config.json as a dict; None where it is missing, unreadable or not an object."""
    try:
        model_config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return model_config if isinstance(model_config, dict) else None


def model_positions(model_path: str) -> int | None:
    """The positions the model was trained for, from its config.json (a local dir, or a hub id already in the local
    cache; nothing is fetched): max_position_embeddings (or n_positions) of the text model, stretched where its rope
    scaling names the pretraining length and max_position_embeddings is still that (× factor: YaRN added to a
    Qwen2.5 config); Llama-3.x configs give the scaled length as max_position_embeddings already. A linear or
    dynamic scaling without it is not counted: such configs mostly give the scaled length already. None: unknown."""
    path = Path(str(model_path)).expanduser() / "config.json"
    if not path.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(str(model_path), "config.json")
        except Exception:  # not a repo id, or no huggingface_hub
            return None
        if not isinstance(cached, str):
            return None
        path = Path(cached)
    model_config = read_config_json(path)
    if model_config is None:
        return None
    text = model_config.get("text_config")
    c = text if isinstance(text, dict) else model_config
    limit = next((c[k] for k in ("max_position_embeddings", "n_positions") if isinstance(c.get(k), int)), None)
    if limit is None:
        return None
    scaling: dict = next((c[k] for k in ("rope_parameters", "rope_scaling") if isinstance(c.get(k), dict)), {})
    original = scaling.get("original_max_position_embeddings", c.get("original_max_position_embeddings"))
    factor = scaling.get("factor")
    if isinstance(original, int) and isinstance(factor, int | float) and limit <= original:
        limit = int(original * factor)  # else max_position_embeddings is the scaled length already (Llama-3.x)
    return limit


def position_note(cfg: Any, sample_lengths: Any) -> str | None:
    """A warning when records of the training data (`sample_lengths`: each packed sample's tokens) are longer than
    the positions the model was trained for; None when none is, or when that is unknown. Packed rows restart
    positions at each record, so only the records' own lengths count, not max_seq_len."""
    import numpy as np
    from lora_data import MANIFEST_NAME

    lengths = np.asarray(sample_lengths)
    limit = model_positions(cfg.model_path)
    if limit is None or not lengths.size or int(lengths.max()) <= limit:
        return None
    over, longest = int((lengths > limit).sum()), int(lengths.max())
    prepared = (Path(str(cfg.data_path)) / MANIFEST_NAME).is_file()
    fix = (f"prepare the data again with max_seq_len={limit}" if prepared else f"pass max_seq_len={limit}")
    return (f"{over:,} record(s) of {cfg.data_path} are longer than the {limit:,} positions {cfg.model_path} was "
            f"trained for (config.json max_position_embeddings, with its rope scaling), the longest "
            f"{longest:,} tokens: they train at positions the model has never seen (rotary models "
            "extrapolate, which degrades quality; learned position embeddings fail with an index error). To cut or "
            f"drop them, {fix}; or train at a longer context with the rope scaling the model's card documents")


def _target_issues(targets: tuple[str, ...] | str, model_dir: Path,
                   shapes: dict[str, list[int]] | None = None) -> list[str]:
    shapes = weight_shapes(model_dir) if shapes is None else shapes
    if not shapes:
        return []  # .bin weights or an unreadable header: PEFT will say it
    modules = _modules(shapes)
    if isinstance(targets, str):  # PEFT: a string is a regex matched against the whole module name
        matched = {targets: [m for m in modules if re.fullmatch(targets, m)]}
    else:
        matched = {t: [m for m in modules if m == t or m.endswith("." + t)] for t in targets}
    linear = _linear_names(shapes)
    issues = []
    if missing := [t for t, found in matched.items() if not found]:
        issues.append(f"`target_modules` names {', '.join(repr(t) for t in missing)}, which {model_dir} does not "
                      f"have; its linear layers are {', '.join(linear)} (or pass target_modules=None for all "
                      "attention and MLP projections, or 'all-linear')")
    layers = _layers(shapes)
    for t, found in matched.items():  # PEFT adapts a layer, and refuses any other module matched
        if unfit := sorted(m for m in found if m != "lm_head" and m not in layers):
            inner = sorted({m.rpartition(".")[2] for m in layers if any(m.startswith(f"{u}.") for u in unfit)})
            listed = ", ".join(inner[:8]) + (", ..." if len(inner) > 8 else "")
            where = unfit[0] + (f" and {len(unfit) - 1} more" if len(unfit) > 1 else "")
            what, fix = ((f"a block of layers ({listed})", f" ({listed})") if inner else
                         ("not a layer with a weight matrix (a norm, an activation)",
                          f"; its linear layers are {', '.join(linear)}"))
            issues.append(f"`target_modules` {t!r} matches {where} in {model_dir}, {what}, which LoRA cannot adapt: "
                          f"name the layers themselves{fix}")
    return issues


def weight_shapes(model_dir: Path) -> dict[str, list[int]]:
    """Tensor name → shape from the safetensors headers of a model dir ({} when there are none)."""
    index = model_dir / "model.safetensors.index.json"
    try:
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else \
            sorted(p.name for p in model_dir.glob("*.safetensors") if not p.name.startswith("adapter_"))
        shapes: dict[str, list[int]] = {}
        for name in files:
            with open(model_dir / name, "rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                if size > 100 * 2**20:
                    return {}
                header = json.loads(f.read(size))
            shapes.update({k: v["shape"] for k, v in header.items() if k != "__metadata__"})
        return shapes
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return {}
