"""`merge_adapter(adapter_dir, model_path, out_dir)`: base model + LoRA adapter → one merged safetensors model.

Written to a staging dir and renamed into place, so `out_dir` is either absent or complete. The tokenizer from
`adapter_dir` (where lora_sft saves it) or else from `model_path` is copied along, so `out_dir` loads on its own.
"""

from __future__ import annotations

import shutil
from pathlib import Path


def merge_adapter(adapter_dir: str | Path, model_path: str | Path, out_dir: str | Path, *,
                  dtype: str = "auto", trust_remote_code: bool = False) -> Path:
    """Load `model_path`, apply the adapter, `merge_and_unload`, save as safetensors; returns `out_dir`.

    dtype: "auto" keeps the base checkpoint's dtype; or "float32" / "bfloat16" / "float16".
    """
    adapter_dir, out = Path(adapter_dir), Path(out_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter_dir}: no adapter_config.json; pass the directory lora_sft wrote the "
                                "adapter to (its ckpt_output_dir, or a checkpoints/checkpoint-<step> dir)")
    from lora_runtime.checkpoint import check_adapter

    check_adapter(adapter_dir)  # a truncated or flipped adapter file is an error naming it, before any import
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    merged.save_pretrained(tmp, safe_serialization=True)
    tok_src = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else model_path
    AutoTokenizer.from_pretrained(tok_src, trust_remote_code=trust_remote_code).save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
