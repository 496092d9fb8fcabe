"""Issue 18.5: an Alpaca file with the default dataset_type ("chat_template") trains as Alpaca when every record is
Alpaca, saying so; otherwise the run fails once, with the first rejection naming dataset_type="alpaca"."""

from __future__ import annotations

import _tiny
import pytest
from click.testing import CliRunner
from lora_data import DataError
from lora_runtime import LoraSftConfig
from lora_runtime.data import ensure_shards

ALPACA = [{"instruction": f"Name the number {i}.", "input": "" if i % 2 else f"hint {i}", "output": f"It is {i}."}
          for i in range(12)]


def _config(model, data, tmp_path, **kw):
    return LoraSftConfig(str(model), str(data), str(tmp_path / "o"), max_seq_len=128,
                         data_output_dir=str(tmp_path / "cache"), **kw)


def test_an_alpaca_file_under_the_default_dataset_type_is_prepared_as_alpaca(tmp_path, tiny_llama_dir, capsys):
    data = _tiny.write_jsonl(tmp_path / "alpaca.jsonl", [ALPACA[0], "", "not json", *ALPACA[1:]])
    _, shards = ensure_shards(_config(tiny_llama_dir, data, tmp_path))
    assert shards.manifest.dataset_format == "alpaca"
    assert shards.manifest.counts["valid"] == 12 and shards.manifest.counts["rejected"] == 1  # the non-JSON line
    assert "training it as dataset_type='alpaca'" in capsys.readouterr().out


def test_a_chat_file_is_untouched_and_an_explicit_dataset_type_is_never_second_guessed(tmp_path, tiny_llama_dir,
                                                                                        capsys):
    chat = _tiny.write_jsonl(tmp_path / "chat.jsonl", _tiny.chat_records(6, seed=4))
    assert ensure_shards(_config(tiny_llama_dir, chat, tmp_path))[1].manifest.dataset_format == "messages"
    assert "dataset_type='alpaca'" not in capsys.readouterr().out
    with pytest.raises(DataError, match=r"chat\.jsonl:1 \(instruction\): missing required field \(a chat record: "
                                        r"\"messages\" key; .*dataset_type=\"chat_template\"\)"):
        ensure_shards(_config(tiny_llama_dir, chat, tmp_path, dataset_type="alpaca"))


def test_a_file_not_alpaca_throughout_fails_once_suggesting_alpaca(tmp_path, tiny_llama_dir):
    """One record with neither format's keys makes the file ambiguous: no guess, and no trainable record left, so
    one error whose first rejection says which dataset_type the other lines want."""
    data = _tiny.write_jsonl(tmp_path / "mixed.jsonl", [*ALPACA[:3], {"text": "a bare text record"}])
    with pytest.raises(DataError, match=r"no trainable record in .*4 line\(s\) rejected; the first, .*mixed\.jsonl:1 "
                                        r"\(messages\): missing required field \(an Alpaca record: .*"
                                        r"dataset_type=\"alpaca\"\)") as e:
        ensure_shards(_config(tiny_llama_dir, data, tmp_path))
    assert str(e.value).count("dataset_type") == 1


def test_lora_cli_train_on_an_alpaca_file_trains(tmp_path, tiny_llama_dir, monkeypatch):
    from lora_cli.main import main

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    data = _tiny.write_jsonl(tmp_path / "alpaca.jsonl", ALPACA)
    res = CliRunner().invoke(main, ["train", "--model", str(tiny_llama_dir), "--data", str(data), "--output",
                                    str(tmp_path / "o"), "--backend", "peft", "--max-steps", "1", "--max-seq-len",
                                    "128", "--micro-batch-size", "2", "--no-bf16", "--data-output-dir",
                                    str(tmp_path / "cache")])
    assert res.exit_code == 0, res.output
    assert "training it as dataset_type='alpaca'" in res.output
    assert (tmp_path / "o" / "adapter_model.safetensors").is_file()
