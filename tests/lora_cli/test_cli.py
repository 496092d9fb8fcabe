"""`lora-cli` through click's runner: exit codes, one-line errors, --config merging, --dry-run, the torchrun guard."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from types import SimpleNamespace

import lora_runtime
import pytest
from click.testing import CliRunner
from lora_cli import launch
from lora_cli.main import main

BASE = ["train", "--model", "m", "--data", "d.jsonl", "--output", "out"]


def run(args, **kw):
    return CliRunner().invoke(main, args, catch_exceptions=False, **kw)


@pytest.fixture
def fake_sft(monkeypatch, tmp_path):
    """Replace the runtime's front door with a recorder (the CLI's plumbing is under test here, not training)."""
    calls = []

    def run(config):
        calls.append({**config.to_dict(), "callbacks": config.callbacks})
        return SimpleNamespace(adapter_dir=config.ckpt_output_dir, merged_dir=None, metrics_path="m.jsonl",
                               backend="peft", steps=3, final_loss=1.25)

    monkeypatch.setattr(lora_runtime, "run", run)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    return calls


def test_help_lists_every_command():
    res = run(["--help"])
    assert res.exit_code == 0
    for name in ("prepare", "inspect", "train", "merge", "demo"):
        assert name in res.output


def test_train_passes_options_to_lora_sft(fake_sft):
    res = run([*BASE, "--lora-r", "8", "--no-bf16", "--target-modules", "q_proj,v_proj"])
    assert res.exit_code == 0, res.output
    (kw,) = fake_sft
    assert (kw["model_path"], kw["data_path"], kw["ckpt_output_dir"]) == ("m", "d.jsonl", "out")
    assert (kw["lora_r"], kw["bf16"], kw["target_modules"]) == (8, False, ["q_proj", "v_proj"])
    assert kw["lora_alpha"] == 32 and len(kw["callbacks"]) == 1  # defaults, plus save-on-signal (the runtime draws the bar)
    assert "backend:  peft, 3 steps, final loss 1.2500" in res.output


def test_config_file_with_command_line_override(fake_sft, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model_path: from-file\nlora_r: 8\nlora_alpha: 16\nlearning_rate: 1.0e-4\n")
    res = run(["train", "--config", str(cfg), "--data", "d.jsonl", "--output", "o", "--lora-r", "4"])
    assert res.exit_code == 0, res.output
    (kw,) = fake_sft
    assert (kw["model_path"], kw["lora_r"], kw["lora_alpha"], kw["learning_rate"]) == ("from-file", 4, 16, 1e-4)
    # an optional value the file sets, cleared on the command line (was "'none' is not a valid integer")
    cfg.write_text("model_path: from-file\nmax_steps: 1000\nwarmup_ratio: 0.1\n")
    res = run(["train", "--config", str(cfg), "--data", "d.jsonl", "--output", "o", "--max-steps", "none",
               "--warmup-ratio", "None"])
    assert res.exit_code == 0, res.output
    assert (fake_sft[-1]["max_steps"], fake_sft[-1]["warmup_ratio"]) == (None, None)


@pytest.mark.parametrize(("args", "message"), [
    (["train", "--data", "d", "--output", "o"], "missing --model"),
    ([*BASE, "--bogus"], "No such option '--bogus'"),
    ([*BASE, "--lora-r", "x"], "'x' is not a valid integer"),
    ([*BASE, "--shards", "s"], "--shards and --data are two spellings"),
    (["merge", "adapter"], "Missing option '--model'"),
])
def test_usage_errors_exit_2(args, message):
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2, res.output
    assert message in res.output


def test_bad_values_exit_1_with_one_line_each_and_no_traceback():
    res = CliRunner().invoke(main, [*BASE, "--lora-alpha", "0", "--lora-dropout", "1.5", "--dry-run"])
    assert res.exit_code == 1
    assert res.output.splitlines() == ["error: --lora-alpha must be > 0, got 0.0",
                                       "error: --lora-dropout must be in [0, 1), got 1.5"]


def test_debug_shows_the_traceback():
    res = CliRunner().invoke(main, ["--debug", *BASE, "--lora-alpha", "0", "--dry-run"])
    assert res.exit_code == 1
    assert "Traceback (most recent call last)" in res.output and "ConfigError" in res.output


@pytest.mark.parametrize("command", ["prepare", "chat"])
def test_debug_goes_after_every_command(command, tmp_path):
    """`train --debug` worked, `prepare --debug` and `chat --debug` were usage errors."""
    args = {"prepare": [str(tmp_path / "nope.jsonl"), str(tmp_path / "o"), "--tokenizer", "t", "--max-seq-len", "64"],
            "chat": [str(tmp_path)]}[command]
    res = CliRunner().invoke(main, [command, *args, "--debug"])
    assert res.exit_code == 1 and "Traceback (most recent call last)" in res.output, res.output


def test_config_file_errors_name_file_and_line_or_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lora_r: 8\nlora_alpha: [16\n")
    res = CliRunner().invoke(main, [*BASE, "--config", str(bad)])
    assert res.exit_code == 1 and f"error: {bad}: cannot parse" in res.output and "line 3" in res.output
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("lora_rank: 8\n")
    res = CliRunner().invoke(main, [*BASE, "--config", str(unknown)])
    assert res.exit_code == 1 and res.output == f"error: {unknown}:1: unknown parameter lora_rank; did you mean lora_r?\n"
    res = CliRunner().invoke(main, [*BASE, "--config", str(tmp_path / "nope.yaml")])
    assert res.exit_code == 1 and "nope.yaml: no such file" in res.output


def test_a_config_file_reads_as_a_user_means_it(fake_sft, tmp_path, monkeypatch):
    """The command line's names as keys; `off` a string (YAML 1.1 read a bool); a name, or [all-linear], as
    target_modules (PEFT read the str as a regex matching nothing); ~ expanded (transformers expanded it in the
    checkpoints' path only, so outputs and checkpoints parted); a byte-order mark skipped."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home" / "m").mkdir(parents=True)
    (tmp_path / "home" / "m" / "config.json").write_text("{}")
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model: ~/m\ndata: d.jsonl\noutput: ~/out\nselective_recompute: off\ntarget_modules: q_proj\n"
                   "bf16: no\nsample_packing: yes\n")
    assert run(["train", "--config", str(cfg)]).exit_code == 0
    Path("s").mkdir()  # in the test's own working directory
    Path("s", "manifest.json").write_text("{}")
    toml = tmp_path / "run.toml"
    toml.write_text('\ufeffmodel = "m"\nshards = "s"\noutput = "o"\ntarget_modules = ["all-linear"]\n', encoding="utf-8")
    assert run(["train", "--config", str(toml)]).exit_code == 0
    yaml_run, toml_run = fake_sft
    home = str(tmp_path / "home")
    assert (yaml_run["model_path"], yaml_run["ckpt_output_dir"]) == (f"{home}/m", f"{home}/out")
    assert (yaml_run["selective_recompute"], yaml_run["target_modules"]) == ("off", ["q_proj"])
    assert (yaml_run["bf16"], yaml_run["sample_packing"]) == (False, True)  # YAML 1.1's words, where a bool is meant
    assert (toml_run["data_path"], toml_run["target_modules"]) == ("s", "all-linear")


@pytest.mark.parametrize(("text", "says"), [
    ("lora_r: 4\nlora_alpha: 8\nlora_r: 16\n", "{f}:1: lora_r is set again on line 3; keep one"),
    ("lora_r: 4\nlora-r: 16\n", "{f}:2: lora_r is set twice (lora_r and lora-r); keep one"),
    ("lora_r: 4\n\udcff\n", "{f}: not UTF-8 text (byte 10: b'\\xff'); save it as UTF-8"),
])
def test_a_config_file_that_says_two_things_or_is_not_text_is_one_error(text, says, tmp_path):
    f = tmp_path / "run.yaml"
    f.write_bytes(text.encode("utf-8", "surrogateescape"))
    res = CliRunner().invoke(main, [*BASE, "--config", str(f)])
    assert res.exit_code == 1 and res.output == f"error: {says.format(f=f)}\n", res.output


def test_a_toml_key_after_a_pattern_table_is_named(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text("lora_r = 8\n[rank_pattern]\nq_proj = 4\nlearning_rate = 1e-4\nlora-alpha = 64\n")
    res = CliRunner().invoke(main, [*BASE, "--config", str(f), "--dry-run"])
    assert res.exit_code == 1 and "holds learning_rate, lora-alpha, which are options, not module names" in res.output


def test_values_that_failed_after_the_model_loaded_are_refused_by_name():
    res = CliRunner().invoke(main, [*BASE, "--adam-beta1", "1.5", "--seed", "-1", "--rank-pattern", '{"q_proj": "4"}',
                                    "--dry-run"])
    assert res.exit_code == 1 and res.output.splitlines() == [
        "error: --rank-pattern['q_proj'] must be a number > 0, got '4' (str)",
        "error: --adam-beta1 must be in [0, 1), got 1.5", "error: --seed must be in [0, 2**32), got -1"], res.output


def test_dry_run_checks_that_the_data_is_there(tmp_path):
    """--dry-run passed a data path that did not exist; the real run then failed on it."""
    res = CliRunner().invoke(main, ["train", "--model", "m", "--data", "nope.jsonl", "--eval-data-path", str(tmp_path),
                                    "--output", "o", "--dry-run"])
    assert res.exit_code == 1 and res.output.splitlines() == [
        "error: --data=nope.jsonl does not exist",
        f"error: --eval-data-path={tmp_path} is a directory without manifest.json; pass a JSONL file, or a directory "
        "made by `lora-cli prepare`"], res.output


def test_paths_from_a_config_file_are_named_by_its_line(tmp_path):
    """They were named as the command line's --model and --data, which the user did not type."""
    f = tmp_path / "run.yaml"
    f.write_text("output: o\ndata_path: nope.jsonl\n")
    res = CliRunner().invoke(main, ["train", "--config", str(f), "--model", "m"])
    assert res.exit_code == 1 and res.output == f"error: {f}:2: data_path=nope.jsonl does not exist\n", res.output
    f.write_text("output: o\ndata: d.jsonl\nmodel: ./no-model\n")
    res = CliRunner().invoke(main, ["train", "--config", str(f)])
    assert res.exit_code == 1 and res.output == f"error: {f}:3: model_path ./no-model: no such directory\n", res.output


def test_shards_dir_without_manifest_is_a_user_error(tmp_path):
    res = CliRunner().invoke(main, ["train", "--model", "m", "--shards", str(tmp_path), "--output", "o"])
    assert res.exit_code == 1
    assert f"--shards {tmp_path}: no manifest.json there" in res.output


def test_too_many_gpus_on_a_cpu_machine(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    real = launch.check_devices
    monkeypatch.setattr(launch, "check_devices", lambda n, backend: real(n, backend, visible=0))
    res = CliRunner().invoke(main, [*BASE, "--gpus", "4"])
    assert res.exit_code == 1
    assert "--gpus 4 asks for 4 GPUs but 0 GPU(s) are visible" in res.output and "--backend peft" in res.output


def test_dry_run_prints_the_multi_node_torchrun_command(monkeypatch):
    monkeypatch.setattr(launch, "visible_gpus", lambda: 8)
    res = run([*BASE, "--gpus", "8", "--nnodes", "2", "--node-rank", "1", "--rdzv-endpoint", "node0:29400",
               "--effective-batch-size", "256", "--micro-batch-size", "2", "--rank-pattern", '{"q_proj": 4}', "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "batch: micro 2 × 16 processes × accumulation 8 = effective 256 rows/step" in res.output
    cmd = shlex.split(res.output.split("would run: ", 1)[1].splitlines()[0])
    assert cmd[1:17] == ["-m", "lora_cli.torchrun", "--nproc-per-node", "8", "--nnodes", "2", "--node-rank", "1",
                         "--rdzv-backend", "c10d", "--rdzv-endpoint", "node0:29400", "--rdzv-id", "lora-cli", "-m",
                         "lora_cli"]
    assert "--dry-run" not in cmd and cmd[cmd.index("--nproc-per-node", 5) + 1] == "8"
    assert json.loads(cmd[cmd.index("--rank-pattern") + 1]) == {"q_proj": 4}  # quoted as a shell reads it
    config = json.loads(res.output.split("batch:")[0])
    assert config["nnodes"] == 2 and config["effective_batch_size"] == 256


@pytest.mark.parametrize(("visible", "why"), [(4, "4 visible GPUs"), (0, "no GPU visible: one process")])
def test_dry_run_with_gpus_auto_takes_every_visible_gpu(monkeypatch, caplog, visible, why):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(launch, "visible_gpus", lambda: visible)
    with caplog.at_level("INFO", logger="lora_cli"):
        res = run([*BASE, "--gpus", "auto", "--effective-batch-size", "8", "--micro-batch-size", "2", "--dry-run"])
    assert res.exit_code == 0, res.output
    assert f"--gpus auto: {why}" in caplog.text
    procs = max(visible, 1)
    assert json.loads(res.output.split("batch:")[0])["nproc_per_node"] == procs
    assert f"batch: micro 2 × {procs} process" in res.output
    if visible:  # the workers get --gpus auto too, and resolve it to torchrun's LOCAL_WORLD_SIZE
        cmd = shlex.split(res.output.split("would run: ", 1)[1].splitlines()[0])
        assert cmd[3:5] == ["--nproc-per-node", "4"] and cmd[cmd.index("--nproc-per-node", 5) + 1] == "auto"
    else:
        assert "would train in this process" in res.output and "would run: " not in res.output


def test_under_torchrun_trains_in_process_instead_of_launching_again(fake_sft, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(launch, "run_torchrun", lambda *a: pytest.fail("launched a second torchrun"))
    res = run([*BASE, "--gpus", "2", "--backend", "peft"])
    assert res.exit_code == 0, res.output
    assert len(fake_sft) == 1 and fake_sft[0]["nproc_per_node"] == 2
    assert "adapter:" not in res.output  # only rank 0 reports


@pytest.mark.parametrize(("rank", "local_rank", "error", "printed"), [
    ("0", "0", "nonfinite", "error: training stopped at step 5"),
    ("1", "1", "nonfinite", ""),
    ("2", "0", "nonfinite", "error: training stopped at step 5"),  # the second node's first worker
    ("1", "1", "oom", "error: rank 1: out of memory in training step 1"),
])
def test_a_worker_names_its_rank_and_one_worker_a_node_prints_what_every_rank_raises(monkeypatch, rank, local_rank,
                                                                                      error, printed):
    """Two nodes of two workers each."""
    from lora_runtime.errors import NonFiniteLossError, OutOfMemoryHint

    raised = {"nonfinite": NonFiniteLossError("training stopped at step 5: gradient norm nan"),
              "oom": OutOfMemoryHint("out of memory in training step 1")}[error]

    def fail(config):
        raise raised

    monkeypatch.setattr(lora_runtime, "run", fail)
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    monkeypatch.setenv("WORLD_SIZE", "4")
    res = run([*BASE, "--gpus", "2", "--nnodes", "2", "--rdzv-endpoint", "node0:29400", "--backend", "peft"])
    assert res.exit_code == 1
    errors = [line for line in res.output.splitlines() if "error" in line]
    assert len(errors) == (1 if printed else 0) and all(line.startswith(printed) for line in errors), res.output


def test_launch_path_hands_the_typed_options_to_torchrun(fake_sft, monkeypatch):
    seen = {}

    def fake_run(plan, args, device, output_dir):
        seen.update(plan=plan, args=args, device=device, output_dir=output_dir)
        return 0

    monkeypatch.setattr(launch, "run_torchrun", fake_run)
    monkeypatch.setattr(launch, "check_devices", lambda n, backend: "cpu")
    res = run([*BASE, "--gpus", "2", "--backend", "peft", "--lora-r", "4"])
    assert res.exit_code == 0, res.output
    assert not fake_sft
    assert seen["plan"] == launch.LaunchPlan(2)
    assert seen["args"] == ["--model-path", "m", "--data-path", "d.jsonl", "--ckpt-output-dir", "out", "--backend",
                            "peft", "--lora-r", "4", "--nproc-per-node", "2"]


def test_merge_help_names_the_run_directory_where_train_writes_the_adapter():
    """`lora-cli train --output DIR` writes the adapter into DIR itself, so merge takes DIR (not DIR/adapter)."""
    out = run(["merge", "--help"], terminal_width=200).output
    assert "ADAPTER_DIR is a run's output directory (where `lora-cli train` wrote the adapter)" in out
    assert "/adapter" not in out


def test_merge_refuses_a_dir_without_adapter(tmp_path):
    res = CliRunner().invoke(main, ["merge", str(tmp_path), "--model", "m", "--out", str(tmp_path / "merged")])
    assert res.exit_code == 1 and "no adapter_config.json there" in res.output


def test_demo_refuses_to_delete_a_foreign_directory(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    res = CliRunner().invoke(main, ["demo", "--out", str(tmp_path)])
    assert res.exit_code == 1 and "was not made by `lora-cli demo`" in res.output
    assert (tmp_path / "precious.txt").exists()


def test_model_path_is_checked_before_anything_loads(tmp_path):
    res = CliRunner().invoke(main, ["train", "--model", str(tmp_path / "nope"), "--data", "d", "--output", "o"])
    assert res.exit_code == 1 and res.output == f"error: --model {tmp_path / 'nope'}: no such directory\n"
    res = CliRunner().invoke(main, ["train", "--model", str(tmp_path), "--data", "d", "--output", "o"])
    assert res.exit_code == 1 and "no config.json there" in res.output


def test_errors_from_loading_are_one_line(fake_sft, monkeypatch):
    def broken(config):
        raise OSError("Can't load tokenizer for 'm'.\nMake sure that:\n- 'm' is a correct model identifier")

    monkeypatch.setattr(lora_runtime, "run", broken)
    res = CliRunner().invoke(main, BASE)
    assert res.exit_code == 1
    assert res.output == ("error: Can't load tokenizer for 'm'. Make sure that: - 'm' is a correct model "
                          "identifier\n")


@pytest.mark.parametrize("error", ["checkpoint", "oom"])
def test_runtime_errors_with_a_fix_are_one_line_exit_1(monkeypatch, error):
    from lora_runtime.errors import CheckpointError, OutOfMemoryHint

    exc = {"checkpoint": CheckpointError("out/checkpoints holds checkpoint-40 and resume=False: pass --resume or "
                                         "another --output"),
           "oom": OutOfMemoryHint("out of memory in training step 4. Lower micro_batch_size (now 8)")}[error]

    def run(config):
        raise exc

    monkeypatch.setattr(lora_runtime, "run", run)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    res = CliRunner().invoke(main, BASE)
    assert res.exit_code == 1, res.output
    assert res.output.strip().splitlines()[-1] == f"error: {exc}" and "Traceback" not in res.output


def test_options_the_shards_were_prepared_with_are_theirs_unless_asked_for_otherwise(fake_sft, tmp_path, monkeypatch):
    """A shard dir fixed its row length, masking, packing and overlong policy when it was prepared. Asked for (typed,
    or in --config) with another value, refused: lora_sft cannot tell an asked-for value from its default, and
    trained as prepared (a typed --no-train-on-inputs over shards prepared with --train-on-inputs trained on the
    prompts, silently). Not asked for, they are left to lora_sft (which trains as prepared, and records the call's
    values beside the shards' for a resume to compare); --dry-run says what the shards decide."""
    import _tiny

    _tiny.write_shards(tmp_path / "shards", [([1, 2, 3], [0, 1, 1], [3])], seq_len=8, packing=False,
                       options={"train_on_inputs": True, "overlong": "truncate"})
    base = ["train", "--model", "m", "--shards", str(tmp_path / "shards"), "--output", str(tmp_path / "o")]
    prepared = {"max_seq_len": 8, "sample_packing": False, "train_on_inputs": True, "overlong": "truncate"}
    res = run(base)
    assert res.exit_code == 0, res.output
    assert {k: fake_sft[-1][k] for k in prepared} == {"max_seq_len": 2048, "sample_packing": True,
                                                      "train_on_inputs": False, "overlong": "drop"}  # lora_sft defers
    assert (f"data: the shards in {tmp_path / 'shards'} were prepared with max_seq_len=8, sample_packing=False, "
            "train_on_inputs=True, overlong='truncate': training as prepared") in run([*base, "--dry-run"]).output
    assert run([*base, "--max-seq-len", "8", "--train-on-inputs"]).exit_code == 0
    calls = len(fake_sft)
    (tmp_path / "c.yaml").write_text("max_seq_len: 2048\n")
    (tmp_path / "d.yaml").write_text("train_on_inputs: false\n")
    for asked, want in ((["--max-seq-len", "2048"], "max_seq_len=2048"),
                        (["--config", str(tmp_path / "c.yaml")], "max_seq_len=2048"),
                        (["--no-train-on-inputs"], "train_on_inputs=False"),
                        (["--config", str(tmp_path / "d.yaml")], "train_on_inputs=False"),
                        (["--sample-packing"], "sample_packing=True"),
                        (["--overlong", "drop"], "overlong='drop'")):
        res = run([*base, *asked])
        assert res.exit_code == 1 and len(fake_sft) == calls, res.output
        name, _, value = want.partition("=")
        assert (f"{value}, but the shards in {tmp_path / 'shards'} were prepared with {name}="
                f"{prepared[name]!r}: leave it out") in res.output, res.output
    monkeypatch.setenv("HOME", str(tmp_path))  # a path under ~ (a YAML file's `data_path: ~/shards`) is checked too
    res = run(["train", "--model", "m", "--data", "~/shards", "--output", str(tmp_path / "o"), "--no-train-on-inputs"])
    assert res.exit_code == 1 and "--train-on-inputs=False, but the shards in" in res.output, res.output


def test_merge_never_deletes_a_directory_it_did_not_write(tmp_path):
    adapter = tmp_path / "run"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text("{}")
    for out, why in ((adapter, "would replace the adapter directory"), (tmp_path, "would replace the adapter"),
                     (tmp_path / "mine", "was not written by a merge")):
        res = CliRunner().invoke(main, ["merge", str(adapter), "--model", str(tmp_path / "base"), "--out", str(out)])
        assert res.exit_code == 1 and why in res.output, res.output
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me" and (adapter / "adapter_config.json").is_file()
