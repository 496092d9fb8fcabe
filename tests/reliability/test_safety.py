"""Safety: no model code runs unless asked (trust_remote_code), weights are safetensors, a pickle in a checkpoint is
refused (torch.load weights_only), manifest paths stay inside the shard directory. (Secrets: test_crash.py.)"""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

import _tiny
import pytest
from lora_data import ShardError, ShardReader

PACKAGES = Path(__file__).parents[2] / "packages"


@pytest.mark.slow  # trains (the session's trials)
def test_trust_remote_code_is_off_unless_asked(trials, counts):
    from lora_runtime import lora_sft
    from lora_runtime.config import LoraSftConfig

    assert LoraSftConfig("m", "d", "o").trust_remote_code is False
    assert inspect.signature(lora_sft).parameters["trust_remote_code"].default is False
    a = trials["remote-code"]["attempts"][0]
    assert a["exit"] not in (0, None) and "trust_remote_code" in a["log"], a["log"][-3000:]
    assert not (Path(trials["root"]) / "REMOTE_CODE_RAN").exists(), "the model dir's code was imported"
    counts.add("remote_code_refused")


def test_no_loader_hard_codes_trust_remote_code():
    """Every from_pretrained either passes the config's value or leaves transformers' default (False)."""
    for path in PACKAGES.glob("*/src/**/*.py"):
        assert not re.search(r"trust_remote_code\s*=\s*True", path.read_text()), path


@pytest.mark.slow  # trains (the session's trials)
def test_weights_are_written_as_safetensors_only(trials):
    out = Path(trials["reference"]["out"])
    top = {p.name for p in out.iterdir() if p.is_file()}
    assert "adapter_model.safetensors" in top
    assert not [n for n in top if n.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle"))], top
    for ckpt in (out / "checkpoints").iterdir():  # optimizer/scheduler/rng are torch.save files, read weights_only
        assert (ckpt / "adapter_model.safetensors").is_file() and not (ckpt / "adapter_model.bin").exists()


@pytest.mark.slow  # trains (the session's trials)
def test_a_pickle_in_a_checkpoint_is_refused_and_never_runs(trials, counts):
    stop, resume = trials["pickle"]["attempts"]
    assert stop["exit"] == 130
    assert resume["exit"] not in (0, None), resume["log"][-3000:]
    assert "Weights only load failed" in resume["log"], resume["log"][-3000:]
    assert not (Path(trials["root"]) / "PICKLE_RAN").exists(), "unpickling ran the payload"
    counts.add("pickle_checkpoints_refused")


def test_no_unsafe_deserialization_in_our_code():
    """Our packages never unpickle: no pickle.load(s), and any torch.load says weights_only=True."""
    for path in PACKAGES.glob("*/src/**/*.py"):
        text = path.read_text()
        assert not re.search(r"\bpickle\.loads?\(|\bdill\b|\bjoblib\.load", text), path
        for call in re.findall(r"torch\.load\((.*?)\)", text, flags=re.S):
            assert "weights_only=True" in call, f"{path}: torch.load({call})"


@pytest.fixture
def shard_dir(tmp_path) -> Path:
    return _tiny.write_shards(tmp_path / "shards", [([1 + i, 2, 3], [0, 1, 1], [3]) for i in range(4)], seq_len=8,
                              rows_per_shard=2)


ESCAPES = ["../shard-00000.bin", "/etc/passwd", "sub/shard-00000.bin", "..", ".", "", "shard-00000.bin/../../x",
           "~/shard.bin", "..\\..\\x", "shard\x00.bin", "shard\n.bin", "-rf", None, 7, {"a": 1}]


@pytest.mark.parametrize("name", ESCAPES, ids=[repr(n) for n in ESCAPES])
def test_manifest_shard_paths_cannot_escape_the_directory(shard_dir, name, counts):
    path = shard_dir / "manifest.json"
    data = json.loads(path.read_text())
    data["shards"][1]["file"] = name
    path.write_text(json.dumps(data))
    with pytest.raises(ShardError, match=r"manifest\.json: shards\[1\]\.file: shard name .* is not a plain file"):
        ShardReader(shard_dir)
    counts.add("manifest_escapes_refused")


def test_a_shard_symlinked_out_of_the_directory_is_refused(shard_dir, tmp_path, counts):
    outside = tmp_path / "elsewhere.bin"
    target = shard_dir / "shard-00001.bin"
    outside.write_bytes(target.read_bytes())
    target.unlink()
    target.symlink_to(outside)
    with pytest.raises(ShardError, match=r"shards\[1\]\.file: shard 'shard-00001.bin' is a symlink out of"):
        ShardReader(shard_dir)
    counts.add("manifest_escapes_refused")


def test_credentials_in_config_values_are_redacted_where_configs_are_shown_or_saved(tmp_path, counts):
    """`lora-cli train --dry-run` prints the config; checkpoints and the run dir save it: all through `redacted`."""
    from click.testing import CliRunner
    from lora_cli.main import main
    from lora_runtime.config import redacted

    assert redacted({"mlflow_tracking_uri": "https://me:hunter2@mlflow.example/x", "some_api_key": "k", "n": 1}) == {
        "mlflow_tracking_uri": "https://me:***@mlflow.example/x", "some_api_key": "***", "n": 1}
    res = CliRunner().invoke(main, ["train", "--model", "m", "--data", _data_file(tmp_path), "--output", str(tmp_path),
                                    "--mlflow-tracking-uri", "https://me:hunter2@mlflow.example", "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "hunter2" not in res.output and "https://me:***@mlflow.example" in res.output
    for path in ("lora-runtime/src/lora_runtime/checkpoint.py",):  # run_record: the run dir and every checkpoint
        text = (PACKAGES / path).read_text()
        assert "redacted(config.to_dict())" in text or "redacted(self.run_config.to_dict())" in text, path
    counts.add("secret_redaction_checks")


def test_deleting_the_manifest_checksum_is_an_error_not_no_check(shard_dir, counts):
    """A missing checksum must not switch the integrity check off."""
    path = shard_dir / "manifest.json"
    data = json.loads(path.read_text())
    del data["checksum"]
    path.write_text(json.dumps(data))
    with pytest.raises(ShardError, match=r"manifest\.json: checksum: no checksum"):
        ShardReader(shard_dir)
    counts.add("manifest_checksum_removals_refused")


def test_tokens_in_url_user_info_and_query_strings_are_masked(tmp_path):
    """Issue 17.6: a token as the URL's user (https://TOKEN@host) or in its query string (?token=...) is masked in
    --dry-run and in what a run saves (checkpoint.run_record)."""
    from click.testing import CliRunner
    from lora_cli.main import main
    from lora_runtime import LoraSftConfig
    from lora_runtime.batching import fixed_plan
    from lora_runtime.checkpoint import run_record

    uri = "https://ghp_usertoken@mlflow.example/api?token=qs_secret&user=me"
    res = CliRunner().invoke(main, ["train", "--model", "m", "--data", _data_file(tmp_path), "--output", str(tmp_path),
                                    "--mlflow-tracking-uri", uri, "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "ghp_usertoken" not in res.output and "qs_secret" not in res.output
    assert "https://***@mlflow.example/api?token=***&user=***" in res.output
    cfg = LoraSftConfig("m", "d.jsonl", str(tmp_path), mlflow_tracking_uri=uri, micro_batch_size=2)
    saved = json.dumps(run_record(cfg, fixed_plan(cfg, 1)))
    assert "ghp_usertoken" not in saved and "qs_secret" not in saved


def _data_file(tmp_path) -> str:
    """A data file for --dry-run, which checks that the data is there."""
    (tmp_path / "data").mkdir(exist_ok=True)
    (tmp_path / "data" / "d.jsonl").touch()
    return str(tmp_path / "data" / "d.jsonl")
