"""Inputs beside JSONL: .jsonl.gz, and through `datasets` a save_to_disk folder, parquet, CSV; rejects give the row."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys

import _tiny
import lora_data
import pytest
from click.testing import CliRunner
from lora_data.cli import cli

datasets = pytest.importorskip("datasets", reason="the optional `datasets` extra is not installed")

SEQ = 96
BAD_ROW = 4  # 1-based: a record with a wrong role


@pytest.fixture(scope="module")
def records():
    recs = _tiny.chat_records(40, seed=11)
    recs[BAD_ROW - 1] = {"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]}
    return recs


@pytest.fixture(scope="module")
def reference(records, tmp_path_factory, chatml_tokenizer_dir):
    root = tmp_path_factory.mktemp("ref")
    m = lora_data.prepare(_tiny.write_jsonl(root / "d.jsonl", records), root / "out", chatml_tokenizer_dir,
                          max_seq_len=SEQ, verbose=False)
    return m, (root / "out" / "rejects.jsonl").read_text()


def _same_as_reference(path, out, tok, reference):
    m = lora_data.prepare(path, out, tok, max_seq_len=SEQ, verbose=False)
    want, want_rejects = reference
    assert m.counts == want.counts and [s["sha256"] for s in m.shards] == [s["sha256"] for s in want.shards]
    got = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
    want = [json.loads(x) for x in want_rejects.splitlines()]
    assert [(r["line"], r["code"], r["field"]) for r in got] == [(r["line"], r["code"], r["field"]) for r in want]
    assert (BAD_ROW, "bad_role", "messages[0].role") in [(r["line"], r["code"], r["field"]) for r in got]
    assert {r["source"] for r in got} == {str(path)}
    assert lora_data.cache_key(path, tok, max_seq_len=SEQ) == m.cache_key  # the runtime would reuse these shards
    return m


def test_a_save_to_disk_folder_and_parquet_give_the_jsonl_shards(records, reference, tmp_path, chatml_tokenizer_dir):
    ds = datasets.Dataset.from_list(records)
    ds.save_to_disk(str(tmp_path / "saved"))
    ds.to_parquet(str(tmp_path / "d.parquet"))
    _same_as_reference(tmp_path / "saved", tmp_path / "o1", chatml_tokenizer_dir, reference)
    _same_as_reference(tmp_path / "d.parquet", tmp_path / "o2", chatml_tokenizer_dir, reference)
    datasets.DatasetDict({"train": ds, "test": ds.select(range(3))}).save_to_disk(str(tmp_path / "dict"))
    _same_as_reference(tmp_path / "dict", tmp_path / "o3", chatml_tokenizer_dir, reference)  # its train split


def test_jsonl_gz_gives_the_jsonl_shards(records, reference, tmp_path, chatml_tokenizer_dir):
    path = tmp_path / "d.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    _same_as_reference(path, tmp_path / "o", chatml_tokenizer_dir, reference)
    (tmp_path / "bad.jsonl.gz").write_bytes(path.read_bytes()[:-20])  # truncated
    res = CliRunner().invoke(cli, ["prepare", str(tmp_path / "bad.jsonl.gz"), str(tmp_path / "o2"), "--tokenizer",
                                   str(chatml_tokenizer_dir), "--max-seq-len", str(SEQ)])
    assert res.exit_code == 1 and res.output.startswith(f"error: {tmp_path / 'bad.jsonl.gz'}: not a readable gzip"), \
        res.output


def test_an_alpaca_csv_with_empty_input_cells(tmp_path, chatml_tokenizer_dir):
    path = tmp_path / "a.csv"
    path.write_text("instruction,input,output\nAdd,2+2,4\nSay hi,,Hello!\n,x,y\n")
    res = CliRunner().invoke(cli, ["prepare", str(path), str(tmp_path / "o"), "--tokenizer", str(chatml_tokenizer_dir),
                                   "--max-seq-len", str(SEQ)])
    assert res.exit_code == 0, res.output
    m = lora_data.Manifest.load(tmp_path / "o")
    assert m.counts["valid"] == 2 and m.dataset_format == "alpaca"
    (reject,) = [json.loads(x) for x in (tmp_path / "o" / "rejects.jsonl").read_text().splitlines()]
    assert reject["line"] == 3 and reject["field"] == "instruction"  # row 3: its instruction cell is empty


def test_a_csv_cell_is_the_text_it_holds(tmp_path, chatml_tokenizer_dir):
    """pandas read "NA" / "None" / "null" / "N/A" as missing (the input vanished from the prompt, or the output was
    "missing") and "4" as a number (every row rejected as not a string)."""
    path = tmp_path / "a.csv"
    path.write_text("instruction,input,output\nTranslate,NA,Not available\nEcho,None,None\nAdd,2+2,4\nSay hi,,Hi\n")
    lora_data.prepare(path, tmp_path / "o", chatml_tokenizer_dir, max_seq_len=SEQ, verbose=False)
    reader = lora_data.ShardReader(tmp_path / "o")
    assert reader.manifest.counts["valid"] == 4 and not (tmp_path / "o" / "rejects.jsonl").read_text()
    from transformers import AutoTokenizer

    text = AutoTokenizer.from_pretrained(chatml_tokenizer_dir).decode(
        [int(t) for i in range(len(reader)) for t in reader[i].input_ids])
    for kept in ("Translate\n\nNA", "Echo\n\nNone", "assistant\nNone", "assistant\n4", "user\nSay hi<|im_end|>"):
        assert kept in text, kept


def test_a_csv_header_naming_a_column_twice_is_refused(tmp_path, chatml_tokenizer_dir):
    path = tmp_path / "a.csv"
    path.write_text("instruction,output,output\nAdd,4,5\n")
    with pytest.raises(lora_data.DataError, match="the header names column\\(s\\) 'output' twice"):
        lora_data.prepare(path, tmp_path / "o", chatml_tokenizer_dir, max_seq_len=SEQ, verbose=False)


def test_a_struct_field_some_messages_lack_is_absent_in_the_others(tmp_path, chatml_tokenizer_dir):
    """Arrow gives every message every field some message has (null where it has none): a template testing
    `message.name is defined` wrote `name=None` into every other message's header."""
    tok = tmp_path / "tok"
    import shutil

    from transformers import AutoTokenizer

    shutil.copytree(chatml_tokenizer_dir, tok)
    t = AutoTokenizer.from_pretrained(tok)
    t.chat_template = ("{% for m in messages %}<|im_start|>{{ m.role }}{% if m.name is defined %} name={{ m.name }}"
                       "{% endif %}\n{{ m.content }}<|im_end|>\n{% endfor %}")
    t.save_pretrained(tok)
    rows = [{"messages": [{"role": "user", "content": "hi", "name": "bob"}, {"role": "assistant", "content": "yes"}]},
            {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "ok"}]}]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    lora_data.prepare(tmp_path / "d.parquet", tmp_path / "o", tok, max_seq_len=SEQ, verbose=False)
    reader = lora_data.ShardReader(tmp_path / "o")
    text = t.decode([int(x) for i in range(len(reader)) for x in reader[i].input_ids])
    assert text.count("name=") == 1 and "user name=bob" in text and "None" not in text


def test_a_plain_directory_is_still_refused(tmp_path, chatml_tokenizer_dir):
    (tmp_path / "d").mkdir()
    with pytest.raises(lora_data.DataError, match="is a directory; pass JSONL files or a folder written by"):
        lora_data.prepare(tmp_path / "d", tmp_path / "o", chatml_tokenizer_dir, max_seq_len=SEQ)


HUB_NAME = "some-org/some-dataset"


def test_a_hub_dataset_name_streams_through_load_dataset(records, reference, tmp_path, chatml_tokenizer_dir,
                                                         monkeypatch):
    calls = []

    def load_dataset(name, config=None, **kwargs):
        calls.append((name, config, kwargs))
        return datasets.Dataset.from_list(records)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.chdir(tmp_path)  # no local some-org/ folder: the name is the hub's
    res = CliRunner().invoke(cli, ["prepare", HUB_NAME, "out", "--tokenizer", str(chatml_tokenizer_dir),
                                   "--max-seq-len", str(SEQ), "--data-split", "validation", "--data-config", "chat"])
    assert res.exit_code == 0, res.output
    assert calls == [(HUB_NAME, "chat", {"split": "validation", "streaming": True})]
    m, want = lora_data.Manifest.load(tmp_path / "out"), reference[0]
    assert m.counts == want.counts and [s["sha256"] for s in m.shards] == [s["sha256"] for s in want.shards]
    assert (m.sources[0]["path"], m.sources[0]["split"], m.sources[0]["config"]) == (HUB_NAME, "validation", "chat")
    got = [json.loads(x) for x in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    want_rejects = [json.loads(x) for x in reference[1].splitlines()]
    assert [(r["line"], r["code"]) for r in got] == [(r["line"], r["code"]) for r in want_rejects]
    assert (HUB_NAME, BAD_ROW, "messages[0].role") in [(r["source"], r["line"], r["field"]) for r in got]
    assert lora_data.is_hub_dataset(HUB_NAME)
    key = lora_data.cache_key(HUB_NAME, chatml_tokenizer_dir, max_seq_len=SEQ, data_split="validation",
                              data_config="chat")
    assert key == m.cache_key


def test_a_local_path_shaped_like_a_hub_name_stays_local(records, reference, tmp_path, chatml_tokenizer_dir,
                                                         monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "some-org").mkdir()
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / HUB_NAME))
    assert not lora_data.is_hub_dataset(HUB_NAME)
    _same_as_reference(tmp_path / HUB_NAME, tmp_path / "o", chatml_tokenizer_dir, reference)


def test_data_split_picks_a_saved_dataset_dicts_split(records, tmp_path, chatml_tokenizer_dir):
    ds = datasets.Dataset.from_list(records)
    datasets.DatasetDict({"train": ds, "test": ds.select(range(10, 15))}).save_to_disk(str(tmp_path / "dict"))
    m = lora_data.prepare(tmp_path / "dict", tmp_path / "o", chatml_tokenizer_dir, max_seq_len=SEQ, verbose=False,
                          data_split="test")
    assert m.counts["lines_read"] == 5 and m.sources[0]["split"] == "test"
    assert lora_data.cache_key(tmp_path / "dict", chatml_tokenizer_dir, max_seq_len=SEQ, data_split="test") == m.cache_key
    with pytest.raises(lora_data.DataError, match="no split 'dev'; its splits: train, test"):
        lora_data.prepare(tmp_path / "dict", tmp_path / "o2", chatml_tokenizer_dir, max_seq_len=SEQ, data_split="dev")


def test_a_hub_dataset_offline_is_one_error_line(tmp_path, chatml_tokenizer_dir):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "lora_data.cli", "prepare", HUB_NAME, "out", "--tokenizer",
                           str(chatml_tokenizer_dir), "--max-seq-len", str(SEQ)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"error: {HUB_NAME}: cannot load the hub dataset (split 'train') (HF_HUB_OFFLINE is set"), line
    assert not (tmp_path / "out" / "manifest.json").exists()
