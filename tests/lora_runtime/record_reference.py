"""Record tests/references/lora_runtime_llama_loss.json: `uv run python tests/lora_runtime/record_reference.py`.

A separate entry point on purpose: re-recording a golden trajectory must be a deliberate, justified change.
Uses the same tiny model, shards and run settings as tests/lora_runtime/test_train.py (fp32 on the CPU, seed 0).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import _runs  # noqa: E402
import _shards  # noqa: E402
import _tiny  # noqa: E402

REFERENCE = HERE.parent / "references" / "lora_runtime_llama_loss.json"


def main() -> None:
    from lora_runtime import lora_sft
    from lora_runtime.metrics import read_metrics

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        tok = _tiny.build_tokenizer(tmp / "tok", template="llama3")
        model = _tiny.build_model(tmp / "model", arch="llama", tokenizer_dir=tok)
        shards = _shards.chat_shards(tmp / "shards", model, n=24, seq_len=128)
        result = lora_sft(str(model), str(shards), str(tmp / "out"), **_runs.RUN)
        losses = [r["loss"] for r in read_metrics(result.metrics_path) if "loss" in r]
    REFERENCE.parent.mkdir(parents=True, exist_ok=True)
    REFERENCE.write_text(json.dumps({
        "what": "per-step training loss of the tiny Llama LoRA run in tests/lora_runtime/_runs.py (fp32, CPU)",
        "run": _runs.RUN, "environment": _runs.environment(), "losses": losses}, indent=2) + "\n")
    print(f"wrote {REFERENCE}: {len(losses)} losses, {losses[0]:.4f} → {losses[-1]:.4f}")


if __name__ == "__main__":
    main()
