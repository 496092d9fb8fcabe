"""Issue 18.4: problems are found with the config, before any data is prepared or a model is loaded, all at once;
config-file problems are named by the file's key and line; --dry-run refuses what the launch refuses."""

from __future__ import annotations

import lora_runtime
import pytest
from click.testing import CliRunner
from lora_cli import launch
from lora_cli.main import main


@pytest.fixture
def no_training(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(lora_runtime, "run", lambda cfg: pytest.fail("reached lora_runtime.run: validation missed it"))


def invoke(args):
    return CliRunner().invoke(main, args)


def test_cuda_only_options_on_a_cpu_are_all_refused_at_once(no_training, tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    res = invoke(["train", "--model", "m", "--data", "d.jsonl", "--output", str(tmp_path / "o"), "--load-in-4bit",
                  "--flash-attention", "--backend", "unsloth", "--enable-model-splitting"])
    lines = res.output.splitlines()
    assert res.exit_code == 1 and all(line.startswith("error: ") for line in lines), res.output
    for option in ("--load-in-4bit", "--flash-attention", "--backend", "--enable-model-splitting"):
        assert any(line.startswith(f"error: {option}=") and "needs CUDA" in line for line in lines), (option, lines)
    assert len(lines) == 4 and "Traceback" not in res.output
    res = invoke(["train", "--model", "m", "--data", "d.jsonl", "--output", "o", "--load-in-8bit", "--dry-run"])
    assert res.exit_code == 1 and "error: --load-in-8bit=True needs CUDA (bitsandbytes 8-bit)" in res.output


def test_mlflow_without_its_package(no_training, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    res = invoke(["train", "--model", "m", "--data", "d.jsonl", "--output", "o", "--mlflow-tracking-uri",
                  "file:///tmp/mlruns", "--dry-run"])
    assert res.exit_code == 1
    assert res.output.startswith("error: --mlflow-tracking-uri asks for mlflow logging but the mlflow package is not "
                                 "installed"), res.output


def test_target_modules_the_model_lacks_is_one_line(no_training, tiny_llama_dir):
    res = invoke(["train", "--model", str(tiny_llama_dir), "--data", "d.jsonl", "--output", "o", "--target-modules",
                  "q_proj,query_key_value", "--dry-run"])
    assert res.exit_code == 1 and len(res.output.splitlines()) == 1, res.output
    assert "error: --target-modules names 'query_key_value', which" in res.output
    assert "its linear layers are down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj" in res.output
    ok = invoke(["train", "--model", str(tiny_llama_dir), "--data", "d.jsonl", "--output", "o", "--target-modules",
                 "q_proj,v_proj", "--dry-run"])
    assert ok.exit_code == 0, ok.output


def test_target_modules_naming_a_block_or_a_norm_is_one_line(no_training, tiny_llama_dir):
    """`mlp` (meaning its projections), `self_attn` or `norm` passed validation and --dry-run, then PEFT refused the
    module with a 60-line traceback after the data was prepared and the model loaded."""
    args = ["train", "--model", str(tiny_llama_dir), "--data", "d.jsonl", "--output", "o", "--dry-run"]
    for target, said in (("mlp", "a block of layers (down_proj, gate_proj, up_proj), which LoRA cannot adapt: name "
                                 "the layers themselves (down_proj, gate_proj, up_proj)"),
                         ("q_proj,self_attn", "a block of layers (k_proj, o_proj, q_proj, v_proj)"),
                         ("norm", "not a layer with a weight matrix (a norm, an activation), which LoRA cannot adapt")):
        res = invoke([*args, "--target-modules", target])
        assert res.exit_code == 1 and len(res.output.splitlines()) == 1, res.output
        assert res.output.startswith(f"error: --target-modules {target.split(',')[-1]!r} matches model.") and said in \
            res.output, res.output


def test_a_quantized_checkpoints_layers_are_layers(tmp_path):
    """GPTQ/AWQ checkpoints store a layer's matrix as `qweight`: q_proj was taken for 'not a layer with a weight
    matrix'. A block is still one."""
    import torch
    from lora_runtime.preflight import _target_issues
    from safetensors.torch import save_file

    layer = "model.layers.0.self_attn"
    save_file({f"{layer}.q_proj.qweight": torch.zeros(4, 8, dtype=torch.int32),
               f"{layer}.q_proj.scales": torch.zeros(1, 8), f"{layer}.q_proj.bias": torch.zeros(8),
               "model.norm.weight": torch.zeros(8), "model.layers.1.mixer.A_log": torch.zeros(8, 4),
               "model.layers.1.mixer.in_proj.weight": torch.zeros(8, 8),
               "model.layers.2.experts.gate_up_proj": torch.zeros(2, 8, 16)}, str(tmp_path / "model.safetensors"))
    assert _target_issues(("q_proj", "in_proj"), tmp_path) == []
    (issue,) = _target_issues(("self_attn",), tmp_path)
    assert f"matches {layer} in {tmp_path}, a block of layers" in issue, issue
    # a Mamba mixer's 2-D A_log and fused experts' 3-D parameters make no layer of their module
    mixer, experts = _target_issues(("mixer", "experts"), tmp_path)
    assert "a block of layers (in_proj)" in mixer and "not a layer with a weight matrix" in experts, (mixer, experts)


def test_options_that_would_do_nothing_are_named(no_training, tiny_llama_dir):
    """Accepted and silently without effect before: eval settings without eval data, a LoftQ config without LoftQ,
    rank/alpha pattern keys matching no module (a typo trained every module at the default, PEFT only warned)."""
    args = ["train", "--model", str(tiny_llama_dir), "--data", "d.jsonl", "--output", "o", "--dry-run"]
    res = invoke([*args, "--eval-steps", "5", "--per-device-eval-batch-size", "2", "--loftq-config",
                  '{"loftq_bits": 4}', "--rank-pattern", '{"q_prj": 4, "layers.0.self_attn.k_proj": 2}',
                  "--alpha-pattern", '{"vproj": 3}'])
    assert res.exit_code == 1, res.output
    assert sorted(res.output.splitlines()) == sorted([
        "error: --eval-steps and --per-device-eval-batch-size apply with eval data only: pass --eval-data-path or "
        "--eval-split-ratio too, or drop them",
        "error: --loftq-config applies with init_lora_weights='loftq' only (it is True): pass that too, or drop it",
        f"error: --rank-pattern key 'q_prj' matches no module of {tiny_llama_dir}; its linear layers are down_proj, "
        "gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj",
        f"error: --alpha-pattern key 'vproj' matches no module of {tiny_llama_dir}; its linear layers are down_proj, "
        "gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"]), res.output
    ok = invoke([*args, "--eval-steps", "5", "--eval-split-ratio", "0.1", "--rank-pattern", '{"q_proj": 4}'])
    assert ok.exit_code == 0, ok.output


def test_the_dry_run_refuses_what_the_run_would(no_training, tiny_llama_dir, tmp_path):
    """Passed by --dry-run, refused a second into the real run: pre-rendered text (passthrough) over raw JSONL, and an
    --output that is a file."""
    data = tmp_path / "d.jsonl"
    data.write_text('{"messages": []}\n')
    base = ["train", "--model", str(tiny_llama_dir), "--data", str(data), "--dry-run"]
    res = invoke([*base, "--output", str(tmp_path / "o"), "--dataset-type", "passthrough"])
    assert res.exit_code == 1 and "dataset_type='passthrough' (pre-rendered text, tokenized by the trainer) is not " \
        "supported" in res.output, res.output
    res = invoke([*base, "--output", str(data)])
    assert res.exit_code == 1 and res.output == f"error: --output={data} is a file, not a directory; pass a " \
        "directory for the run\n", res.output


def test_a_model_with_its_own_code_is_refused_unless_trusted(no_training, tiny_llama_dir, tmp_path):
    import json
    import shutil

    model = tmp_path / "remote"
    shutil.copytree(tiny_llama_dir, model)
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "auto_map": {"AutoModelForCausalLM": "m.MyModel"}}))
    args = ["train", "--model", str(model), "--data", "d.jsonl", "--output", "o", "--dry-run"]
    res = invoke(args)
    assert res.exit_code == 1 and "config.json has auto_map" in res.output and "set --trust-remote-code to True" in res.output
    assert invoke([*args, "--trust-remote-code"]).exit_code == 0


def test_config_file_problems_are_named_by_key_and_line_all_at_once(no_training, tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text("model_path: m\nlora_r: 0\nlearning_rate: -1.0\ncallbacks: [x]\nlora_rank: 4\n")
    res = invoke(["train", "--config", str(run), "--data", "d.jsonl", "--output", "o", "--lora-alpha", "0"])
    assert res.exit_code == 1, res.output
    assert sorted(res.output.splitlines()) == sorted([
        f"error: {run}:2: lora_r must be > 0, got 0",
        f"error: {run}:3: learning_rate must be > 0, got -1.0",
        f"error: {run}:4: callbacks holds live Python objects (transformers TrainerCallbacks), which a config file "
        "cannot: pass callbacks=[...] to lora_runtime.lora_sft() in Python, or drop the key",
        f"error: {run}:5: unknown parameter lora_rank; did you mean lora_r?",
        "error: --lora-alpha must be > 0, got 0.0",
    ])


def test_toml_keys_have_lines_too(no_training, tmp_path):
    run = tmp_path / "run.toml"
    run.write_text('model_path = "m"\n\n"lora-dropout" = 2.0\n')
    res = invoke(["train", "--config", str(run), "--data", "d.jsonl", "--output", "o", "--dry-run"])
    assert res.output == f"error: {run}:3: lora_dropout must be in [0, 1), got 2.0\n"


def test_a_yaml_alias_bomb_is_refused_quickly(no_training, tmp_path):
    import time

    bomb = tmp_path / "bomb.yaml"
    levels = ['a0: &a0 ["x","x","x","x","x","x","x","x","x","x"]'] + [
        f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    bomb.write_text("\n".join(levels) + "\n")
    t0 = time.monotonic()
    res = invoke(["train", "--config", str(bomb), "--model", "m", "--data", "d.jsonl", "--output", "o", "--dry-run"])
    assert time.monotonic() - t0 < 10
    assert res.exit_code == 1 and "more than 100,000 values once its aliases" in res.output, res.output


def test_dry_run_with_gpus_refuses_what_the_launch_refuses(no_training, monkeypatch):
    monkeypatch.setattr(launch, "visible_gpus", lambda: 0)
    res = invoke(["train", "--model", "m", "--data", "d.jsonl", "--output", "o", "--gpus", "2", "--dry-run"])
    assert res.exit_code == 1 and "error: --gpus 2 asks for 2 GPUs but 0 GPU(s) are visible" in res.output
    res = invoke(["train", "--model", "m", "--data", "d.jsonl", "--output", "o", "--gpus", "2", "--backend", "peft",
                  "--dry-run"])
    assert res.exit_code == 0 and "would run: " in res.output


def test_a_suggested_torchrun_command_never_says_none(tmp_path, monkeypatch):
    from lora_runtime import ConfigError, LoraSftConfig
    from lora_runtime.distributed import check_launch

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ConfigError) as e:
        check_launch(LoraSftConfig("m", "d", str(tmp_path), nnodes=2, rdzv_endpoint="h:1"))
    assert "None" not in str(e.value) and "torchrun --nproc-per-node 1 --nnodes 2 your_script.py" in str(e.value)


def test_errors_name_options_as_help_lists_them(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    res = invoke(["train", "--model", str(tiny_llama_dir), "--data", str(tmp_path / "nope.jsonl"), "--output",
                  str(tmp_path / "o"), "--backend", "peft", "--no-bf16"])
    assert res.exit_code == 1 and res.output == f"error: --data={tmp_path / 'nope.jsonl'} does not exist\n", res.output
