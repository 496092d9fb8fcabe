"""ShardWriter/ShardReader round trip, layout, and every kind of corruption → ShardError naming the file."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from lora_data import Manifest, ManifestError, ShardError, ShardReader, ShardWriter


def _write(d, rows_per_shard=2):
    w = ShardWriter(d, seq_len=5, pad_id=0, rows_per_shard=rows_per_shard)
    w.add_row([4, 5, 6, 9], [0, 1, 1, 1], [3, 1], sample_ids=[0, 7])
    w.add_row([1, 2, 3, 4, 5], [1, 1, 1, 1, 1], [5], sample_ids=[3])
    w.add_row([7, 8], [1, 0], [2], sample_ids=[2])
    infos = w.close()
    Manifest(seq_len=5, pad_id=0, shards=[i.to_dict() for i in infos]).save(d)
    return infos


def test_round_trip_literals(tmp_path):
    infos = _write(tmp_path)
    assert [i.file for i in infos] == ["shard-00000.bin", "shard-00001.bin"]
    assert [i.rows for i in infos] == [2, 1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "shard-00000.bin", "shard-00001.bin"]
    r = ShardReader(tmp_path)
    assert (len(r), r.seq_len, r.pad_id) == (3, 5, 0)
    row = r[0]
    assert row.input_ids.tolist() == [4, 5, 6, 9, 0] and row.input_ids.dtype == np.uint32
    assert row.loss_mask.tolist() == [0, 1, 1, 1, 0] and row.loss_mask.dtype == np.uint8
    assert row.seq_lens.tolist() == [3, 1] and row.sample_ids.tolist() == [0, 7]
    assert r[2].input_ids.tolist() == [7, 8, 0, 0, 0] and r[2].loss_mask.tolist() == [1, 0, 0, 0, 0]
    assert r[-1].sample_ids.tolist() == [2] and r[-3].seq_lens.tolist() == [3, 1]
    assert r.sample_lengths().tolist() == [3, 1, 5, 2]
    with pytest.raises(IndexError):
        r[3]
    with pytest.raises(IndexError):
        r[-4]


def test_the_writer_holds_memory_for_the_rows_it_has_not_for_a_whole_shard(tmp_path):
    """A long-context row length with the default rows_per_shard (4,096 × 16k tokens = 335 MB of buffers) and one
    short record: the writer's memory follows the data. The shard is the same either way."""
    import tracemalloc

    tracemalloc.start()
    w = ShardWriter(tmp_path / "long", seq_len=16384, pad_id=3)
    for i in range(20):
        w.add_row(list(range(1, 18 + i)), [0] * 5 + [1] * (12 + i), seq_lens=[17 + i])
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    infos = w.close()
    assert peak < 16 << 20 and [i.rows for i in infos] == [20]
    Manifest(seq_len=16384, pad_id=3, shards=[i.to_dict() for i in infos]).save(tmp_path / "long")
    first, last = ShardReader(tmp_path / "long")[0], ShardReader(tmp_path / "long")[19]
    assert first.input_ids[:17].tolist() == list(range(1, 18)) and set(first.input_ids[17:].tolist()) == {3}
    assert last.input_ids[:36].tolist() == list(range(1, 37)) and last.loss_mask.sum() == 31


def test_sections_are_64_byte_aligned(tmp_path):
    from lora_data.shards import read_header

    _write(tmp_path)
    h = read_header(tmp_path / "shard-00000.bin")
    assert h["data_start"] % 64 == 0 and all(s["offset"] % 64 == 0 for s in h["sections"])
    assert [s["name"] for s in h["sections"]] == ["input_ids", "loss_mask", "seg_offsets", "seg_lens", "seg_sample"]


@pytest.mark.parametrize("bad", [
    dict(input_ids=[1, 2, 3], loss_mask=[1, 1], seq_lens=[3]),          # shapes differ
    dict(input_ids=[1, 2, 3, 4, 5, 6], loss_mask=[1] * 6, seq_lens=[6]),  # over seq_len
    dict(input_ids=[1, 2], loss_mask=[1, 1], seq_lens=[1]),              # sum(seq_lens) != len
    dict(input_ids=[1, 2], loss_mask=[1, 1], seq_lens=[2, 0]),           # empty segment
    dict(input_ids=[1, 2, 0, 0, 0], loss_mask=[1, 1, 1, 0, 0], seq_lens=[2]),  # mask on padding
])
def test_writer_refuses_bad_rows(tmp_path, bad):
    with pytest.raises(ValueError):
        ShardWriter(tmp_path, seq_len=5, pad_id=0).add_row(**bad)


def test_no_temp_files_left(tmp_path):
    _write(tmp_path)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def _flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("corrupt, fragment", [
    (lambda d: _flip(d / "shard-00001.bin", 200), "sha256"),
    (lambda d: _flip(d / "shard-00000.bin", -1), "sha256"),
    (lambda d: (d / "shard-00000.bin").write_bytes((d / "shard-00000.bin").read_bytes()[:-64]), "truncated"),
    (lambda d: (d / "shard-00001.bin").unlink(), "missing"),
])
def test_corrupt_shard_is_refused(tmp_path, corrupt, fragment):
    _write(tmp_path)
    corrupt(tmp_path)
    with pytest.raises(ShardError, match=fragment) as e:
        ShardReader(tmp_path)
    assert "shard-0000" in str(e.value)


def _edit_manifest(d, fn):
    p = d / "manifest.json"
    data = json.loads(p.read_text())
    fn(data)
    p.write_text(json.dumps(data))


@pytest.mark.parametrize("edit, fragment", [
    (lambda m: m.update(format_version=99), "format version 99"),
    (lambda m: m.update(seq_len=6), "header seq_len=5"),
    (lambda m: m["shards"][0].update(rows=3), "header rows=2"),
    (lambda m: m["shards"][1].update(file="../shard-00001.bin"), "not a plain file name"),
    (lambda m: m["shards"][1].update(file="/etc/passwd"), "not a plain file name"),
    (lambda m: m["shards"][0].update(sha256="0" * 64), "sha256"),
    (lambda m: m.pop("pad_id"), "missing field"),
])
def test_edited_manifest_is_refused(tmp_path, edit, fragment):
    _write(tmp_path)
    _edit_manifest(tmp_path, edit)
    with pytest.raises(ShardError, match=fragment):
        ShardReader(tmp_path)


def test_shard_format_version_is_checked_without_verify(tmp_path):
    _write(tmp_path)
    path = tmp_path / "shard-00000.bin"
    data = bytearray(path.read_bytes())
    data[8] = 7  # version field
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="shard format version 7") as e:
        ShardReader(tmp_path, verify=False)
    assert str(path) in str(e.value)


def test_manifest_errors(tmp_path):
    with pytest.raises(ManifestError, match=r"manifest\.json: not found"):
        ShardReader(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="invalid JSON at line 1"):
        Manifest.load(tmp_path)


def test_import_pulls_in_no_heavy_module():
    code = ("import sys, lora_data; lora_data.ShardReader; lora_data.Manifest; lora_data.tokenizer_fingerprint; "
            "heavy = [m for m in ('polars', 'transformers', 'torch', 'jsonschema', 'tokenizers') if m in sys.modules];"
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
