"""Issue 17.5: `merge` of a final adapter torn by a kill during the final save (which comes before its seal,
adapter_checksums.json): one `error:` line naming the torn file and what to merge instead, exit 1, nothing written
at --out."""

from __future__ import annotations

import shutil

import _tiny
import pytest
from click.testing import CliRunner
from lora_cli.main import main
from lora_runtime.checkpoint import ADAPTER_SUMS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_llama_dir):
    """A run of 2 steps with a checkpoint after each, and its sealed final adapter."""
    from lora_runtime.api import lora_sft

    tmp = tmp_path_factory.mktemp("torn")
    data = _tiny.write_jsonl(tmp / "chat.jsonl", _tiny.chat_records(24, seed=1))
    lora_sft(str(tiny_llama_dir), str(data), str(tmp / "run"), backend="peft", max_steps=2, save_steps=1,
             micro_batch_size=2, max_seq_len=128, bf16=False, data_output_dir=str(tmp / "cache"))
    return tmp / "run"


def _truncate_weights(run):
    f = run / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return f


def _drop_config(run):
    f = run / "adapter_config.json"
    f.unlink()
    return f


@pytest.mark.parametrize("tear", [_truncate_weights, _drop_config], ids=["truncated-weights", "no-config"])
def test_merge_of_a_torn_final_adapter_is_one_error_line_naming_what_to_merge_instead(tear, finished_run, tmp_path,
                                                                                      tiny_llama_dir):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / ADAPTER_SUMS).unlink()  # a kill during the final save comes before the seal
    torn = tear(run)
    out = tmp_path / "merged"
    res = CliRunner().invoke(main, ["merge", str(run), "--model", str(tiny_llama_dir), "--out", str(out)])
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output and res.output.count("\n") == 1, res.output
    (line,) = res.output.splitlines()
    newest = run / "checkpoints" / "checkpoint-2"
    assert line.startswith(f"error: {torn}: ") and f"merge the newest complete checkpoint instead ({newest})" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # nothing at --out, no staging dir beside it

    res = CliRunner().invoke(main, ["merge", str(newest), "--model", str(tiny_llama_dir), "--out", str(out)])
    assert res.exit_code == 0 and (out / "model.safetensors").is_file(), res.output  # what the error said works


def test_an_adapter_config_edited_by_hand_names_the_way_to_accept_it(finished_run, tmp_path):
    """A base path fixed in adapter_config.json after the model moved: the seal refused the adapter as 'truncated or
    replaced; restore it from a backup', with no word of the way out (PEFT loads the edited adapter fine). A torn
    weights file keeps the plain advice."""
    import json

    from lora_runtime.checkpoint import check_adapter
    from lora_runtime.errors import CheckpointError

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    config = json.loads((run / "adapter_config.json").read_text())
    (run / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "/models/moved"}))
    with pytest.raises(CheckpointError) as e:
        check_adapter(run)
    assert f"if you edited it yourself, remove {run / ADAPTER_SUMS} to take the adapter as it is now; else restore " \
           "it from a backup" in str(e.value), str(e.value)
    (run / ADAPTER_SUMS).unlink()
    check_adapter(run)  # whole files without a seal: accepted
    shutil.copytree(finished_run, tmp_path / "torn")
    _truncate_weights(tmp_path / "torn")
    with pytest.raises(CheckpointError) as e:
        check_adapter(tmp_path / "torn")
    assert "edited it yourself" not in str(e.value)
