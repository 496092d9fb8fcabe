"""prepare + the CLI: every kind of bad line, counts, rejects.jsonl, overlong policies, determinism, strict, inspect."""

from __future__ import annotations

import json
import re
import sys

import _tiny
import lora_data
import numpy as np
import pytest
from click.testing import CliRunner
from lora_data import Manifest, ShardError, ShardReader
from lora_data.cli import cli
from lora_data.records import sample_origin
from lora_data.tokenize import render

U = {"role": "user", "content": "What is the capital of France?"}
A = {"role": "assistant", "content": "Paris."}
LONG = {"messages": [U, {"role": "assistant", "content": " ".join(["the capital of france is paris"] * 40)}]}

BAD_FILE_LINES = [  # (line content, expected code or None for valid, expected field)
    (b"\xef\xbb\xbf" + json.dumps({"messages": [U, A]}).encode() + b"\r", None, None),  # BOM + CRLF
    (b"", "blank", None),
    (b'{"messages": [', "invalid_json", None),
    (json.dumps({"messages": [U, {"role": "assistant", "content": 42}]}).encode(), "wrong_type_string_or_null",
     "messages[1].content"),
    (json.dumps({"messages": [{"role": "bot", "content": "x"}, A]}).encode(), "bad_role", "messages[0].role"),
    (json.dumps({"messages": []}).encode(), "empty_messages", "messages"),
    (json.dumps({"messages": [U]}).encode(), "no_assistant", "messages"),
    (json.dumps(LONG).encode(), "overlong_dropped", None),
    (b"   \r", "blank", None),
    (json.dumps({"messages": [U, A, {"role": "user", "content": "a\u2028b"}, A]}, ensure_ascii=False).encode() + b"\r",
     None, None),
    (b"[1, 2]", "not_an_object", None),
]


@pytest.fixture
def bad_file(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(b"\n".join(line for line, _, _ in BAD_FILE_LINES) + b"\n")
    return p


@pytest.fixture(scope="module")
def good_file(tmp_path_factory):
    return _tiny.write_jsonl(tmp_path_factory.mktemp("good") / "good.jsonl", _tiny.chat_records(400, seed=3))


def _run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result


def test_cli_over_every_kind_of_bad_line(bad_file, tmp_path, chatml_tokenizer_dir):
    out = tmp_path / "out"
    result = _run("prepare", bad_file, out, "--tokenizer", chatml_tokenizer_dir, "--max-seq-len", 64)
    assert result.exit_code == 0, result.output
    rejects = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
    want = [(i + 1, code, field) for i, (_, code, field) in enumerate(BAD_FILE_LINES) if code not in (None, "blank")]
    # validation rejects are written as lines stream by; render/overlong ones when their chunk is tokenized
    assert sorted((r["line"], r["code"], r["field"]) for r in rejects) == want
    assert all(r["source"] == str(bad_file) and r["reason"] and r["raw"] for r in rejects)
    assert rejects[0]["raw"] == '{"messages": ['
    c = Manifest.load(out).counts
    assert (c["lines_read"], c["valid"], c["rejected"], c["blank"]) == (11, 3, 6, 2)
    assert c["lines_read"] == c["valid"] + c["rejected"] + c["blank"]
    assert (c["overlong"], c["dropped"], c["samples"]) == (1, 1, 2)
    assert c["rejected_by_reason"] == {"invalid_json": 1, "wrong_type_string_or_null": 1, "bad_role": 1, "empty_messages": 1,
                                       "no_assistant": 1, "not_an_object": 1}
    assert "11 lines read: 3 valid, 6 rejected, 2 blank; 1 overlong (1 dropped" in result.output  # summary on stderr
    reader = ShardReader(out)
    ids = [sample_origin(int(s))[1] for row in reader for s in row.sample_ids]
    assert sorted(ids) == [1, 10]  # the packed samples trace back to their lines


def test_strict_exits_1_and_writes_no_shard(bad_file, tmp_path, chatml_tokenizer_dir):
    out = tmp_path / "out"
    result = _run("prepare", bad_file, out, "--tokenizer", chatml_tokenizer_dir, "--max-seq-len", 64, "--strict")
    assert result.exit_code == 1
    last = result.output.strip().splitlines()[-1]
    assert last.startswith(f"error: {bad_file}:3: invalid JSON") and "--strict: 7 line(s)" in last
    assert "Traceback" not in result.output
    assert not list(out.glob("shard-*")) and not (out / "manifest.json").exists()


@pytest.mark.parametrize("args, code", [
    (["prepare"], 2),
    (["prepare", "{good}", "{out}", "--max-seq-len", "64"], 2),  # no --tokenizer
    (["prepare", "{good}", "{out}", "--tokenizer", "{tok}", "--max-seq-len", "1"], 2),
    (["prepare", "{good}", "{out}", "--tokenizer", "{tok}", "--max-seq-len", "64", "--overlong", "cut"], 2),
    (["prepare", "{missing}", "{out}", "--tokenizer", "{tok}", "--max-seq-len", "64"], 1),
    (["prepare", "{good}", "{out}", "--tokenizer", "{missing}", "--max-seq-len", "64"], 1),
    (["inspect", "{missing}"], 1),
])
def test_exit_codes(args, code, good_file, tmp_path, chatml_tokenizer_dir):
    fill = {"good": good_file, "out": tmp_path / "o", "tok": chatml_tokenizer_dir, "missing": tmp_path / "nope"}
    result = _run(*[a.format(**fill) for a in args])
    assert result.exit_code == code, result.output
    if code == 1:
        assert result.output.startswith("error: ") and "nope" in result.output and "Traceback" not in result.output


def test_byte_identical_and_seed_orders_rows(good_file, tmp_path, llama3_tokenizer_dir):
    def go(name, seed):
        out = tmp_path / name
        lora_data.prepare(good_file, out, llama3_tokenizer_dir, max_seq_len=128, seed=seed, rows_per_shard=16,
                          verbose=False)
        return out

    a, b, c = go("a", 0), go("b", 0), go("c", 1)
    files = sorted(p.name for p in a.iterdir())
    assert len([f for f in files if f.startswith("shard-")]) > 1
    for f in files:
        if f != "manifest.json":
            assert (a / f).read_bytes() == (b / f).read_bytes(), f
    assert Manifest.load(a).to_json().replace(str(a), "") == Manifest.load(b).to_json().replace(str(b), "")
    ra, rc = ShardReader(a), ShardReader(c)
    assert (a / "shard-00000.bin").read_bytes() != (c / "shard-00000.bin").read_bytes()
    rows = lambda r: sorted(tuple(x.input_ids.tolist()) for x in r)  # noqa: E731
    assert rows(ra) == rows(rc)  # same rows, other order


def test_rows_keep_every_token_and_mask(good_file, tmp_path, chatml_tokenizer_dir, tokenizers):
    out = tmp_path / "o"
    m = lora_data.prepare(good_file, out, chatml_tokenizer_dir, max_seq_len=256, verbose=False)
    tok = tokenizers["chatml"]
    reader = ShardReader(out)
    assert m.counts["samples"] == 400 and m.counts["rows"] == len(reader)
    assert m.packing_efficiency == pytest.approx(m.counts["tokens"] / (m.counts["rows"] * 256))
    by_line = {}
    for row in reader:
        ends = np.cumsum(row.seq_lens)
        assert ends[-1] <= 256 and (row.input_ids[ends[-1]:] == m.pad_id).all() and not row.loss_mask[ends[-1]:].any()
        for sid, lo, hi in zip(row.sample_ids, ends - row.seq_lens, ends, strict=True):
            by_line[sample_origin(int(sid))[1]] = (row.input_ids[lo:hi], row.loss_mask[lo:hi])
    recs = _tiny.chat_records(400, seed=3)
    for line, rec in enumerate(recs, start=1):
        ids, mask = by_line[line]
        want = "".join(x["content"] + "<|im_end|>" for x in rec["messages"] if x["role"] == "assistant")
        assert tok.decode(ids[mask == 1].tolist()) == want
    assert int(sum(mask.sum() for _, mask in by_line.values())) == m.counts["loss_tokens"]


@pytest.mark.parametrize("policy, listed", [("drop", "overlong_dropped"), ("truncate", "overlong_truncated"),
                                            ("split", "overlong_split")])
def test_overlong_policies(policy, listed, tmp_path, chatml_tokenizer_dir, tokenizers):
    n_tokens = len(render(LONG["messages"], tokenizers["chatml"])[0])
    samples = {"drop": 0, "truncate": 1, "split": -(-n_tokens // 64)}[policy]  # every split piece has loss here
    p = _tiny.write_jsonl(tmp_path / "long.jsonl", [LONG, {"messages": [U, A]}])
    m = lora_data.prepare(p, tmp_path / "o", chatml_tokenizer_dir, max_seq_len=64, overlong=policy, verbose=False)
    c = m.counts
    assert c["overlong"] == 1 and c[{"drop": "dropped", "truncate": "truncated", "split": "split"}[policy]] == 1
    assert c["samples"] == samples + 1 and c["valid"] == 2 and c["rejected"] == 0
    (reject,) = [json.loads(x) for x in (tmp_path / "o" / "rejects.jsonl").read_text().splitlines()]
    assert (reject["line"], reject["code"]) == (1, listed) and "> --max-seq-len 64" in reject["reason"]
    assert all(len(r.seq_lens) and r.seq_lens.max() <= 64 for r in ShardReader(tmp_path / "o"))
    n_short = len(render([U, A], tokenizers["chatml"])[0])
    assert c["tokens"] == n_short + {"drop": 0, "truncate": 64, "split": n_tokens}[policy]


def test_no_packing_one_sample_per_row_in_input_order(good_file, tmp_path, chatml_tokenizer_dir):
    m = lora_data.prepare(good_file, tmp_path / "o", chatml_tokenizer_dir, max_seq_len=256, packing=False,
                          verbose=False)
    reader = ShardReader(tmp_path / "o")
    assert len(reader) == 400 and not m.packing
    assert [sample_origin(int(r.sample_ids[0]))[1] for r in reader] == list(range(1, 401))


@pytest.mark.parametrize("policy", ["split", "truncate"])
def test_no_packing_keeps_an_overlong_records_pieces_in_its_place(policy, tmp_path, chatml_tokenizer_dir):
    """They came after the chunk's other samples."""
    long = {"messages": [U, {"role": "assistant", "content": "the answer " * 40}]}
    data = _tiny.write_jsonl(tmp_path / "d.jsonl", [long, {"messages": [U, A]}, {"messages": [U, A]}])
    lora_data.prepare(data, tmp_path / "o", chatml_tokenizer_dir, max_seq_len=64, packing=False, overlong=policy,
                      verbose=False)
    lines = [sample_origin(int(r.sample_ids[0]))[1] for r in ShardReader(tmp_path / "o")]
    assert lines == sorted(lines) and lines[0] == 1 and lines[-2:] == [2, 3], lines


def test_alpaca_and_messages_files_together(tmp_path, chatml_tokenizer_dir, tokenizers):
    a = _tiny.write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Add", "input": "2+2", "output": "4"}])
    b = _tiny.write_jsonl(tmp_path / "b.jsonl", [{"messages": [U, A]}])
    m = lora_data.prepare([a, b], tmp_path / "o", chatml_tokenizer_dir, max_seq_len=64, verbose=False)
    assert m.dataset_format == "mixed" and [s["format"] for s in m.sources] == ["alpaca", "messages"]
    assert [s["bytes"] for s in m.sources] == [a.stat().st_size, b.stat().st_size]
    row = ShardReader(tmp_path / "o")[0]
    assert tokenizers["chatml"].decode(row.input_ids[row.loss_mask == 1].tolist()) in (
        "4<|im_end|>Paris.<|im_end|>", "Paris.<|im_end|>4<|im_end|>")


def test_inspect_prints_numbers_and_histogram(good_file, tmp_path, chatml_tokenizer_dir):
    out = tmp_path / "o"
    lora_data.prepare(good_file, out, chatml_tokenizer_dir, max_seq_len=256, verbose=False)
    result = _run("inspect", out)
    assert result.exit_code == 0
    assert "400 lines read: 400 valid" in result.output and "packing efficiency" in result.output
    assert "sample lengths (400 samples" in result.output and "#" in result.output


def test_prepared_shards_detect_corruption(good_file, tmp_path, chatml_tokenizer_dir):
    out = tmp_path / "o"
    lora_data.prepare(good_file, out, chatml_tokenizer_dir, max_seq_len=128, rows_per_shard=64, verbose=False)
    shard = out / "shard-00001.bin"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"shard-00001\.bin: sha256 does not match"):
        ShardReader(out)
    result = _run("inspect", out)
    assert result.exit_code == 1 and "shard-00001.bin" in result.output


def test_fingerprint_and_cache_key(good_file, tmp_path, chatml_tokenizer_dir, llama3_tokenizer_dir, tiny_qwen2_dir,
                                   tokenizers):
    from transformers import AutoTokenizer

    fp = lora_data.tokenizer_fingerprint
    again = AutoTokenizer.from_pretrained(chatml_tokenizer_dir)
    again("warm up", padding="max_length", max_length=8, truncation=True)  # call-time settings do not count
    assert fp(again) == fp(tokenizers["chatml"]) != fp(tokenizers["llama3"])
    assert len(fp(again)) == 16
    # transformers 5 loads Qwen2Tokenizer for a Qwen2-config model dir whatever class was saved, and it splits
    # digits: other ids from the same files. The fingerprint follows the loaded object, so it differs too.
    qwen = AutoTokenizer.from_pretrained(tiny_qwen2_dir)
    assert qwen(_PROBE)["input_ids"] != again(_PROBE)["input_ids"]
    assert fp(qwen) != fp(again)
    assert fp(qwen) == fp(AutoTokenizer.from_pretrained(tiny_qwen2_dir))
    m = lora_data.prepare(good_file, tmp_path / "o", chatml_tokenizer_dir, max_seq_len=128, verbose=False)
    assert m.tokenizer["fingerprint"] == fp(again)
    key = lora_data.cache_key(good_file, chatml_tokenizer_dir, max_seq_len=128)
    assert m.cache_key == key
    assert key != lora_data.cache_key(good_file, chatml_tokenizer_dir, max_seq_len=256)
    assert key != lora_data.cache_key(good_file, llama3_tokenizer_dir, max_seq_len=128)
    assert key != lora_data.cache_key(good_file, chatml_tokenizer_dir, max_seq_len=128, seed=1)


_PROBE = "Hello world, 12 + 3 = 15! ünï"


def test_manifest_check_tokenizer(good_file, tmp_path, chatml_tokenizer_dir, tokenizers):
    from lora_data import TokenizerMismatchError

    m = lora_data.prepare(good_file, tmp_path / "o", chatml_tokenizer_dir, max_seq_len=128, verbose=False)
    Manifest.load(tmp_path / "o").check_tokenizer(tokenizers["chatml"])
    with pytest.raises(TokenizerMismatchError) as e:
        m.check_tokenizer(tokenizers["llama3"])
    assert m.fingerprint in str(e.value) and lora_data.tokenizer_fingerprint(tokenizers["llama3"]) in str(e.value)


def test_lazy_public_names_resolve():
    from lora_data._prepare import prepare

    assert lora_data.prepare is prepare and callable(lora_data.cache_key)
    assert lora_data.read_records is lora_data.records.read_records and lora_data.Record and lora_data.Rejection
    assert set(lora_data.__all__) <= set(dir(lora_data))


def test_progress_bar_and_summary_go_to_stderr(good_file, tmp_path, chatml_tokenizer_dir, capsys):
    lora_data.prepare(good_file, tmp_path / "o", chatml_tokenizer_dir, max_seq_len=128, progress=True)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "lora-data prepare" in captured.err and "400 lines read: 400 valid" in captured.err
    assert "B/s" in captured.err or "it/s" in captured.err or "%" in captured.err  # the tqdm bar


def test_render_workers_give_byte_identical_output(tmp_path, chatml_tokenizer_dir, monkeypatch):
    """Chunks rendered in worker processes: same shards, manifest and rejects.jsonl (order included) as one process."""
    import lora_data._run
    import lora_data._stage

    monkeypatch.setattr(lora_data._run, "CHUNK_RECORDS", 16)  # many chunks, so several are in flight at once
    started = []
    real_start = lora_data._stage.TokenizeStage._start_workers
    monkeypatch.setattr(lora_data._stage.TokenizeStage, "_start_workers",
                        lambda self: (started.append(self.workers), real_start(self)))
    recs: list = _tiny.chat_records(150, seed=3)
    for i in range(5, 150, 23):  # validation rejects between chunks, overlong rejects inside them
        recs[i] = '{"messages": [' if i % 2 else LONG
    path = _tiny.write_jsonl(tmp_path / "d.jsonl", recs)
    outs = {}
    for workers in (1, 2, 3):
        out = tmp_path / f"o{workers}"
        lora_data.prepare(path, out, chatml_tokenizer_dir, max_seq_len=128, overlong="split", verbose=False,
                          workers=workers)
        outs[workers] = {p.name: p.read_bytes() for p in sorted(out.iterdir()) if not p.name.startswith(".")}
    assert started == [2, 3]  # the one-process run never started a pool
    assert outs[1] == outs[2] == outs[3]
    rejects = outs[1]["rejects.jsonl"].decode().splitlines()
    assert {json.loads(x)["code"] for x in rejects} == {"invalid_json", "overlong_split"}


def test_workers_fall_back_to_one_process_inside_a_daemonic_process(tmp_path, chatml_tokenizer_dir, monkeypatch):
    """A pool's worker (daemonic) may not start processes: prepare renders in its own process there."""
    import multiprocessing

    import lora_data._run

    monkeypatch.setattr(lora_data._run, "CHUNK_RECORDS", 16)
    path = _tiny.write_jsonl(tmp_path / "d.jsonl", _tiny.chat_records(60, seed=4))
    proc = multiprocessing.get_context("fork").Process(
        target=lora_data.prepare, args=(path, tmp_path / "o", chatml_tokenizer_dir),
        kwargs={"max_seq_len": 128, "workers": 2, "verbose": False}, daemon=True)
    proc.start()
    proc.join(120)
    assert proc.exitcode == 0 and Manifest.load(tmp_path / "o").counts["valid"] == 60


def test_the_command_exits_130_on_ctrl_c_1_on_bad_data_2_on_usage(tmp_path, monkeypatch, capsys):
    import lora_data._prepare
    from lora_data.cli import main

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")

    def exit_code(*argv: str) -> int:
        monkeypatch.setattr(sys, "argv", ["lora-data", *argv])
        with pytest.raises(SystemExit) as e:
            main()
        return e.value.code

    assert exit_code("prepare", str(empty), str(tmp_path / "out"), "--tokenizer", str(tmp_path), "--max-seq-len", "64") == 1
    assert exit_code("prepare") == 2
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(lora_data._prepare, "prepare", interrupted)
    capsys.readouterr()
    assert exit_code("prepare", str(empty), str(tmp_path / "out"), "--tokenizer", str(tmp_path), "--max-seq-len", "64") == 130
    assert capsys.readouterr().err.strip() == "interrupted"


@pytest.mark.parametrize(("text", "words"), [("", "empty"), ("\n  \n", "2 blank line(s) only")])
def test_a_file_without_records_says_so(tmp_path, chatml_tokenizer_dir, text, words):
    p = tmp_path / "in.jsonl"
    p.write_text(text)
    with pytest.raises(lora_data.DataError, match=re.escape(f"no record in {p}: {words}")):
        lora_data.prepare(p, tmp_path / "out", chatml_tokenizer_dir, max_seq_len=64, verbose=False)


def test_a_gzip_file_is_read_whatever_its_name(tmp_path, chatml_tokenizer_dir):
    import gzip

    line = json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]})
    plain, packed = tmp_path / "plain.jsonl", tmp_path / "packed.jsonl"  # gzip inside, no .gz
    plain.write_text(line + "\n")
    packed.write_bytes(gzip.compress((line + "\n").encode()))
    a = lora_data.prepare(plain, tmp_path / "a", chatml_tokenizer_dir, max_seq_len=64, verbose=False)
    b = lora_data.prepare(packed, tmp_path / "b", chatml_tokenizer_dir, max_seq_len=64, verbose=False)
    assert a.counts == b.counts and a.counts["valid"] == 1
    assert b.cache_key == lora_data.cache_key(packed, chatml_tokenizer_dir, max_seq_len=64)  # lora_sft's cache finds it


@pytest.mark.parametrize(("policy", "words"), [
    ("drop", "dropped (use --overlong truncate|split to keep part of it)"),
    ("truncate", "dropped: no loss token in its first --max-seq-len tokens (--overlong split keeps the pieces that "
                 "have one)"),
])
def test_an_overlong_record_dropped_says_what_would_keep_it(tmp_path, chatml_tokenizer_dir, policy, words):
    late = {"messages": [{"role": "user", "content": "word " * 200}, A]}  # the answer past the first 64 tokens
    p = _tiny.write_jsonl(tmp_path / "late.jsonl", [late, {"messages": [U, A]}])
    lora_data.prepare(p, tmp_path / "o", chatml_tokenizer_dir, max_seq_len=64, overlong=policy, verbose=False)
    (reject,) = [json.loads(x) for x in (tmp_path / "o" / "rejects.jsonl").read_text().splitlines()]
    assert reject["code"] == "overlong_dropped" and reject["reason"].endswith(words), reject["reason"]


def _with_template(tokenizer_dir, out, strips_thoughts_where: str):
    """A copy of the chatml tokenizer whose template writes an assistant content without its <think>…</think> part
    where the Jinja test `strips_thoughts_where` holds (DeepSeek-R1: every answer; Qwen3: all but the last turn)."""
    import shutil

    from transformers import AutoTokenizer

    shutil.copytree(tokenizer_dir, out)
    tok = AutoTokenizer.from_pretrained(out)
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{% if " + strips_thoughts_where + " %}"
                         "{{ m.content.split('</think>')[-1] }}{% else %}{{ m.content }}{% endif %}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tok.save_pretrained(out)
    return out


def test_the_same_thought_in_two_turns_is_listed_where_the_template_leaves_it_out(tmp_path, chatml_tokenizer_dir):
    """Qwen3 writes only the last turn's reasoning: an earlier turn with the same thought was taken as trained
    (its words are in the text, the last turn's)."""
    tok_dir = _with_template(chatml_tokenizer_dir, tmp_path / "tok", "m.role == 'assistant' and not loop.last")
    think = {"role": "assistant", "content": "<think>add them</think>4"}
    data = _tiny.write_jsonl(tmp_path / "d.jsonl", [
        {"messages": [{"role": "user", "content": "2+2?"}, think, {"role": "user", "content": "2+2 again?"}, think]},
        {"messages": [{"role": "user", "content": "2+2?"}, think]}])
    lora_data.prepare(data, tmp_path / "out", tok_dir, max_seq_len=64, verbose=False)
    listed = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert [(e["line"], e["field"], e["code"]) for e in listed] == [(1, "messages[1].content", "reasoning_not_trained")]
    assert Manifest.load(tmp_path / "out").counts["valid"] == 2


def test_reasoning_the_template_leaves_out_is_counted_and_listed(tmp_path, chatml_tokenizer_dir):
    """DeepSeek-R1's template keeps only what follows </think> in every answer: the record trains its answer, and
    the reasoning it does not train is counted and listed, never dropped in silence."""
    tok_dir = _with_template(chatml_tokenizer_dir, tmp_path / "tok", "m.role == 'assistant'")
    data = _tiny.write_jsonl(tmp_path / "d.jsonl", [
        {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "<think>add</think>4"}]},
        {"messages": [{"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "6"}]},
        {"messages": [{"role": "user", "content": "Long?"},  # dropped as overlong: listed as that alone
                      {"role": "assistant", "content": "<think>long</think>" + "the answer " * 60}]}])
    res = CliRunner().invoke(cli, ["prepare", str(data), str(tmp_path / "out"), "--tokenizer", str(tok_dir),
                                   "--max-seq-len", "64"])
    assert res.exit_code == 0, res.output
    assert "1 valid records with reasoning the chat template leaves out (not trained" in res.output
    manifest = Manifest.load(tmp_path / "out")
    assert manifest.counts["valid"] == 3 and manifest.counts["rejected"] == 0 and manifest.counts["dropped"] == 1
    assert manifest.counts["reasoning_not_trained"] == 1
    listed = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert sorted((e["line"], e["field"] or "", e["code"]) for e in listed) == [
        (1, "messages[1].content", "reasoning_not_trained"), (3, "", "overlong_dropped")]
