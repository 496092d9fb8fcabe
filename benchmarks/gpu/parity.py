"""Loss parity: our `lora_sft` against TRL SFTTrainer + PEFT on a real small text corpus (issue 5).

    python -m benchmarks.gpu.parity OUT [--backend peft|unsloth] [--steps 100]      # all in one process (CPU)
    python -m benchmarks.gpu.parity build DIR                                       # CPU side: corpus, model, shards
    python -m benchmarks.gpu.parity side DIR ours|trl [--backend unsloth] [--kernels compile] [--steps 100]  # one
        [--lever KEY=VALUE ...] [--tag _NAME]                                            # side, one process
    python -m benchmarks.gpu.parity compare DIR OUT.json                            # both sides' losses → result

On a GPU each side runs in its own process: importing unsloth patches TRL, which would make the reference Unsloth's.
The GPU machine has no polars, so `build` (which prepares the shards) runs on the CPU side and DIR is carried over.

Corpus: the docstrings of public functions and classes of stdlib modules as chat records ("What does json.dumps
do?" → its docstring), a tokenizer trained on it, a small random-weight Llama. Both sides: loss on every token
(training-hub's behaviour: ours with train_on_inputs=True), best-fit-decreasing packing to 512 tokens with position ids
reset per sample (TRL padding-free), 4 rows a step, LoRA r=16 alpha=32 on all linear projections and lm_head,
AdamW lr 1e-3 linear with 10 warmup steps, weight decay 0.01, clip 0.3, seed 0. Packing order and data order differ
between the two, so steps are not bit-comparable: the comparison is on 10-step window means.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(HERE / "tests"))

MODULES = ["json", "pathlib", "argparse", "collections", "functools", "itertools", "textwrap", "subprocess", "typing",
           "dataclasses", "logging", "re", "shutil", "inspect", "string", "statistics", "fractions", "heapq", "bisect",
           "csv", "tempfile", "zipfile", "tarfile", "urllib.parse", "datetime", "calendar", "decimal", "random"]
SEQ_LEN, MICRO = 512, 4
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
# TRL 1.15 (the GPU machine's) refuses a LoRA on lm_head ("the adapter would never be trained"); there both sides
# run `--no-lm-head` (which `--backend unsloth` needs too: Unsloth would train the whole lm_head). TRL 1.14.2 (this
# repo's lock, the CPU measurement) accepts it.


def records() -> list[dict]:
    """One chat record per documented public function/class (docstring ≥ 80 chars, cut at 1,200), sorted."""
    out = []
    for mod_name in MODULES:
        mod = importlib.import_module(mod_name)
        for name in sorted(dir(mod)):
            obj = getattr(mod, name, None)
            if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj)):
                continue
            doc = inspect.getdoc(obj) or ""
            if len(doc) < 80:
                continue
            out.append({"messages": [{"role": "user", "content": f"What does {mod_name}.{name} do?"},
                                     {"role": "assistant", "content": doc[:1200]}]})
    return out


def build(out: Path) -> tuple[Path, Path]:
    """records.jsonl, a BPE tokenizer trained on them (ChatML), and a 4-layer random Llama: (records, model_dir)."""
    import _tiny
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    recs = records()
    path = out / "records.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = [m["content"] for r in recs for m in r["messages"]]
    tok.train_from_iterator(texts, trainer=trainers.BpeTrainer(
        vocab_size=2048, special_tokens=_tiny.SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|im_end|>",
                                   chat_template=_tiny.CHATML_TEMPLATE)
    model_dir = out / "model"
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ_LEN,
                      pad_token_id=fast.pad_token_id, eos_token_id=fast.eos_token_id, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(model_dir)
    fast.save_pretrained(model_dir)
    return path, model_dir


COMMON = dict(learning_rate=1e-3, warmup_steps=10, weight_decay=0.01, max_grad_norm=0.3, seed=0)


def prepare(records_path: Path, model_dir: Path, out: Path) -> Path:
    import lora_data
    from transformers import AutoTokenizer

    shards = out / "shards"
    lora_data.prepare(records_path, shards, AutoTokenizer.from_pretrained(model_dir), max_seq_len=SEQ_LEN,
                      train_on_inputs=True, verbose=False)
    return shards


def ours(records_path: Path, model_dir: Path, out: Path, backend: str, steps: int, kernels: str = "auto",
         **levers: object) -> list[float]:
    from lora_runtime import lora_sft
    from lora_runtime.metrics import read_metrics

    shards = out / "shards" if (out / "shards" / "manifest.json").is_file() else prepare(records_path, model_dir, out)
    result = lora_sft(str(model_dir), str(shards), str(out / "ours"), backend=backend, lora_r=16, lora_alpha=32,
                      target_modules=TARGETS, max_steps=steps, micro_batch_size=MICRO, max_seq_len=SEQ_LEN,
                      logging_steps=1, save_steps=10**6, kernels=kernels, **levers, **COMMON)
    return [r["loss"] for r in read_metrics(result.metrics_path) if "loss" in r]


def trl(records_path: Path, model_dir: Path, out: Path, steps: int) -> list[float]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    losses: list[float] = []

    class Keep(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    cuda = torch.cuda.is_available()
    recs = [json.loads(line) for line in records_path.read_text().splitlines()]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if cuda else torch.float32)
    args = SFTConfig(output_dir=str(out / "trl"), max_length=SEQ_LEN, packing=True, packing_strategy="bfd",
                     per_device_train_batch_size=MICRO, max_steps=steps, lr_scheduler_type="linear",
                     logging_steps=1, save_strategy="no", report_to="none", bf16=cuda, use_cpu=not cuda,
                     dataloader_num_workers=0, loss_type="nll", **COMMON)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(recs), peft_config=lora, callbacks=[Keep()],
               processing_class=AutoTokenizer.from_pretrained(model_dir)).train()
    return losses


def compare(a: list[float], b: list[float], window: int = 10) -> dict:
    """Relative gap of window means |a - b| / b, per window and the worst after the first window (warm-up)."""
    n = min(len(a), len(b)) // window
    gaps = [abs(sum(a[i * window:(i + 1) * window]) - sum(b[i * window:(i + 1) * window]))
            / sum(b[i * window:(i + 1) * window]) for i in range(n)]
    return {"window_gaps": gaps, "max_gap_after_first": max(gaps[1:]) if n > 1 else None,
            "first": (a[0], b[0]), "last_window": (sum(a[-window:]) / window, sum(b[-window:]) / window)}


def split_main(argv: list[str]) -> None:
    """build | side | compare: the two sides in separate processes (see the module docstring)."""
    import time

    cmd, work = argv[0], Path(argv[1])
    if cmd == "build":
        work.mkdir(parents=True, exist_ok=True)
        records_path, model_dir = build(work)
        prepare(records_path, model_dir, work)
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("rest", nargs="*")
    ap.add_argument("--backend", default="peft")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--no-lm-head", action="store_true")
    ap.add_argument("--kernels", default="auto", help="ours: lora_sft's kernels (compile: the compiled peft path)")
    ap.add_argument("--lever", action="append", default=[], metavar="KEY=VALUE",
                    help="ours: another lora_sft option, e.g. cuda_graphs=false or selective_recompute=pointwise")
    ap.add_argument("--tag", default=None, help="the losses file's suffix (default: _KERNELS where not auto)")
    a = ap.parse_args(argv[2:])
    levers = dict(_lever(item) for item in a.lever)
    tag = a.tag if a.tag is not None else ("" if a.kernels == "auto" else f"_{a.kernels}")
    if a.no_lm_head:
        TARGETS.remove("lm_head")
    if cmd == "side":
        side = a.rest[0]
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            if side == "ours":
                (Path(tmp) / "shards").symlink_to((work / "shards").resolve())
                losses = ours(work / "records.jsonl", work / "model", Path(tmp), a.backend, a.steps, a.kernels,
                              **levers)
            else:
                losses = trl(work / "records.jsonl", work / "model", Path(tmp), a.steps)
        name = f"losses_{side}{tag if side == 'ours' else ''}.json"
        (work / name).write_text(json.dumps({"side": side, "backend": a.backend, "kernels": a.kernels, "levers": levers,
                                             "losses": losses, "targets": TARGETS,
                                             "wall_s": time.perf_counter() - t0}))
        return
    mine, ref = (json.loads((work / f"losses_{s}.json").read_text()) for s in (f"ours{tag}", "trl"))
    res = {"backend": mine["backend"], "steps": len(mine["losses"]), "targets": mine.get("targets"), "ours": mine["losses"], "trl_peft": ref["losses"],
           "wall_s": {"ours": mine["wall_s"], "trl": ref["wall_s"]}, **compare(mine["losses"], ref["losses"])}
    print("PARITY", json.dumps({k: res[k] for k in ("backend", "max_gap_after_first", "first", "last_window")}))
    Path(a.rest[0]).write_text(json.dumps(res, indent=1))


def _lever(item: str) -> tuple[str, object]:
    """KEY=VALUE of --lever: true/false as booleans, anything else as written."""
    key, _, value = item.partition("=")
    return key, {"true": True, "false": False}.get(value.lower(), value)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] in ("build", "side", "compare"):
        return split_main(sys.argv[1:])
    ap = argparse.ArgumentParser()
    ap.add_argument("out", nargs="?")
    ap.add_argument("--backend", default="peft")
    ap.add_argument("--steps", type=int, default=100)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        records_path, model_dir = build(work)
        mine = ours(records_path, model_dir, work, a.backend, a.steps)
        ref = trl(records_path, model_dir, work, a.steps)
    res = {"backend": a.backend, "steps": a.steps, "ours": mine, "trl_peft": ref, **compare(mine, ref)}
    print("PARITY", json.dumps({k: res[k] for k in ("max_gap_after_first", "first", "last_window")}))
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
