"""The adapter's README.md (a filled Hugging Face / PEFT model card), written by rank 0 next to the final adapter.

Everything comes from the run directory itself: `lora_sft_config.json` (the config as given and the `resolved`
batch plan, backend and library versions), `adapter_config.json` (the modules PEFT really adapted), `metrics.jsonl`
(the loss) and the data manifest. PEFT's own template (every field "More Information Needed") is replaced.

It also makes `base_model_name_or_path` in adapter_config.json absolute where the base is a local directory: a
relative path only resolves from the directory the run was started in.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

from lora_runtime.checkpoint import ADAPTER_FILES, ADAPTER_SUMS, CONFIG_NAME, seal, write_json_atomic
from lora_runtime.config import BASE_REWRITING_INITS
from lora_runtime.residual import RESIDUAL_INITS

CARD_NAME = "README.md"
ADAPTER_CONFIG = "adapter_config.json"


def local_dir(model_path: str) -> Path | None:
    """The absolute directory when `model_path` is a local directory (else None: a hub id)."""
    path = Path(model_path).expanduser()
    return path.resolve() if path.is_dir() else None


def absolutize_base(adapter_dir: Path, model_path: str) -> str:
    """Rewrite adapter_config.json's base_model_name_or_path to the absolute directory for a local base; returns
    the value recorded there."""
    path = Path(adapter_dir) / ADAPTER_CONFIG
    local = local_dir(model_path)
    if not path.exists():
        return str(local or model_path)
    cfg = json.loads(path.read_text())
    if local is not None and cfg.get("base_model_name_or_path") != str(local):
        cfg["base_model_name_or_path"] = str(local)
        write_json_atomic(path, cfg)
        if (Path(adapter_dir) / ADAPTER_SUMS).exists():
            seal(adapter_dir, ADAPTER_FILES)  # the checksums cover adapter_config.json
    return str(cfg.get("base_model_name_or_path") or model_path)


def hardware(world_size: int = 1) -> str:
    """"N × <GPU name>" on CUDA, else the CPU."""
    try:
        import torch

        if torch.cuda.is_available():
            return f"{world_size} × {torch.cuda.get_device_name(0)}"
    except Exception:  # a card must never fail a finished run
        pass
    cpu = platform.processor() or platform.machine() or "unknown"
    return f"CPU ({cpu}, {platform.system()})"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _metrics(path: Path) -> list[dict[str, Any]]:
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return rows


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list | tuple):
        return ", ".join(f"`{v}`" for v in value) or "—"
    return f"`{value}`" if isinstance(value, str) else str(value)


def _not_for_vllm(adapter_cfg: dict[str, Any]) -> list[str]:
    """Why vLLM would serve another model than the one trained from this adapter on its base (empty: it serves it).
    vLLM applies one scale, lora_alpha / r, to every module and adds the adapter to the base weights as they are."""
    why = []
    if adapter_cfg.get("use_dora"):
        why.append("vLLM does not serve DoRA adapters")
    init = str(adapter_cfg.get("init_lora_weights"))
    if init.startswith(BASE_REWRITING_INITS):
        why.append(f"init_lora_weights={init!r} changed the base weights the adapter was trained on")
    if adapter_cfg.get("rank_pattern") or adapter_cfg.get("alpha_pattern"):
        why.append("rank_pattern / alpha_pattern give modules their own scale; vLLM applies one")
    return why


def _vllm_rank(rank: Any) -> int:
    """vLLM's max_lora_rank takes 8, 16, 32, ...: the smallest that holds `rank`."""
    out = 8
    while out < int(rank or 8):
        out *= 2
    return out


def _manifest(manifest: Any) -> dict[str, Any]:
    if manifest is None:
        return {}
    return manifest.to_dict() if hasattr(manifest, "to_dict") else dict(manifest)


def render(run: dict[str, Any], adapter_cfg: dict[str, Any], metrics: list[dict[str, Any]], manifest: Any,
           *, adapter_ref: str, hardware_line: str) -> str:
    """The card's text. `run` is lora_sft_config.json; `adapter_ref` is what the load snippets point at."""
    resolved = run.get("resolved") or {}
    model = str(run.get("model_path"))
    local = local_dir(model)
    base_ref = str(local) if local is not None else model
    base_line = (f"local directory `{local}` (basename `{local.name}`; given as `{model}`), not a hub id"
                 if local is not None else f"[`{model}`](https://huggingface.co/{model})")
    losses = [r["loss"] for r in metrics if "loss" in r]
    evals = [r["eval_loss"] for r in metrics if "eval_loss" in r]
    last = metrics[-1] if metrics else {}
    steps = max((int(r.get("step", 0)) for r in metrics), default=0)
    m = _manifest(manifest)
    # a shard dir's prepare-time choices are what trained (a config left at its defaults defers to them)
    inputs_trained = (m.get("options") or {}).get("train_on_inputs", run.get("train_on_inputs"))
    counts = m.get("counts") or {}
    targets = adapter_cfg.get("target_modules") or run.get("target_modules")
    if isinstance(targets, list | tuple):
        targets = sorted(targets)
    versions = resolved.get("versions") or {}
    rank = adapter_cfg.get("r", run.get("lora_r"))
    # PiSSA/OLoRA adapters are saved as a rank-2r LoRA on the original base (lora_runtime.residual)
    converted = str(run.get("init_lora_weights")) in RESIDUAL_INITS and adapter_cfg.get("init_lora_weights") is True
    trained_rank = run.get("lora_r", rank) if converted else rank
    trained_alpha = run.get("lora_alpha") if converted else adapter_cfg.get("lora_alpha", run.get("lora_alpha"))
    schedule = f"{run.get('lr_scheduler')}, warmup " + (
        f"ratio {run['warmup_ratio']}" if run.get("warmup_ratio") is not None else f"{run.get('warmup_steps')} steps")
    length = (f"max_steps {run['max_steps']}" if run.get("max_steps") is not None
              else f"{run.get('num_epochs')} epoch(s)")
    quant = "4-bit (QLoRA)" if run.get("load_in_4bit") else "8-bit" if run.get("load_in_8bit") else "none (unquantized base)"

    meta = ["---", "library_name: peft", "pipeline_tag: text-generation"]
    if local is None:
        meta.append(f"base_model: {model}")
    meta += ["tags:", "- lora", "- sft", "- lora-sft", "- transformers", "- peft"]
    if local is None:
        meta.append(f"- base_model:adapter:{model}")
    meta.append("---")

    lines = [
        *meta, "",
        f"# LoRA adapter for {local.name if local is not None else model}", "",
        f"A LoRA adapter (rank {rank}) trained with supervised fine-tuning by lora-sft "
        f"(`lora_sft`, backend `{resolved.get('backend', run.get('backend'))}`).", "",
        "## Base model", "",
        f"- **Base model:** {base_line}",
        f"- **Quantization while training:** {quant}", "",
        "## Data", "",
        f"- **Data:** `{run.get('data_path')}`" + (f" (format {m['dataset_format']})" if m.get("dataset_format") else ""),
    ]
    if counts:
        lines += [
            f"- **Records:** {counts.get('valid', 0)} valid of {counts.get('lines_read', 0)} read "
            f"({counts.get('rejected', 0)} rejected, {counts.get('dropped', 0)} overlong dropped"
            + (f", {counts.get('blank', 0)} blank lines, the records eval_split_ratio={run['eval_split_ratio']} "
               "held out for eval among them" if run.get("eval_split_ratio") else "") + ")",
            f"- **Tokens:** {counts.get('tokens', 0)} ({counts.get('loss_tokens', 0)} trained on) in "
            f"{counts.get('rows', m.get('rows', 0))} packed rows of {m.get('seq_len')} tokens",
            f"- **Packing efficiency:** {float(m.get('packing_efficiency') or 0):.1%}",
        ]
    lines += [
        f"- **Trained on:** {'prompts and answers' if inputs_trained else 'assistant answers only'}", "",
        "## Training hyper-parameters", "",
        "| setting | value |", "|---|---|",
        f"| LoRA r / alpha / dropout | {trained_rank} / {trained_alpha} / "
        f"{adapter_cfg.get('lora_dropout', run.get('lora_dropout'))} |",
        *([f"| LoRA init | `{run.get('init_lora_weights')}`" + (
            f"; saved as a plain LoRA of rank {rank} on the original base |" if converted else " |")]
          if run.get("init_lora_weights") not in (True, None) else []),
        f"| target modules | {_fmt(targets)} |",
        f"| rsLoRA / DoRA | {run.get('use_rslora')} / {run.get('use_dora')} |",
        f"| learning rate | {run.get('learning_rate')} |",
        f"| schedule | {schedule} |",
        f"| optimizer / weight decay / max grad norm | {run.get('optim')} / {run.get('weight_decay')} / "
        f"{run.get('max_grad_norm')} |",
        f"| length | {length} ({steps} optimizer steps done) |",
        f"| micro batch × accumulation × processes = effective batch | {resolved.get('micro_batch_size')} × "
        f"{resolved.get('gradient_accumulation_steps')} × {resolved.get('world_size')} = "
        f"{resolved.get('effective_batch_size')} rows/step |",
        f"| sequence length / packing | {m.get('seq_len', run.get('max_seq_len'))} / "
        f"{m.get('packing', run.get('sample_packing'))} |",
        f"| gradient checkpointing | {resolved.get('gradient_checkpointing')} |",
        f"| seed | {run.get('seed')} |", "",
        "## Results", "",
        f"- **Final training loss:** {_fmt(losses[-1]) if losses else 'not logged'}"
        + (f" (first logged {_fmt(losses[0])})" if len(losses) > 1 else ""),
    ]
    if evals:
        lines.append(f"- **Final eval loss:** {_fmt(evals[-1])}")
    if last.get("tokens_seen") is not None:
        lines.append(f"- **Tokens seen:** {last['tokens_seen']}")
    lines += [
        f"- **Hardware:** {hardware_line}",
        f"- **Backend:** {resolved.get('backend', run.get('backend'))}",
        "- **Library versions:** " + (", ".join(f"{k} {v}" for k, v in sorted(versions.items())) or "not recorded"),
        "",
        "## How to use", "",
        "With transformers + PEFT:", "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'base = AutoModelForCausalLM.from_pretrained("{base_ref}", dtype="auto")',
        f'model = PeftModel.from_pretrained(base, "{adapter_ref}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{adapter_ref}")',
        'messages = [{"role": "user", "content": "Hello!"}]',
        "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\",",
        "                                       return_dict=True)",
        "new = model.generate(**inputs, max_new_tokens=128)[0][inputs[\"input_ids\"].shape[1]:]",
        "print(tokenizer.decode(new, skip_special_tokens=True))",
        "```", "",
    ]
    blockers = _not_for_vllm(adapter_cfg)
    lines += [
        f"With vLLM: not this adapter as it is ({'; '.join(blockers)}); serve the merged model "
        "(`lora-cli merge`, below) instead.", "",
    ] if blockers else [
        "With vLLM (the adapter served on top of the base, no merge needed):", "",
        "```python",
        "from vllm import LLM, SamplingParams",
        "from vllm.lora.request import LoRARequest",
        "",
        f'llm = LLM(model="{base_ref}", enable_lora=True, max_lora_rank={_vllm_rank(rank)})',
        'out = llm.chat([{"role": "user", "content": "Hello!"}], SamplingParams(max_tokens=128),',
        f'               lora_request=LoRARequest("adapter", 1, "{adapter_ref}"))',
        "print(out[0].outputs[0].text)",
        "```", "",
    ]
    lines += [
        f"From the command line: `lora-cli chat {adapter_ref}`; a merged full model: "
        f"`lora-cli merge {adapter_ref} --model {base_ref} --out MERGED_DIR`.", "",
    ]
    return "\n".join(lines)


def write_model_card(adapter_dir: str | Path, manifest: Any = None) -> Path:
    """Write README.md in `adapter_dir` from the run recorded there (call after the adapter and CONFIG_NAME are
    written); makes a local base path absolute in adapter_config.json. Returns the card's path."""
    out = Path(adapter_dir)
    run = _read_json(out / CONFIG_NAME)
    absolutize_base(out, str(run.get("model_path")))
    repo = run.get("push_to_hub")
    world = int((run.get("resolved") or {}).get("world_size") or 1)
    text = render(run, _read_json(out / ADAPTER_CONFIG), _metrics(out / "metrics.jsonl"), manifest,
                  adapter_ref=repo or str(out.resolve()), hardware_line=hardware(world))
    tmp = out / f".{CARD_NAME}.tmp"
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(out / CARD_NAME)
    return out / CARD_NAME
