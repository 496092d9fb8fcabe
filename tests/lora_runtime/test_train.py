"""End to end on the CPU through `lora_sft`: the tiny Llama and Qwen2 models learn; LoRA moves, the base does not;
the adapter reloads with PEFT and merges to the same logits; resume is exact; outputs are complete."""

from __future__ import annotations

import json
from pathlib import Path

import _runs
import _tiny
import pytest
import torch
from lora_runtime import lora_sft
from lora_runtime.checkpoint import CheckpointError
from lora_runtime.metrics import read_metrics
from safetensors.torch import load_file

pytestmark = pytest.mark.slow
PROBE = torch.tensor([[5, 17, 123, 400, 9, 77, 301, 64]])
REFERENCE = Path(__file__).parent.parent / "references" / "lora_runtime_llama_loss.json"


def _run(model_dir, shards, out, **extra):
    capture = _runs.Capture(PROBE)
    cbs = [capture.callback, *extra.pop("callbacks", [])]
    result = lora_sft(str(model_dir), str(shards), str(out), **{**_runs.RUN, **extra}, callbacks=cbs)
    return result, capture


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory, tiny_llama_dir, llama_shards):
    return _run(tiny_llama_dir, llama_shards, tmp_path_factory.mktemp("llama_run"), save_merged=True)


@pytest.fixture(scope="module")
def qwen2_run(tmp_path_factory, tiny_qwen2_dir, qwen2_shards):
    # gradient checkpointing on (exact recompute, so it must still learn and reload the same): covers that path on CPU
    return _run(tiny_qwen2_dir, qwen2_shards, tmp_path_factory.mktemp("qwen2_run"), gradient_checkpointing=True)


@pytest.fixture(params=["llama", "qwen2"])
def run(request):
    return request.getfixturevalue(f"{request.param}_run")


def _losses(result):
    return [r["loss"] for r in read_metrics(result.metrics_path) if "loss" in r]


def test_loss_falls_well_below_start(run):
    losses = _losses(run[0])
    assert len(losses) == 24
    assert sum(losses[-4:]) / 4 < losses[0] - 1.0, losses


def test_every_lora_param_changed_and_every_base_param_bitwise_unchanged(run):
    _, cap = run
    assert cap.lora_before and cap.before
    for name, before in cap.lora_before.items():
        assert not torch.equal(before, cap.after[name]), f"LoRA parameter {name} did not change"
    for name, before in cap.before.items():
        assert torch.equal(before, cap.after[name]), f"base parameter {name} changed"


def _base(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


def test_saved_adapter_reloads_with_peft_to_the_same_logits(run, tiny_llama_dir, tiny_qwen2_dir):
    from peft import PeftModel

    result, cap = run
    base_dir = tiny_llama_dir if "llama" in str(result.adapter_dir) else tiny_qwen2_dir
    model = PeftModel.from_pretrained(_base(base_dir), result.adapter_dir).eval()
    with torch.no_grad():
        logits = model(input_ids=PROBE).logits
    torch.testing.assert_close(logits, cap.logits, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(_base(base_dir)(input_ids=PROBE).logits, cap.logits, atol=1e-3)


def test_merged_model_matches_base_plus_adapter(llama_run):
    result, cap = llama_run
    assert result.merged_dir == Path(result.adapter_dir) / "merged"
    assert (result.merged_dir / "model.safetensors").is_file()
    with torch.no_grad():
        logits = _base(result.merged_dir)(input_ids=PROBE).logits
    torch.testing.assert_close(logits, cap.logits, atol=1e-4, rtol=1e-4)


def test_outputs_result_and_metrics(llama_run):
    result, _ = llama_run
    out = Path(result.adapter_dir)
    names = {p.name for p in out.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "tokenizer_config.json",
            "lora_sft_config.json", "metrics.jsonl", "loss.png", "checkpoints", "merged"} <= names
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-16", "checkpoint-24"]
    assert (out / "checkpoints" / "checkpoint-24" / "COMPLETE").is_file()
    from safetensors import safe_open

    for adapter in (out, out / "checkpoints" / "checkpoint-24"):  # LoRA tensors only, no frozen lm_head copy
        with safe_open(adapter / "adapter_model.safetensors", "pt") as f:
            names = list(f.keys())
            assert names and all("lora_" in k for k in names), names
    assert result.backend == "peft" and result.steps == 24 and result.loss_plot.stat().st_size > 1000
    assert result.tokens_seen > 24 * 4 * 64 and result.peak_memory_bytes > 0 and result.wall_time_s > 0
    rows = read_metrics(result.metrics_path)
    assert [r["step"] for r in rows] == list(range(1, 25))
    for key in ("epoch", "loss", "lr", "grad_norm", "tokens_per_s", "peak_memory_bytes", "tokens_seen"):
        assert all(key in r for r in rows), key
    assert rows[-1]["tokens_seen"] == result.tokens_seen and rows[-1]["epoch"] == pytest.approx(6.0)
    saved = json.loads((out / "lora_sft_config.json").read_text())
    assert saved["resolved"]["gradient_accumulation_steps"] == 2 and saved["lora_r"] == 16
    assert saved["resolved"]["cuda_graphs"] is False  # the compiled path's CUDA graphs: a decision of the GPU


def test_golden_loss_trajectory(llama_run):
    """fp32 CPU losses against the committed reference (re-record: tests/lora_runtime/record_reference.py)."""
    ref = json.loads(REFERENCE.read_text())
    assert ref["run"] == json.loads(json.dumps(_runs.RUN)), "run settings changed: re-record the reference"
    got = _losses(llama_run[0])
    assert got == pytest.approx(ref["losses"], abs=2e-3), f"environment of the reference: {ref['environment']}"


def test_resume_after_interruption_equals_uninterrupted(llama_run, tiny_llama_dir, llama_shards, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "interrupted"
    first, _ = _run(tiny_llama_dir, llama_shards, out, callbacks=[_runs.StopAt(10)])  # mid-epoch (4 steps/epoch)
    assert first.steps == 10 and (out / "checkpoints" / "checkpoint-10" / "COMPLETE").is_file()
    epochs = _runs.LoggedEpochs()
    resumed, _ = _run(tiny_llama_dir, llama_shards, out, callbacks=[epochs.callback])
    assert resumed.steps == 24
    assert epochs.seen and all(e == pytest.approx(s / 4) for s, e in epochs.seen), epochs.seen  # what wandb sees
    want = load_file(Path(llama_run[0].adapter_dir) / "adapter_model.safetensors")
    got = load_file(out / "adapter_model.safetensors")
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=1e-5)
    assert _losses(resumed) == pytest.approx(_losses(llama_run[0]), abs=1e-5)


def test_a_mid_epoch_resume_with_dropout_draws_the_same_masks(tiny_llama_dir, llama_shards, tmp_path):
    """Dropout draws from the global RNG, which a checkpoint restores: starting the epoch's data iterator after that
    must take no draw from it, or every later mask shifts and the resumed losses drift from the uninterrupted run's."""
    kw = {"max_steps": 6, "save_steps": 2, "lora_dropout": 0.2}
    whole, _ = _run(tiny_llama_dir, llama_shards, tmp_path / "whole", **kw)
    _run(tiny_llama_dir, llama_shards, tmp_path / "stopped", **kw, callbacks=[_runs.StopAt(5)])  # mid-epoch
    resumed, _ = _run(tiny_llama_dir, llama_shards, tmp_path / "stopped", **kw)
    assert _losses(resumed) == pytest.approx(_losses(whole), abs=1e-6)


def test_a_stop_between_logs_logs_its_step_so_the_resumed_metrics_read_as_uninterrupted(tiny_llama_dir, llama_shards,
                                                                                        tmp_path):
    """Logging every 4 steps, stopped (and saved) after step 6: the row at 6 holds steps 5-6, the resumed run's
    row at 8 steps 7-8, so the whole run's mean loss is the uninterrupted run's (a row at 8 over steps 7-8 alone,
    weighted as 4 steps, would not be)."""
    from lora_runtime.metrics import run_summary

    every4 = {"max_steps": 12, "logging_steps": 4, "save_steps": 100}
    whole = lora_sft(str(tiny_llama_dir), str(llama_shards), str(tmp_path / "whole"), **{**_runs.RUN, **every4})
    out = tmp_path / "stopped"
    lora_sft(str(tiny_llama_dir), str(llama_shards), str(out), **{**_runs.RUN, **every4}, callbacks=[_runs.StopAt(6)])
    resumed = lora_sft(str(tiny_llama_dir), str(llama_shards), str(out), **{**_runs.RUN, **every4})
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert steps == [4, 6, 8, 12] and [r["step"] for r in read_metrics(whole.metrics_path) if "loss" in r] == [4, 8, 12]
    assert resumed.train_loss == pytest.approx(whole.train_loss, rel=1e-5)
    assert run_summary(out / "metrics.jsonl")["train_loss"] == pytest.approx(whole.train_loss, rel=1e-5)


@pytest.mark.parametrize("shorter", [{"max_steps": 8}, {"max_steps": 6}, {"max_steps": None, "num_epochs": 1}])
def test_a_resume_with_the_run_shortened_to_its_checkpoint_or_below_ends_with_its_adapter(
        shorter, tiny_llama_dir, llama_shards, tmp_path, capsys):
    """Stopped at step 8 of 12 (save_steps 8), called again with fewer steps: the checkpoint kept its own plan's
    max_steps, so the run read as stopped early and every call again printed "the same call resumes"."""
    out = tmp_path / "run"
    _run(tiny_llama_dir, llama_shards, out, max_steps=12, callbacks=[_runs.StopAt(8)])
    capsys.readouterr()
    again = lora_sft(str(tiny_llama_dir), str(llama_shards), str(out), **{**_runs.RUN, **shorter})
    assert again.finished and again.steps == 8 and again.adapter_dir == out
    ckpt = load_file(out / "checkpoints" / "checkpoint-8" / "adapter_model.safetensors")
    final = load_file(out / "adapter_model.safetensors")
    assert all(final[k].equal(v) for k, v in ckpt.items())
    said = capsys.readouterr().out
    assert ("checkpoint-8 is past the" in said) == (shorter != {"max_steps": 8})


def test_resume_false_refuses_a_directory_with_checkpoints(llama_run, tiny_llama_dir, llama_shards):
    out = Path(llama_run[0].adapter_dir)
    before = (out / "adapter_model.safetensors").read_bytes()
    with pytest.raises(CheckpointError, match="resume=False refuses to overwrite"):
        lora_sft(str(tiny_llama_dir), str(llama_shards), str(out), **{**_runs.RUN, "resume": False})
    assert (out / "adapter_model.safetensors").read_bytes() == before


def test_shards_of_another_tokenizer_are_refused_before_training(tiny_qwen2_dir, llama_shards, tmp_path):
    from lora_data import TokenizerMismatchError

    with pytest.raises(TokenizerMismatchError, match="fingerprint mismatch") as e:
        lora_sft(str(tiny_qwen2_dir), str(llama_shards), str(tmp_path / "out"), **_runs.RUN)
    assert e.value.expected != e.value.actual
    assert not (tmp_path / "out").exists()


def test_a_shard_set_without_rows_is_one_data_error_before_training(tiny_llama_dir, llama_shards, tmp_path):
    """lora-data never writes one; a set written through the ShardWriter API can be empty (was a ValueError traceback
    after the model had loaded)."""
    from lora_data import DataError

    empty = _tiny.write_shards(tmp_path / "empty", [], seq_len=64)
    with pytest.raises(DataError, match=r"manifest\.json: the shard set has no rows; nothing to train on"):
        lora_sft(str(tiny_llama_dir), str(empty), str(tmp_path / "out"), **_runs.RUN)
    assert not (tmp_path / "out").exists()
    with pytest.raises(DataError, match=r"manifest\.json: the shard set has no rows; nothing to evaluate on"):
        lora_sft(str(tiny_llama_dir), str(llama_shards), str(tmp_path / "out"), **_runs.RUN, eval_data_path=str(empty))


def test_token_ids_past_the_models_embeddings_are_one_data_error_before_training(tiny_llama_dir, llama_shards,
                                                                                 tmp_path):
    """A tokenizer with tokens added and the model not resized: the run failed in step 1 with an IndexError (on a
    GPU, a device-side assert)."""
    import shutil

    from lora_data import DataError, ShardReader
    from transformers import AutoModelForCausalLM

    small = tmp_path / "small"
    shutil.copytree(tiny_llama_dir, small)
    model = AutoModelForCausalLM.from_pretrained(small)
    model.resize_token_embeddings(500)
    model.save_pretrained(small)
    assert ShardReader(llama_shards).max_token_id() >= 500
    with pytest.raises(DataError, match=r"token id \d+ is past the model's 500 token embeddings"):
        lora_sft(str(small), str(llama_shards), str(tmp_path / "out"), **_runs.RUN)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("factor", [2, 0.5])
def test_shards_packed_to_another_length_are_refused_before_training(tiny_llama_dir, llama_shards, tmp_path, factor):
    """Longer rows would not fit; shorter ones mean records over their length were dropped or cut at prepare time."""
    from lora_data import Manifest
    from lora_runtime import ConfigError

    seq_len = Manifest.load(llama_shards).seq_len
    other = int(seq_len * factor)
    with pytest.raises(ConfigError, match=f"rows are packed to {seq_len} tokens but max_seq_len={other}; "
                                          f"pass max_seq_len={seq_len}"):
        lora_sft(str(tiny_llama_dir), str(llama_shards), str(tmp_path / "out"), **{**_runs.RUN, "max_seq_len": other})
    assert not (tmp_path / "out").exists()


def test_the_default_max_seq_len_defers_to_the_shards(tiny_llama_dir, llama_shards, tmp_path, capsys):
    """`lora_sft(model, SHARD_DIR, out)` trains at the shards' row length, as `lora-cli train --shards` does."""
    import json

    from lora_data import Manifest

    run = {k: v for k, v in _runs.RUN.items() if k != "max_seq_len"}
    result = lora_sft(str(tiny_llama_dir), str(llama_shards), str(tmp_path / "out"), **{**run, "max_steps": 1})
    seq_len = Manifest.load(llama_shards).seq_len
    assert result.steps == 1 and seq_len != 2048
    assert f"max_seq_len={seq_len}, the row length the shards in {llama_shards} were packed to" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "lora_sft_config.json").read_text())["max_seq_len"] == seq_len


@pytest.mark.parametrize("option", [{"train_on_inputs": True}, {"sample_packing": False}, {"overlong": "split"},
                                    {"field_messages": "conversation"}, {"dataset_type": "alpaca"}])
def test_prepare_options_a_shard_dir_cannot_honour_are_refused(tiny_llama_dir, tmp_path, option):
    import _tiny
    import lora_data
    from lora_runtime import ConfigError

    shards = tmp_path / "shards"
    lora_data.prepare(_tiny.write_jsonl(tmp_path / "d.jsonl", _tiny.chat_records(8)), shards, tiny_llama_dir,
                      max_seq_len=128, verbose=False)
    (name, value), = option.items()
    with pytest.raises(ConfigError, match=f"but the config asks for {name}={value!r}, which a prepared shard dir"):
        lora_sft(str(tiny_llama_dir), str(shards), str(tmp_path / "out"), **{**_runs.RUN, **option})
    assert not (tmp_path / "out").exists()


def test_passthrough_trains_a_shard_dir_as_prepared(tiny_llama_dir, llama_shards, tmp_path):
    """dataset_type='passthrough' (tokenized already) is what a prepared shard dir is, whatever its record format."""
    result = lora_sft(str(tiny_llama_dir), str(llama_shards), str(tmp_path / "out"),
                      **{**_runs.RUN, "max_steps": 1, "dataset_type": "passthrough"})
    assert result.steps == 1


def test_a_chat_template_over_a_shard_dir_names_the_template(tiny_llama_dir, llama_shards, tmp_path):
    """The template is part of the tokenizer's fingerprint: the error said to prepare again with this model's
    tokenizer, which the shards were."""
    from lora_runtime import ConfigError

    with pytest.raises(ConfigError, match=r"rendered with another chat template .* than chat_template='chatml'"):
        lora_sft(str(tiny_llama_dir), str(llama_shards), str(tmp_path / "out"), **_runs.RUN, chat_template="chatml")


def test_two_cpu_ranks_match_one_process(llama_run, tiny_llama_dir, llama_shards, tmp_path):
    """torchrun, 2 gloo ranks × micro 2 × accum 1 == 1 process × micro 2 × accum 2: same rows per step, same result;
    ranks read disjoint rows (else the losses would differ) and only rank 0 writes. The workers read each log a step
    late, as on a GPU: the ranks' numbers are summed on the device, in step."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(Path(__file__).parent / "_ddp_worker.py"), str(tiny_llama_dir), str(llama_shards), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("batch: micro 2 × 2 processes × accumulation 1 = effective 4") == 1  # rank 0 logs, rank 1 quiet
    late = [n for n in range(1, 24) if n % 8]  # every logged step but the checkpoints' (8, 16) and the last
    assert proc.stdout.count(f"read late: {late}") == 2, proc.stdout[-3000:]
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 25))  # one writer
    assert [r["loss"] for r in rows] == pytest.approx(_losses(llama_run[0]), abs=1e-4)
    one = [r for r in read_metrics(llama_run[0].metrics_path) if "loss" in r]
    assert [r["tokens_seen"] for r in rows] == [r["tokens_seen"] for r in one]
    assert [r["grad_norm"] for r in rows] == pytest.approx([r["grad_norm"] for r in one], rel=1e-3)
    want = load_file(Path(llama_run[0].adapter_dir) / "adapter_model.safetensors")
    got = load_file(out / "adapter_model.safetensors")
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("late", [False, True], ids=["at_once", "late"])
def test_tokens_per_s_leaves_out_checkpoint_time(tiny_llama_dir, llama_shards, tmp_path, monkeypatch, late):
    """A fake clock: each optimizer step takes 1 s, each checkpoint 100 s; tokens/s must be the step's tokens / 1 s.
    `late`: logs read a step late (as on a GPU) where a step does not save: the step that saves logs at once right
    after the late log of the step before, and still gets its own 1 s."""
    from types import SimpleNamespace

    import lora_runtime.trainer as trainer_module
    from transformers import TrainerCallback

    clock = [1000.0]
    monkeypatch.setattr(trainer_module, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    if late:
        monkeypatch.setattr(trainer_module, "DEFERRED_LOG_DEVICES", ("cuda", "cpu"))
    read_late = []
    read_later = trainer_module.PackedTrainer._read_later
    monkeypatch.setattr(trainer_module.PackedTrainer, "_read_later",
                        lambda self, *a: read_late.append(self.state.global_step) or read_later(self, *a))

    class Tick(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            clock[0] += 1.0

        def on_save(self, args, state, control, **kw):
            clock[0] += 100.0

    result = lora_sft(str(tiny_llama_dir), str(llama_shards), str(tmp_path / "run"),
                      **{**_runs.RUN, "max_steps": 4, "save_steps": 2}, callbacks=[Tick()])
    rows = [r for r in read_metrics(result.metrics_path) if "loss" in r]
    seen = [0] + [r["tokens_seen"] for r in rows]
    assert read_late == ([1, 3] if late else [])
    assert len(rows) == 4
    for r, before in zip(rows, seen, strict=False):
        assert r["tokens_per_s"] == pytest.approx(r["tokens_seen"] - before), rows


def _late_and_at_once(tiny_llama_dir, llama_shards, tmp_path, monkeypatch, callbacks=(), **extra):
    """The same run with logs read a step late (forced on, as on a GPU) and at once: (steps read late, results)."""
    import lora_runtime.trainer as trainer_module

    settings = {**_runs.RUN, "max_steps": 10, "logging_steps": 3, "save_steps": 6, "save_total_limit": 10, **extra}
    late = []
    read_later = trainer_module.PackedTrainer._read_later

    def counted(self, *args):
        late.append(self.state.global_step)
        return read_later(self, *args)

    monkeypatch.setattr(trainer_module.PackedTrainer, "_read_later", counted)
    runs = {}
    for name, devices in (("late", ("cuda", "cpu")), ("at_once", ())):
        monkeypatch.setattr(trainer_module, "DEFERRED_LOG_DEVICES", devices)
        result = lora_sft(str(tiny_llama_dir), str(llama_shards), str(tmp_path / name), **settings,
                          callbacks=[cb() for cb in callbacks])
        keys = ("step", "loss", "grad_norm", "learning_rate", "tokens_seen", "epoch")  # not timings, peak memory
        states = {}
        for c in (tmp_path / name / "checkpoints").iterdir():
            state = json.loads((c / "trainer_state.json").read_text())
            states[c.name] = {"history": [{k: h.get(k) for k in keys} for h in state["log_history"]],
                              **{k: state[k] for k in ("epoch", "global_step", "total_flos", "num_input_tokens_seen")}}
        rows = [{k: r.get(k) for k in keys} for r in read_metrics(result.metrics_path) if "loss" in r]
        runs[name] = (rows, states, result.train_loss, result.steps)
    return late, runs


def test_a_log_read_one_step_late_equals_one_read_at_once(tiny_llama_dir, llama_shards, tmp_path, monkeypatch):
    """On a GPU a step's loss is read a step later (no wait for the device); forced on here, every logged number,
    its step and epoch, and the checkpoints' states (log history, epoch, flos, tokens) equal those of the log read at
    once. 4 steps an epoch, a log every 3, a checkpoint every 4: step 3 is written while step 4 runs, which saves and
    logs at once (its epoch must be 1.0, not step 3's 0.75); 6 during 7; 8 saves; 9 is written during 10, the last."""
    late, runs = _late_and_at_once(tiny_llama_dir, llama_shards, tmp_path, monkeypatch, logging_steps=3,
                                   save_steps=4, max_steps=10)
    assert late == [3, 6, 9]
    assert [r["step"] for r in runs["late"][0]] == [3, 4, 6, 8, 9, 10]  # steps that save or stop log too
    assert runs["late"][1]["checkpoint-4"]["epoch"] == 1.0
    assert runs["late"] == runs["at_once"]


def test_a_callback_acting_on_logs_keeps_them_read_at_once(tiny_llama_dir, llama_shards, tmp_path, monkeypatch):
    """A user's on_log may stop (or save) at the step it was given: with one, no log is read late, and it stops
    where it would have; a callback marked late_log_ok only records, and logs are read late again."""
    from transformers import TrainerCallback

    class StopAtThree(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if state.global_step == 3:
                control.should_training_stop = True

    class Record(TrainerCallback):
        late_log_ok = True

        def on_log(self, args, state, control, logs=None, **kw):
            pass

    late, runs = _late_and_at_once(tiny_llama_dir, llama_shards, tmp_path / "stop", monkeypatch, callbacks=[StopAtThree],
                                   logging_steps=1)
    assert late == [] and runs["late"][3] == 3
    late, _ = _late_and_at_once(tiny_llama_dir, llama_shards, tmp_path / "record", monkeypatch, callbacks=[Record],
                                logging_steps=1, max_steps=4)
    assert late == [1, 2, 3]


def test_eval_loss_counts_each_row_once_whatever_the_eval_batch(tiny_llama_dir, llama_shards, tmp_path):
    """Token-weighted eval_loss: the same with 1 row a batch as with a batch size that makes the set wrap (the
    repeated rows carry no loss), and equal to the loss over every eval row's targets computed by hand."""
    from lora_data import ShardReader
    from lora_runtime.collate import collate_packed
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    reader = ShardReader(llama_shards)
    rows = len(reader)
    wrap = next(b for b in range(3, rows) if rows % b)
    runs, adapter = {}, None
    for b in (1, wrap):
        res = lora_sft(str(tiny_llama_dir), str(llama_shards), str(tmp_path / f"b{b}"), eval_data_path=str(llama_shards),
                       **{**_runs.RUN, "max_steps": 1, "eval_steps": 1, "per_device_eval_batch_size": b})
        runs[b] = [r for r in read_metrics(res.metrics_path) if "eval_loss" in r][-1]
        adapter = res.adapter_dir
    assert runs[1]["eval_tokens"] == runs[wrap]["eval_tokens"]
    assert runs[1]["eval_loss"] == pytest.approx(runs[wrap]["eval_loss"], abs=1e-5)

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32, attn_implementation="sdpa")
    model = PeftModel.from_pretrained(base, adapter).eval()
    total = count = 0.0
    with torch.no_grad():
        for i in range(rows):  # the adapter after step 1 is the model evaluated at step 1
            r = reader[i]
            batch = collate_packed([{"input_ids": r.input_ids, "loss_mask": r.loss_mask, "seq_lens": r.seq_lens}])
            batch.pop("num_tokens")
            n = int((batch["labels"] != -100).sum())
            if n:
                total += float(model(**batch, use_cache=False).loss) * n  # no cache: samples stay apart
                count += n
    assert runs[1]["eval_tokens"] == count
    assert runs[1]["eval_loss"] == pytest.approx(total / count, abs=1e-4)


def test_metrics_rows_are_synced_with_each_checkpoint_not_per_row(tiny_llama_dir, llama_shards, tmp_path,
                                                                   monkeypatch):
    """metrics.jsonl is flushed per row but fsynced only before a checkpoint is committed (an fsync per logged step
    stalled the host): every row up to the checkpoint's step is durable when the checkpoint appears, and the
    rows after the last checkpoint at the end of the run."""
    import os

    import lora_runtime.checkpoint as checkpoint_module
    import lora_runtime.metrics as metrics_module

    events: list = []
    real_fsync, real_commit = os.fsync, checkpoint_module.commit
    def fsync(fd):  # only the metrics file's fsyncs (checkpoints fsync their own files)
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")) == "metrics.jsonl":
            events.append("fsync")
        real_fsync(fd)

    monkeypatch.setattr(metrics_module.os, "fsync", fsync)
    monkeypatch.setattr(checkpoint_module, "commit", lambda tmp, step: events.append(("commit", step)) or
                        real_commit(tmp, step))
    out = tmp_path / "run"
    lora_sft(str(tiny_llama_dir), str(llama_shards), str(out), **{**_runs.RUN, "max_steps": 4, "save_steps": 2})
    assert events == ["fsync", ("commit", 2), "fsync", ("commit", 4), "fsync"]  # the last: at the end of the run
    assert len([r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]) == 4


def test_a_nan_loss_is_logged_as_nan_not_hidden(tiny_llama_dir, llama_shards, tmp_path, monkeypatch):
    """transformers' logging_nan_inf_filter logged 0.0 in place of a NaN (and waited for the GPU after every backward
    to test for it): the step shows its NaN, and the steps after it (here the weights stay whole: the NaN is a
    constant, without gradient) show their own losses, not a NaN carried over."""
    import math

    from lora_runtime.trainer import PackedTrainer

    real = PackedTrainer.compute_loss

    def poisoned(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = real(self, model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        return loss + torch.tensor(float("nan")) if self.state.global_step == 2 else loss

    monkeypatch.setattr(PackedTrainer, "compute_loss", poisoned)
    result = lora_sft(str(tiny_llama_dir), str(llama_shards), str(tmp_path / "run"),
                      **{**_runs.RUN, "max_steps": 4, "save_steps": 100})
    losses = [r["loss"] for r in read_metrics(result.metrics_path) if "loss" in r]
    assert [math.isnan(x) for x in losses] == [False, False, True, False], losses


def test_total_flos_counts_the_parameters_once(tiny_llama_dir, llama_shards, tmp_path, monkeypatch):
    """transformers' estimate of total_flos, with the parameters counted once, not walked again every micro-step."""
    from transformers import PreTrainedModel, TrainerCallback

    calls = []
    real = PreTrainedModel.num_parameters
    monkeypatch.setattr(PreTrainedModel, "num_parameters",
                        lambda self, *a, **k: calls.append(k) or real(self, *a, **k))
    captured = {}

    class Keep(TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kw):
            captured["flos"], captured["params"] = state.total_flos, real(model, exclude_embeddings=True)

    lora_sft(str(tiny_llama_dir), str(llama_shards), str(tmp_path / "run"),
             **{**_runs.RUN, "max_steps": 3, "save_steps": 100}, callbacks=[Keep()])
    assert calls.count({"exclude_embeddings": True}) == 1
    rows = _runs.RUN["micro_batch_size"] * _runs.RUN["gradient_accumulation_steps"] * 3
    assert captured["flos"] == 6 * captured["params"] * rows * _runs.RUN["max_seq_len"]


def test_a_run_that_replays_cuda_graphs_pads_every_pass_for_the_densest_one(tiny_llama_dir, llama_shards, tmp_path,
                                                                              capsys, monkeypatch):
    """loop.train gives the model the most segments a training or evaluation pass of the run can hold, which the
    boundaries hook pads every pass to (one graph shape); the run is marked as the compiled path marks one that
    replays CUDA graphs (a CPU has none to replay)."""
    from lora_runtime.backends.peft import PeftBackend
    from lora_runtime.dataset import PackedShardDataset

    add_lora, models = PeftBackend.add_lora, []

    def graphed(self, model, config, plan):
        model = add_lora(self, model, config, plan)
        model.cuda_graphs = True
        models.append(model)
        return model

    monkeypatch.setattr(PeftBackend, "add_lora", graphed)
    lora_sft(str(tiny_llama_dir), str(llama_shards), str(tmp_path / "out"),
             **{**_runs.RUN, "max_steps": 1, "eval_data_path": str(llama_shards), "per_device_eval_batch_size": 5})
    data = PackedShardDataset(llama_shards)
    want = max(data.most_segments(2), data.most_segments(5))
    assert want > data.most_segments(2)  # the evaluation's passes of 5 rows set it
    assert models[0].graph_segments == want and f"padded for {want} segments" in capsys.readouterr().out


# (logs read a step late, step whose weights or gradients go bad, what breaks, the error's words, steps logged)
NAN_CASES = {
    "read_late": (True, 5, "weight", r"stopped at step 5: loss nan and gradient norm nan", 6),
    "read_at_once": (False, 6, "weight", r"stopped at step 6: loss nan and gradient norm nan", 6),
    "gradient_only": (False, 6, "gradient", r"stopped at step 6: gradient norm inf", 6),
}


@pytest.mark.parametrize("case", list(NAN_CASES))
def test_a_nan_step_stops_the_run_and_saves_nothing_after_it(tiny_llama_dir, llama_shards, tmp_path, monkeypatch,
                                                             case):
    """Checkpoints every 2 steps, 4 steps an epoch, a callback asking for a save at every epoch's end. A LoRA weight
    turned NaN before step 5 with logs read a step late (step 5's log is written while step 6, which saves, runs),
    or before step 6 (a step that saves) with logs read at once, or step 6's gradient made infinite over a finite
    loss: the run stops after that step with NonFiniteLossError naming checkpoint-4, and writes no checkpoint-6, no
    end-of-epoch checkpoint and no adapter. The same call without the fault resumes from checkpoint-4 and trains to
    the end with finite losses."""
    import lora_runtime.trainer as trainer_module
    from lora_runtime.errors import NonFiniteLossError
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    late, bad_step, what, words, logged = NAN_CASES[case]
    faulty = []

    class Fault(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            param = next(p for n, p in model.named_parameters() if "lora_B" in n)
            param.register_hook(lambda g: torch.full_like(g, float("inf")) if faulty else g)

        def on_step_begin(self, args, state, control, model=None, **kw):
            if state.global_step == bad_step - 1:
                if what == "weight":
                    next(p for n, p in model.named_parameters() if "lora_B" in n).data.fill_(float("nan"))
                else:
                    faulty.append(True)

        def on_epoch_end(self, args, state, control, **kw):
            control.should_save = True

        def on_train_end(self, args, state, control, **kw):  # where integrations upload the final model
            ended.append(state.global_step)

    ended = []
    monkeypatch.setattr(trainer_module, "DEFERRED_LOG_DEVICES", ("cuda", "cpu") if late else ())
    out = tmp_path / "run"
    settings = {**_runs.RUN, "max_steps": 8, "save_steps": 2, "save_total_limit": 2}
    with pytest.raises(NonFiniteLossError, match=words + r".*checkpoint-4, is from before it"):
        lora_sft(str(tiny_llama_dir), str(llama_shards), str(out), **settings, callbacks=[Fault()])
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert not (out / "adapter_model.safetensors").exists() and ended == []
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, logged + 1))
    finite = [r["loss"] == r["loss"] for r in rows]
    assert finite == [True] * len(rows) if what == "gradient" else finite == [s < bad_step for s in range(1, logged + 1)]
    kept = load_file(out / "checkpoints" / "checkpoint-4" / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in kept.values())
    if case != "read_late":
        return
    result = lora_sft(str(tiny_llama_dir), str(llama_shards), str(out), **settings)
    losses = {r["step"]: r["loss"] for r in read_metrics(result.metrics_path) if "loss" in r}
    assert result.steps == 8 and sorted(losses) == list(range(1, 9))
    assert all(v == v for v in losses.values()), losses  # resumed at 5: the NaN rows are cut, every loss finite


@pytest.mark.parametrize("late", [False, True])
def test_a_non_finite_gradient_norm_between_logs_stops_the_run_at_the_next_log(tiny_llama_dir, llama_shards,
                                                                               tmp_path, monkeypatch, late):
    """logging_steps=4: step 2's gradient is infinite in one LoRA weight, and that weight and its optimizer state are
    put back after the step, as where the NaN lands in embedding rows no later batch reads: every later loss stays
    finite. Step 4's log carries step 2's infinite norm, and the run stops there, before checkpoint-4 (saves every 4 steps);
    also with logs read late (saves every 8: the copy of step 4's numbers is what carries it)."""
    import lora_runtime.trainer as trainer_module
    from lora_runtime.errors import NonFiniteLossError
    from transformers import TrainerCallback

    kept = {}

    class Fault(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            kept["param"] = next(p for n, p in model.named_parameters() if "lora_B" in n)
            kept["param"].register_hook(lambda g: torch.full_like(g, float("inf")) if state.global_step == 1 else g)

        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == 1:
                kept["data"] = kept["param"].detach().clone()

        def on_step_end(self, args, state, control, optimizer=None, **kw):
            if state.global_step == 2:
                assert not torch.isfinite(kept["param"]).all()  # the fault did reach the weight
                kept["param"].data.copy_(kept["data"])
                optimizer.state[kept["param"]] = {}

    monkeypatch.setattr(trainer_module, "DEFERRED_LOG_DEVICES", ("cuda", "cpu") if late else ())
    out = tmp_path / "run"
    settings = {**_runs.RUN, "max_steps": 12, "logging_steps": 4, "save_steps": 8 if late else 4}
    with pytest.raises(NonFiniteLossError, match=r"stopped at step 4: gradient norm inf in one of steps 1-4 "):
        lora_sft(str(tiny_llama_dir), str(llama_shards), str(out), **settings, callbacks=[Fault()])
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == [4] and rows[0]["loss"] == rows[0]["loss"]  # a finite loss, an infinite norm
