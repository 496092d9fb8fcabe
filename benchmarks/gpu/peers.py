"""TRL-based peers, one per process (Unsloth patches transformers/TRL on import, so it must not share a process
with the plain TRL+PEFT peer):

    python -m benchmarks.gpu.peers th         MODEL RECORDS OUT   # training-hub 0.11.2 lora_sft (Unsloth + TRL, packing)
    python -m benchmarks.gpu.peers trl_peft   MODEL RECORDS OUT   # TRL SFTTrainer + PEFT LoRA, no Unsloth
    python -m benchmarks.gpu.peers unsloth_trl MODEL RECORDS OUT  # Unsloth FastLanguageModel through TRL SFTTrainer

All three see the same rendered chat text, bfd packing to 2048-token sequences, 8 sequences a step (padding-free),
LoRA r=16 alpha=32 on all linear projections, gradient checkpointing on, AdamW lr 2e-4, bf16. A callback times
each optimizer step (device synchronised) and stops after --steps; a wrapper on `training_step` counts the tokens
each step really trains on (attention-mask sum, or all ids under padding-free).
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
import time
import traceback

from benchmarks.gpu import common

SEQ_LEN = 2048
MICRO = 8


def _instrument(meter: common.StepMeter, max_steps: int) -> None:
    """Patch Trainer.__init__ so every trainer built in this process gets our timing callback and token counter."""
    import transformers
    from transformers import TrainerCallback

    pending = {"tokens": 0}

    class Timing(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            meter.start()

        def on_step_end(self, args, state, control, **kw):
            meter.step(pending["tokens"])
            pending["tokens"] = 0
            if state.global_step >= max_steps:
                control.should_training_stop = True
            return control

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                meter.losses.append(float(logs["loss"]))

    orig_init = transformers.Trainer.__init__

    def init(self, *a, **k):
        orig_init(self, *a, **k)
        self.add_callback(Timing())
        step = self.training_step

        def counted(model, inputs, *args, **kwargs):
            ids = inputs.get("input_ids")
            mask = inputs.get("attention_mask")
            if mask is not None:
                pending["tokens"] += int(mask.sum())
            elif ids is not None:
                pending["tokens"] += int(ids.numel())
            return step(model, inputs, *args, **kwargs)

        self.training_step = counted

    transformers.Trainer.__init__ = init


def _text_dataset(tokenizer, records_path: str):
    from datasets import Dataset

    records = common.read_records(records_path)
    return Dataset.from_dict({"text": common.render_texts(tokenizer, records)})


def _sft_config(out: str, steps: int, **extra):
    import torch
    from trl import SFTConfig

    if not torch.cuda.is_available():  # CPU smoke test of the harness
        extra.update(use_cpu=True)

    return SFTConfig(
        output_dir=out, max_length=SEQ_LEN, per_device_train_batch_size=MICRO, gradient_accumulation_steps=1,
        max_steps=steps, learning_rate=2e-4, bf16=torch.cuda.is_available(), gradient_checkpointing=True, packing=True,
        packing_strategy="bfd", dataset_text_field="text", logging_steps=5, save_strategy="no", report_to="none",
        dataloader_pin_memory=False, remove_unused_columns=False, seed=3407, **extra,
    )


def run_th(model_dir: str, records: str, steps: int) -> dict:
    from training_hub import lora_sft

    with tempfile.TemporaryDirectory() as ckpt:
        lora_sft(
            model_path=model_dir, data_path=records, ckpt_output_dir=ckpt, num_epochs=1, micro_batch_size=MICRO,
            max_seq_len=SEQ_LEN, lora_r=16, lora_alpha=32, lora_dropout=0.0, target_modules=common.LORA_TARGETS,
            learning_rate=2e-4, save_steps=100000,
        )
    return {"peer": "training-hub 0.11.2 lora_sft (Unsloth + TRL, sample_packing)"}


def run_trl_peft(model_dir: str, records: str, steps: int) -> dict:
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTTrainer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation="sdpa")
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=common.LORA_TARGETS, bias="none",
                      task_type="CAUSAL_LM")
    with tempfile.TemporaryDirectory() as out:
        trainer = SFTTrainer(model=model, args=_sft_config(out, steps), train_dataset=_text_dataset(tok, records),
                             processing_class=tok, peft_config=lora)
        trainer.train()
    return {"peer": "TRL SFTTrainer + PEFT (sdpa, bfd packing, padding-free)"}


def run_unsloth_trl(model_dir: str, records: str, steps: int) -> dict:
    import torch
    from trl import SFTTrainer
    from unsloth import FastLanguageModel

    model, tok = FastLanguageModel.from_pretrained(model_name=model_dir, max_seq_length=SEQ_LEN,
                                                   dtype=torch.bfloat16, load_in_4bit=False,
                                                   use_gradient_checkpointing="unsloth")
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=32, lora_dropout=0.0,
                                             target_modules=common.LORA_TARGETS, bias="none",
                                             use_gradient_checkpointing="unsloth", random_state=3407)
    with tempfile.TemporaryDirectory() as out:
        trainer = SFTTrainer(model=model, args=_sft_config(out, steps), train_dataset=_text_dataset(tok, records),
                             processing_class=tok)
        trainer.train()
    return {"peer": "Unsloth FastLanguageModel through TRL SFTTrainer (bfd packing)"}


RUNS = {"th": run_th, "trl_peft": run_trl_peft, "unsloth_trl": run_unsloth_trl}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("peer", choices=sorted(RUNS))
    ap.add_argument("model_dir")
    ap.add_argument("records")
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=22)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--shape", default="qwen1.5b")
    ap.add_argument("--cap-gib", type=float, default=None, help="cap the process's GPU memory (default: whole card)")
    a = ap.parse_args()
    need = {"th": "training_hub", "unsloth_trl": "unsloth"}.get(a.peer)
    if need and importlib.util.find_spec(need) is None:  # fail in a second, not after the imports below
        common.write_result(a.out, a.peer, {"shape": a.shape, "error": f"ModuleNotFoundError: no module {need!r}"})
        return
    fraction = common.cap_memory(a.cap_gib)
    meter = common.StepMeter(warmup=a.warmup)
    _instrument(meter, a.steps)
    t0 = time.perf_counter()
    payload: dict = {"shape": a.shape, "seq_len": SEQ_LEN, "micro_batch": MICRO, "gradient_checkpointing": True,
                     "budget_gib": a.cap_gib, "memory_fraction": fraction}
    try:
        payload.update(RUNS[a.peer](a.model_dir, a.records, a.steps))
        payload.update(meter.summary())
    except Exception as e:  # a failed peer is a recorded result, not a lost call
        traceback.print_exc()
        payload["error"] = f"{type(e).__name__}: {e}"[:2000]
        payload.update({k: v for k, v in meter.summary().items() if k != "error"})
    payload["total_s"] = time.perf_counter() - t0
    payload.update(common.memory())
    if "tokens_per_s" in payload:
        payload["mfu_matmul"] = payload["tokens_per_s"] * common.flops_per_token(a.shape) / 790e12
    common.write_result(a.out, a.peer, payload)


if __name__ == "__main__":
    main()
