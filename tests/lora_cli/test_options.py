"""Options generated from LoraSftConfig: names, types, defaults, help, and the config-file merge."""

from __future__ import annotations

import dataclasses
import inspect

import click
import pytest
from click.testing import CliRunner
from lora_cli.options import (
    ALIASES,
    ConfigFileError,
    cli_field_names,
    config_options,
    load_config_file,
    merge_values,
    passthrough_args,
)
from lora_runtime.config import ConfigError, LoraSftConfig


@click.command()
@config_options
@click.pass_context
def _probe(ctx: click.Context, **params):
    """Echo what the generated options parsed and what a re-invocation would pass on."""
    ctx.obj = {"kw": merge_values(ctx, params, ctx.meta.get("file", {})), "args": passthrough_args(ctx, params)}


def _parse(args: list[str], file_values: dict | None = None) -> dict:
    ctx = _probe.make_context("probe", list(args))
    ctx.meta["file"] = file_values or {}
    with ctx:
        _probe.invoke(ctx)
    return ctx.obj


def test_every_field_but_callbacks_is_an_option_named_after_it():
    fields = [f.name for f in dataclasses.fields(LoraSftConfig)]
    options = {p.name: p for p in _probe.params}
    assert set(fields) - set(options) == {"callbacks"}
    assert set(options) <= set(fields)
    for name, p in options.items():
        assert "--" + name.replace("_", "-") in p.opts + p.secondary_opts, name
    assert cli_field_names() == [n for n in fields if n != "callbacks"]


def test_options_match_lora_sft_signature():
    import lora_runtime

    sig = inspect.signature(lora_runtime.lora_sft)
    params = [n for n, p in sig.parameters.items() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    assert set(params) == {f.name for f in dataclasses.fields(LoraSftConfig)}
    for f in dataclasses.fields(LoraSftConfig):
        if f.default is not dataclasses.MISSING:
            assert sig.parameters[f.name].default == f.default, f.name


def test_help_shows_types_defaults_and_choices():
    out = CliRunner().invoke(_probe, ["--help"], terminal_width=200).output
    assert "--lora-r INTEGER" in out and "LoRA rank  [default: 16]" in out
    assert "--learning-rate FLOAT" in out and "[default: 0.0002]" in out
    assert "--lr-scheduler [linear|cosine|" in out
    assert "--bf16 / --no-bf16" in out and "--gpus, --nproc-per-node INTEGER" in out
    assert "--model, --model-path TEXT" in out


def test_defaults_equal_the_dataclass_defaults():
    kw = _parse(["--model", "m", "--data", "d", "--output", "o"])["kw"]
    cfg = LoraSftConfig(**kw)
    assert cfg == LoraSftConfig("m", "d", "o")


@pytest.mark.parametrize(("args", "field", "value"), [
    (["--lora-r", "8"], "lora_r", 8),
    (["--lora-alpha", "16.5"], "lora_alpha", 16.5),
    (["--no-bf16"], "bf16", False),
    (["--tf32"], "tf32", True),
    ([], "tf32", None),
    (["--target-modules", "q_proj,v_proj"], "target_modules", ("q_proj", "v_proj")),
    (["--target-modules", "q_proj"], "target_modules", ("q_proj",)),
    (["--target-modules", "all-linear"], "target_modules", "all-linear"),
    (["--target-modules", "q_proj, v_proj"], "target_modules", ("q_proj", "v_proj")),
    # a regex, as lora_sft takes it (PEFT matches it against whole module names): was split into "names" at commas
    (["--target-modules", r".*\.(q|v)_proj"], "target_modules", r".*\.(q|v)_proj"),
    (["--target-modules", r"layers\.[0-9]{1,2}\.mlp\.up_proj"], "target_modules", r"layers\.[0-9]{1,2}\.mlp\.up_proj"),
    (["--init-lora-weights", "false"], "init_lora_weights", False),
    (["--init-lora-weights", "pissa"], "init_lora_weights", "pissa"),
    (["--gradient-checkpointing", "True"], "gradient_checkpointing", True),
    (["--rank-pattern", '{"q_proj": 4}'], "rank_pattern", {"q_proj": 4}),
    (["--gpus", "4"], "nproc_per_node", 4),
    (["--nproc-per-node", "4"], "nproc_per_node", 4),
    (["--gpus", "auto"], "nproc_per_node", "auto"),
    (["--bnb-4bit-quant-type", "nf4"], "bnb_4bit_quant_type", "nf4"),
    (["--save-total-limit", "none"], "save_total_limit", None),  # None is a value here: keep every checkpoint
    (["--save-total-limit", "5"], "save_total_limit", 5),
    ([], "save_total_limit", 3),
])
def test_values_parse_into_the_field_type(args, field, value):
    assert _parse(args)["kw"][field] == value


@pytest.mark.parametrize("args", [
    ["--lora-r", "eight"], ["--lr-scheduler", "sideways"], ["--init-lora-weights", "maybe"],
    ["--rank-pattern", "[1, 2]"], ["--rank-pattern", "{bad json"], ["--save-total-limit", "all"],
])
def test_unparsable_values_are_usage_errors_naming_the_option(args):
    res = CliRunner().invoke(_probe, args)
    assert res.exit_code == 2
    assert args[0] in res.output


def test_command_line_beats_file_beats_defaults():
    kw = _parse(["--lora-r", "4"], {"lora_r": 8, "lora_alpha": 16, "model_path": "m"})["kw"]
    assert (kw["lora_r"], kw["lora_alpha"], kw["model_path"], kw["lora_dropout"]) == (4, 16, "m", 0.0)


def test_passthrough_reproduces_only_what_was_typed():
    args = ["--model", "m", "--lora-r", "4", "--no-bf16", "--target-modules", "q_proj,v_proj", "--gpus", "2",
            "--rank-pattern", '{"q_proj": 4}', "--save-total-limit", "none"]
    out = _parse(args)["args"]
    assert out == ["--model-path", "m", "--lora-r", "4", "--target-modules", "q_proj,v_proj", "--rank-pattern",
                   '{"q_proj": 4}', "--no-bf16", "--save-total-limit", "None", "--nproc-per-node", "2"]
    assert _parse(out)["kw"] == _parse(args)["kw"]  # the round trip is lossless


def test_aliases_point_at_real_fields():
    assert set(ALIASES) <= set(cli_field_names())


def test_yaml_and_toml_config_files(tmp_path):
    y = tmp_path / "run.yaml"
    y.write_text("lora-r: 8\ntarget_modules: [q_proj, v_proj]\nlearning_rate: 1.0e-4\n")
    t = tmp_path / "run.toml"
    t.write_text('lora_r = 8\ntarget_modules = ["q_proj", "v_proj"]\nlearning_rate = 1e-4\n')
    expected = {"lora_r": 8, "target_modules": ("q_proj", "v_proj"), "learning_rate": 1e-4}
    assert load_config_file(y) == expected == load_config_file(t)
    y.write_text("learning_rate: 2e-4\nwarmup_ratio: .5E-1\nwandb_run_name: '1e3'\n")
    assert load_config_file(y) == {"learning_rate": 2e-4, "warmup_ratio": 0.05, "wandb_run_name": "1e3"}  # YAML 1.2
    # YAML 1.2's integers: 1.1 read `010` as octal 8 and `1:40` as base-60 100, silently
    y.write_text("lora_r: 010\nsave_steps: 1:40\nmax_seq_len: 0o400\nwarmup_steps: 0x10\nseed: -3\nmax_steps: 1_000\n"
                 "logging_steps: 0x_\nwarmup_ratio: 1:40.5\nlora_dropout: 0.05\nlearning_rate: -.5E-3\n")
    assert load_config_file(y) == {"lora_r": 10, "save_steps": "1:40", "max_seq_len": 256, "warmup_steps": 16,
                                   "seed": -3, "max_steps": 1000, "logging_steps": "0x_", "warmup_ratio": "1:40.5",
                                   "lora_dropout": 0.05, "learning_rate": -0.5e-3}


def test_config_file_unknown_key_names_it_and_suggests(tmp_path):
    y = tmp_path / "run.yaml"
    y.write_text("lora_rank: 8\nmax_tokens_per_gpu: 100\n")
    with pytest.raises(ConfigError) as e:
        load_config_file(y)
    assert "`lora_rank`; did you mean `lora_r`?" in str(e.value)
    assert "max_tokens_per_gpu" in str(e.value)


def test_config_file_parse_error_names_file_and_line(tmp_path):
    y = tmp_path / "run.yaml"
    y.write_text("lora_r: 8\nlora_alpha: [16\n")
    with pytest.raises(ConfigFileError) as e:
        load_config_file(y)
    assert "run.yaml: cannot parse" in str(e.value) and "line 3" in str(e.value)


def test_a_runs_own_record_loads_back_as_a_config_file(tmp_path):
    """`--config OUT/lora_sft_config.json` to repeat or resume a run: its `resolved` block was an unknown parameter.
    The record's top level is the call's settings; those at their defaults were not asked for (over a shard dir, the
    shards decided them: as asked-for values they would be refused where the shards differ)."""
    import json

    record = tmp_path / "lora_sft_config.json"
    record.write_text(json.dumps({"lora_r": 8, "train_on_inputs": False, "overlong": "truncate", "target_modules": None,
                                  "lora_alpha": 32, "sharding": "ddp", "activation_offload": False,
                                  "resolved": {"step": 4, "prepared": {"train_on_inputs": True}}}, indent=1))
    # sharding and activation_offload default to "auto": the record holds what that run decided, decided again here
    assert load_config_file(record) == {"lora_r": 8, "overlong": "truncate"}
