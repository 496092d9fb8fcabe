"""LoraSftConfig: training-hub names/defaults, validation that collects every issue, strict keys, one surface."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import re
import subprocess
import sys

import pytest
from lora_runtime import ConfigError, LoraSftConfig, distributed
from lora_runtime.api import lora_sft

# training-hub's effective defaults (shared/reference/training_hub_lora_sft.md, table 0.1)
TRAINING_HUB = {
    "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": None, "num_epochs": 3,
    "effective_batch_size": None, "micro_batch_size": 2, "gradient_accumulation_steps": 1, "learning_rate": 2e-4,
    "max_seq_len": 2048, "lr_scheduler": "linear", "warmup_steps": 10, "load_in_4bit": False, "load_in_8bit": False,
    "bnb_4bit_quant_type": None, "bnb_4bit_compute_dtype": None, "bnb_4bit_use_double_quant": None,
    "flash_attention": None, "sample_packing": True, "bf16": True, "fp16": False, "tf32": None, "save_steps": 500,
    "eval_steps": 500, "save_total_limit": 3, "logging_steps": 1, "wandb_project": None, "wandb_entity": None,
    "wandb_run_name": None, "tensorboard_log_dir": None, "mlflow_tracking_uri": None, "mlflow_experiment_name": None,
    "mlflow_run_name": None, "dataset_type": "chat_template", "field_messages": "messages",
    "field_instruction": "instruction", "field_input": "input", "field_output": "output", "nproc_per_node": None,
    "nnodes": None, "node_rank": None, "rdzv_id": None, "rdzv_endpoint": None, "master_addr": None,
    "master_port": None, "enable_model_splitting": False, "finetune_vision_layers": False,
    "finetune_language_layers": True, "trust_remote_code": False, "callbacks": None, "eval_data_path": None,
    "per_device_eval_batch_size": None, "weight_decay": 0.01, "max_grad_norm": 0.3, "seed": 3407, "save_model": True,
    "use_rslora": False, "use_dora": False, "init_lora_weights": True, "rank_pattern": None, "alpha_pattern": None,
    "loftq_config": None, "data_output_dir": None,
}


def cfg(**kw):
    return LoraSftConfig("m", "d.jsonl", "out", **kw)


# Where we differ on purpose (issue 5): "auto" is training-hub's 2 on a CPU and is sized from free memory on a GPU
# (lora_runtime.batching; tests/lora_runtime/test_batching.py).
OURS = {"micro_batch_size": "auto"}


def test_training_hub_names_and_defaults():
    c = cfg()
    assert {k: getattr(c, k) for k in TRAINING_HUB} == {**TRAINING_HUB, **OURS}


def test_every_field_documents_itself():
    for f in dataclasses.fields(LoraSftConfig):
        assert f.metadata.get("help"), f.name
        if "choices" in f.metadata:
            assert getattr(cfg(), f.name) in f.metadata["choices"] or f.default is dataclasses.MISSING


def test_signature_equals_fields_with_the_keyword_only_trio():
    sig = inspect.signature(lora_sft)
    fields = {f.name: f.default for f in dataclasses.fields(LoraSftConfig)}
    assert list(sig.parameters) == list(fields)
    for name, p in sig.parameters.items():
        if fields[name] is dataclasses.MISSING:
            assert p.default is inspect.Parameter.empty and p.kind is p.POSITIONAL_OR_KEYWORD, name
        elif name == "backend":  # training-hub's 4th positional parameter
            assert p.default == fields[name] and p.kind is p.POSITIONAL_OR_KEYWORD
        else:
            assert p.default == fields[name] and p.kind is p.KEYWORD_ONLY, name
    assert [n for n in list(sig.parameters)[-3:]] == ["eval_data_path", "per_device_eval_batch_size", "callbacks"]


def test_validate_collects_every_problem(monkeypatch):
    monkeypatch.setattr("lora_runtime.preflight.cuda_available", lambda: True)  # CUDA-only options: below
    bad = cfg(lora_alpha=0, load_in_4bit=True, load_in_8bit=True, fp16=True, effective_batch_size=10,
              micro_batch_size=4, lr_scheduler="cosine_annealing", lora_dropout=1.5, bnb_4bit_quant_type=None)
    with pytest.raises(ConfigError) as e:
        bad.validate(world_size=2)
    text = str(e.value)
    assert len(e.value.issues) == 6, text
    for needle in ("`lora_alpha` must be > 0, got 0", "`load_in_4bit` and `load_in_8bit` are exclusive",
                   "`bf16` and `fp16` are exclusive", "`lr_scheduler` must be one of", "`lora_dropout`",
                   "effective_batch_size=10 is not divisible by world_size=2 x micro_batch_size=4 = 8: set "
                   "effective_batch_size to 8 or 16, or micro_batch_size to 1"):
        assert needle in text


def test_nan_is_refused_where_a_range_is_checked():
    for name in ("max_memory_gib", "learning_rate", "weight_decay", "max_grad_norm"):
        with pytest.raises(ConfigError, match=f"`{name}` must be"):
            cfg(**{name: float("nan")}).validate()


@pytest.mark.parametrize(("kw", "says"), [
    ({"init_lora_weights": "eva"}, "initialize_lora_eva_weights over the data, a pass lora_sft does not run"),
    ({"init_lora_weights": "corda"}, "preprocess_corda over the data"),
    ({"init_lora_weights": "pissa", "load_in_4bit": True}, "pass load_in_4bit=False / load_in_8bit=False, or "
                                                           "init_lora_weights='olora'"),
    ({"init_lora_weights": "loftq", "loftq_config": {"loftq_bits": 4}}, "needs scipy"),
    ({"init_lora_weights": "olora", "sharding": "fsdp"}, "which sharded ranks other than 0 do not load"),
])
def test_inits_peft_would_not_honour_are_refused_with_the_reason(kw, says, monkeypatch):
    """eva and corda without their data pass train as plain LoRA; PiSSA on a quantized base, LoftQ without scipy
    and PiSSA/OLoRA on the empty (meta) model of a sharded rank fail inside PEFT with a traceback after the model
    has loaded."""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "scipy" else find_spec(name, *a))
    with pytest.raises(ConfigError, match=re.escape(says)):
        cfg(**kw).validate()


def test_callbacks_may_be_a_tuple():
    cfg(callbacks=(object(),)).validate()
    cfg(callbacks=()).validate()


def test_a_batch_smaller_than_one_pass_gets_one_suggestion():
    with pytest.raises(ConfigError) as e:
        cfg(effective_batch_size=2, micro_batch_size=4).validate()
    assert "set effective_batch_size to 4, or micro_batch_size to 2" in str(e.value)


def test_wrong_types_are_named():
    with pytest.raises(ConfigError, match=r"`lora_r` must be int, got '8' \(str\)"):
        cfg(lora_r="8").validate()


def test_batch_plan_derives_accumulation():
    from lora_runtime.batching import fixed_plan

    plan = fixed_plan(cfg(effective_batch_size=8, micro_batch_size=2), 1)
    assert (plan.micro, plan.accumulation, plan.effective) == (2, 4, 8)
    plan = fixed_plan(cfg(micro_batch_size=4, gradient_accumulation_steps=2), 2)
    assert (plan.micro, plan.accumulation, plan.effective) == (4, 2, 16)
    with pytest.raises(ConfigError, match="drop one of the two"):
        cfg(effective_batch_size=8, micro_batch_size=2, gradient_accumulation_steps=2).validate(world_size=1)


def test_to_from_dict_round_trip_without_callbacks():
    c = cfg(target_modules=["q_proj", "v_proj"], rank_pattern={"q_proj": 4}, callbacks=[object()])
    d = c.to_dict()
    assert "callbacks" not in d and d["target_modules"] == ["q_proj", "v_proj"]
    assert LoraSftConfig.from_dict(json.loads(json.dumps(d))) == dataclasses.replace(c, callbacks=None)


def test_unknown_and_ignored_keys_are_refused_by_name():
    with pytest.raises(ConfigError) as e:
        LoraSftConfig.from_dict({"model_path": "m", "data_path": "d", "ckpt_output_dir": "o", "lora_rank": 8,
                                 "max_tokens_per_gpu": 4096, "checkpoint_at_epoch": True})
    text = str(e.value)
    assert "unknown parameter `lora_rank`; did you mean `lora_r`?" in text
    assert "`max_tokens_per_gpu` is accepted but ignored by training-hub" in text and "micro_batch_size" in text
    assert "`checkpoint_at_epoch`" in text and "save_steps" in text


def test_none_means_the_default_as_in_training_hub(monkeypatch):
    """A script forwarding argparse's unset options (None) gets the defaults; save_total_limit=None keeps every
    checkpoint, and the required paths stay required."""
    import lora_runtime.api

    monkeypatch.setattr(lora_runtime.api, "run", lambda config: config)
    unset = {f.name: None for f in dataclasses.fields(LoraSftConfig)
             if f.name not in ("model_path", "data_path", "ckpt_output_dir", "callbacks")}
    got = lora_sft("m", "d", "o", **unset)
    assert dataclasses.replace(got, save_total_limit=3) == LoraSftConfig("m", "d", "o") and got.save_total_limit is None
    with pytest.raises(ConfigError, match="model_path"):
        lora_sft(None, "d", "o").validate()


def test_lora_sft_rejects_unknown_kwargs_before_doing_anything(tmp_path):
    with pytest.raises(ConfigError, match="save_samples"):
        lora_sft("no-model", "no-data", str(tmp_path / "out"), save_samples=100)
    assert not (tmp_path / "out").exists()


def test_lora_sft_reports_all_config_problems_before_loading(tmp_path):
    with pytest.raises(ConfigError) as e:
        lora_sft("no-model", "no-data", str(tmp_path), lora_r=0, bf16=True, fp16=True)
    assert len(e.value.issues) == 2


def test_lora_sft_refuses_what_a_cpu_cannot_honour_before_any_data_or_model(tmp_path, monkeypatch):
    """Issue 18.4 through the Python API: every CUDA-only option at once, from the config alone (the data path and
    the model do not even exist)."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(ConfigError) as e:
        lora_sft("no-model", "no-data.jsonl", str(tmp_path / "o"), load_in_4bit=True, flash_attention=True,
                 backend="unsloth", enable_model_splitting=True)
    names = sorted(i.split("`")[1] for i in e.value.issues)
    assert names == ["backend", "enable_model_splitting", "flash_attention", "load_in_4bit"], e.value.issues
    assert all("needs CUDA" in i for i in e.value.issues)
    with pytest.raises(ConfigError, match=r"`load_in_8bit`=True needs CUDA"):
        lora_sft("no-model", "no-data.jsonl", str(tmp_path / "o"), load_in_8bit=True)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(("optim", "says"), [
    ("adamw_8bit", ["needs the bitsandbytes package"]),
    ("paged_adamw_32bit", ["needs CUDA (bitsandbytes' paged optimizer states)", "needs the bitsandbytes package"])])
def test_bitsandbytes_optimizers_are_checked_before_any_data_or_model(optim, says, tmp_path, monkeypatch):
    """They failed with transformers' ImportError once the data was prepared and the model loaded."""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else find_spec(name, *a))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(ConfigError) as e:
        lora_sft("no-model", "no-data.jsonl", str(tmp_path / "o"), optim=optim)
    assert len(e.value.issues) == len(says) and all(any(s in i for i in e.value.issues) for s in says)


def test_multi_process_settings_without_torchrun_are_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ConfigError, match="not started by torchrun: run `lora-cli train"):
        lora_sft("no-model", "no-data", str(tmp_path), nproc_per_node=2)
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ConfigError, match="WORLD_SIZE=4 processes but the config asks for 2"):
        lora_sft("no-model", "no-data", str(tmp_path), nproc_per_node=2, effective_batch_size=8)


def test_model_splitting_under_torchrun_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr("lora_runtime.preflight.cuda_available", lambda: True)  # on a CPU it is refused earlier
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="from ONE process, but torchrun started 2"):
        lora_sft("no-model", "no-data", str(tmp_path), enable_model_splitting=True)
    assert not any(tmp_path.iterdir())


@pytest.fixture
def no_torchrun(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize(("visible", "procs"), [(4, 4), (0, 1)])
def test_nproc_per_node_auto_is_every_visible_gpu_and_at_least_one(no_torchrun, monkeypatch, visible, procs):
    monkeypatch.setattr(distributed, "visible_gpus", lambda: visible)
    c = cfg(nproc_per_node="auto", effective_batch_size=4 * procs, micro_batch_size=2).validate()
    assert (c.nproc_per_node, c.world_size(), c.to_dict()["nproc_per_node"]) == (procs, procs, procs)
    assert distributed.auto_nproc_per_node() == (procs, "4 visible GPUs" if visible else "no GPU visible: one process")


def test_nproc_per_node_auto_under_torchrun_is_what_it_started_on_this_node(monkeypatch):
    monkeypatch.setattr(distributed, "visible_gpus", lambda: pytest.fail("counted GPUs under torchrun"))
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    c = cfg(nproc_per_node="auto", nnodes=2, rdzv_endpoint="node0:29400").validate()
    assert c.nproc_per_node == 2 and distributed.check_launch(c).world_size == 4
    assert distributed.auto_nproc_per_node() == (2, "torchrun started 2 processes on this node")


def test_nproc_per_node_auto_without_torchrun_on_four_gpus_asks_for_it(no_torchrun, monkeypatch, tmp_path):
    monkeypatch.setattr(distributed, "visible_gpus", lambda: 4)
    with pytest.raises(ConfigError, match="nproc_per_node=4 x nnodes=1 asks for 4 processes, but this process was "
                       r"not started by torchrun: .* `torchrun --nproc-per-node 4 --nnodes 1 your_script.py`"):
        lora_sft("no-model", "no-data", str(tmp_path), nproc_per_node="auto")


@pytest.mark.parametrize("value", ["all", "AUTO", "-4", 0])
def test_nproc_per_node_is_a_positive_number_or_auto(value):
    with pytest.raises(ConfigError) as e:
        cfg(nproc_per_node=value).validate()
    assert e.value.issues == [f"`nproc_per_node` must be > 0, 'auto' or None, got {value!r}"]


def test_config_construction_imports_torch_only_to_count_gpus():
    """"auto" with CUDA_VISIBLE_DEVICES="" (no GPU) and a number without it settle the count without torch."""
    code = ("import os, sys; from lora_runtime import LoraSftConfig as C; C('m', 'd', 'o', nproc_per_node=2); "
            "os.environ['CUDA_VISIBLE_DEVICES'] = ''; assert C('m', 'd', 'o', nproc_per_node='auto').nproc_per_node "
            "== 1; assert 'torch' not in sys.modules, 'torch imported'")
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "RANK", "WORLD_SIZE")}
    subprocess.run([sys.executable, "-c", code], env=env, check=True)


@pytest.mark.parametrize(("model_config", "limit"), [
    ({"max_position_embeddings": 1024}, 1024),
    ({"n_positions": 512}, 512),
    ({"max_position_embeddings": 512, "text_config": {"max_position_embeddings": 4096}}, 4096),  # the text model's
    ({"max_position_embeddings": 32768, "rope_scaling": {"type": "yarn", "factor": 4.0,
                                                         "original_max_position_embeddings": 32768}}, 131072),
    ({"max_position_embeddings": 131072, "rope_parameters": {"rope_type": "llama3", "factor": 32.0,  # Llama-3.2
                                                             "original_max_position_embeddings": 8192}}, 131072),
    ({"max_position_embeddings": 131072, "rope_scaling": {"rope_type": "llama3", "factor": 8.0,  # Llama-3.1
                                                          "original_max_position_embeddings": 8192}}, 131072),
    ({"max_position_embeddings": 131072, "rope_scaling": {"rope_type": "linear", "factor": 8.0}}, 131072),  # Gemma-3
    ({"max_position_embeddings": 4096, "rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                                        "original_max_position_embeddings": 4096},
      "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}}, 16384),
    ({}, None),
])
def test_the_models_positions_come_from_its_config(tmp_path, model_config, limit):
    from lora_runtime.preflight import model_positions

    (tmp_path / "config.json").write_text(json.dumps(model_config))
    assert model_positions(str(tmp_path)) == limit
    assert model_positions("org/not-in-the-cache") is None  # nothing is fetched


def test_records_past_the_models_positions_are_named(tmp_path):
    from lora_runtime.preflight import position_note

    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 1024}))
    raw = LoraSftConfig(str(tmp_path), "d.jsonl", "out", max_seq_len=4096)
    assert position_note(raw, [1024, 17, 900]) is None  # rows of 4096 whose records all fit: positions restart
    note = position_note(raw, [1025, 17, 3000, 900])
    assert note.startswith("2 record(s) of d.jsonl are longer than the 1,024 positions") and "longest 3,000" in note
    assert "pass max_seq_len=1024" in note


def test_lora_sft_warns_before_training_when_records_pass_the_models_positions(tmp_path, tiny_llama_dir,
                                                                              llama_shards, monkeypatch, capsys):
    import lora_runtime.loop
    from lora_data import ShardReader

    longest = int(ShardReader(llama_shards).sample_lengths().max())
    model = tmp_path / "model"
    model.mkdir()
    for f in tiny_llama_dir.iterdir():
        if f.is_file() and f.name != "config.json":
            (model / f.name).symlink_to(f)
    model_config = json.loads((tiny_llama_dir / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**model_config, "max_position_embeddings": longest - 1}))

    def stop(*args, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(lora_runtime.loop, "train", stop)
    with pytest.raises(KeyboardInterrupt):
        lora_sft(str(model), str(llama_shards), str(tmp_path / "out"), backend="peft", max_steps=1)
    out = capsys.readouterr().out
    assert f"are longer than the {longest - 1:,} positions {model} was trained for" in out
    assert f"prepare the data again with max_seq_len={longest - 1}" in out  # shards: max_seq_len is theirs


@pytest.mark.parametrize(("given", "targets"), [
    ({}, []), ({"wandb_run_name": "r"}, ["wandb"]), ({"wandb_entity": "team"}, ["wandb"]),
    ({"wandb_project": "p"}, ["wandb"]), ({"mlflow_run_name": "r"}, ["mlflow"]),
    ({"mlflow_experiment_name": "e"}, ["mlflow"]), ({"tensorboard_log_dir": "tb"}, ["tensorboard"])])
def test_any_parameter_of_an_integration_turns_it_on(given, targets, monkeypatch):
    """As training-hub decides report_to: a wandb or mlflow run name alone reports there (it was ignored)."""
    from lora_runtime.metrics import report_targets

    for name in ("WANDB_PROJECT", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    assert report_targets(LoraSftConfig("m", "d", "o", **given)) == targets


def test_training_hubs_looser_types_are_read_as_it_reads_them():
    """Scripts written for training-hub pass a whole float for an int, an int rendezvous id, a number of processes
    as a string, and backend as the 4th positional argument."""
    got = LoraSftConfig("m", "d", "o", num_epochs=2.0, max_seq_len=1024.0, rdzv_id=123, nproc_per_node="1")
    assert (got.num_epochs, got.max_seq_len, got.rdzv_id, got.nproc_per_node) == (2, 1024, "123", 1)
    assert isinstance(got.num_epochs, int) and got.validate() is got
    with pytest.raises(ConfigError, match=r"`num_epochs` must be int, got 1\.5"):
        LoraSftConfig("m", "d", "o", num_epochs=1.5).validate()
    assert inspect.signature(lora_sft).bind("m", "d", "o", "peft").arguments["backend"] == "peft"


def test_a_run_recorded_with_a_tilde_path_resumes_with_it_expanded(tmp_path, monkeypatch):
    """~ is expanded when the config is built; a checkpoint written before recorded it as typed."""
    from types import SimpleNamespace

    from lora_runtime.checkpoint import check_resume

    monkeypatch.setenv("HOME", str(tmp_path))
    ckpt = tmp_path / "checkpoint-4"
    ckpt.mkdir()
    recorded = cfg(chat_template="~/t.jinja", data_output_dir="~/cache").to_dict()
    recorded.update(chat_template="~/t.jinja", data_output_dir="~/cache")  # as an older version wrote them
    (ckpt / "lora_sft_config.json").write_text(json.dumps(recorded))
    now = cfg(chat_template="~/t.jinja", data_output_dir="~/cache")
    assert now.chat_template == f"{tmp_path}/t.jinja"
    dataset = SimpleNamespace(reader=SimpleNamespace(manifest=None))
    assert check_resume(ckpt, now, SimpleNamespace(effective=8), dataset) == []


def test_tf32_on_a_cpu_says_it_is_ignored(capsys, monkeypatch):
    import torch
    from lora_runtime.loop import decide_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert decide_precision(cfg(tf32=True, bf16=False)) == "fp32"
    assert "tf32=True applies to CUDA matmuls; this run is on the CPU, which has no TF32: ignored" in capsys.readouterr().out
    decide_precision(cfg(tf32=False, bf16=False))
    assert "tf32" not in capsys.readouterr().out


def test_rank_and_world_size_left_in_the_environment_without_torchrun_are_one_config_error(monkeypatch):
    """Was a ValueError traceback from torch.distributed (MASTER_ADDR expected but not set)."""
    from lora_runtime.distributed import init_process_group

    for name in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="MASTER_ADDR and MASTER_PORT not: this process was not started by torchrun"):
        init_process_group()


def test_a_rank_waiting_for_ranks_that_never_come_says_so_and_a_stop_ends_it(tmp_path):
    """RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT all left in a shell: torch waited its whole timeout (30 minutes
    on gloo) without a word. The rank says what it waits for, and a Ctrl-C ends the wait."""
    import signal
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHELASTIC")} | {
        "RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "CUDA_VISIBLE_DEVICES": ""}
    code = "import lora_runtime.distributed as d; d.JOIN_NOTE_S = 1.0; d.init_process_group()"
    # SIGINT as a terminal's process has it (a suite run as a background job passes it on ignored)
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        line = proc.stderr.readline()  # blocks until the note (or the end of the process)
        assert line.startswith("[lora_runtime] rank 0 of 2 still waits for the other ranks at 127.0.0.1:"), line
        assert "come from the environment, not from torchrun" in line and "stop this (Ctrl-C), unset them" in line
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == -signal.SIGINT
        assert time.monotonic() - t0 < 30
    finally:
        proc.kill()
        proc.communicate()
