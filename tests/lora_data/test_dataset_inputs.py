"""Inputs beside JSONL: .jsonl.gz, and through `datasets` a save_to_disk folder, parquet, CSV; rejects give the row."""

from __future__ import annotations

import gzip
import json

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


def test_a_plain_directory_is_still_refused(tmp_path, chatml_tokenizer_dir):
    (tmp_path / "d").mkdir()
    with pytest.raises(lora_data.DataError, match="is a directory; pass JSONL files or a folder written by"):
        lora_data.prepare(tmp_path / "d", tmp_path / "o", chatml_tokenizer_dir, max_seq_len=SEQ)
