"""Hostile data: whatever bytes a JSONL file holds, reading and preparing it never crashes, every line ends valid or
in rejects.jsonl with a reason, and `lines_read == valid + rejected + blank`. Memory stays bounded on a huge line.

Property-based (hypothesis, derandomized: the same examples on every run) over random bytes, invalid UTF-8, every
JSON type in every field, deep nesting, duplicate keys and Unicode edge cases; plus a 100 MB line and 1M records.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lora_data.manifest import NOT_REJECTED
from lora_data.records import MAX_LINE_BYTES, Record, Rejection, read_records

ROLES = ["system", "user", "assistant", "tool"]
EDGE_TEXT = ["\ufeff", "\u2028", "\u2029", "\u200b", "\u200d", "\u202e", "\u2066", "\u0000", "\x7f", "\r", "\t",
             "שלום", "مرحبا", "👩‍👩‍👧", "e\u0301", "\U0010ffff", "\ufffd", "日本語", "\\", '"', "}", "\n"]

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                         st.floats(allow_nan=False), st.text(max_size=20))
json_values = st.recursive(json_scalars, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                                 st.dictionaries(st.text(max_size=8), kids, max_size=4)),
                           max_leaves=12)
edge_text = st.lists(st.one_of(st.sampled_from(EDGE_TEXT), st.text(max_size=6)), min_size=1, max_size=6).map("".join)


@st.composite
def chat_record(draw, anything: bool = False) -> dict:
    """A chat record; with `anything`, any JSON value may stand in any field."""
    value = json_values if anything else edge_text
    msgs = []
    for i in range(draw(st.integers(1, 4))):
        role = draw(st.one_of(st.sampled_from(ROLES), json_values) if anything else st.just(["user", "assistant"][i % 2]))
        msg = {"role": role, "content": draw(value)}
        if anything and draw(st.booleans()):
            msg = draw(st.sampled_from([msg, {"role": role}, {"content": msg["content"]}, draw(json_values)]))
        msgs.append(msg)
    rec = {"messages": msgs if not anything or draw(st.booleans()) else draw(json_values)}
    if anything and draw(st.booleans()):
        rec[draw(st.text(max_size=5))] = draw(json_values)
    return rec


@st.composite
def alpaca_record(draw) -> dict:
    keys = draw(st.lists(st.sampled_from(["instruction", "input", "output"]), unique=True))
    return {k: draw(st.one_of(edge_text, json_values)) for k in keys}


def _dumps(draw, obj) -> bytes:
    return json.dumps(obj, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")


@st.composite
def hostile_line(draw) -> bytes:
    """One line (no b"\\n" inside) of one hostile kind."""
    kind = draw(st.sampled_from(["bytes", "bad_utf8", "json", "chat", "chat_any", "alpaca", "nested", "duplicate",
                                 "surrogate", "blank", "truncated"]))
    if kind == "bytes":
        line = draw(st.binary(max_size=64))
    elif kind == "bad_utf8":
        good = _dumps(draw, draw(chat_record()))
        cut = draw(st.integers(0, len(good)))
        line = good[:cut] + draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80",
                                                  b"\xe2\x82"])) + good[cut:]
    elif kind == "json":
        line = _dumps(draw, draw(json_values))
    elif kind in ("chat", "chat_any"):
        line = _dumps(draw, draw(chat_record(anything=kind == "chat_any")))
    elif kind == "alpaca":
        line = _dumps(draw, draw(alpaca_record()))
    elif kind == "nested":
        depth = draw(st.sampled_from([10, 500, 990, 1100, 5000, 100_000]))
        opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
        inner = opener * depth + "1" + closer * depth
        line = draw(st.sampled_from([inner, '{"messages": ' + inner + "}",
                                     '{"messages": [{"role": "user", "content": ' + inner + "}]}"])).encode()
    elif kind == "duplicate":
        good = json.dumps(draw(chat_record()))[1:-1]
        line = ("{" + good + ", " + draw(st.sampled_from(['"messages": 1', '"messages": []', good])) + "}").encode()
    elif kind == "surrogate":
        esc = draw(st.sampled_from(["\\ud800", "\\udfff", "\\ud83d\\ude00", "\\ud83d", "\\uDC00x"]))
        line = ('{"messages": [{"role": "user", "content": "a' + esc + '"}, {"role": "assistant", "content": "b"}]}'
                ).encode()
    elif kind == "truncated":
        good = _dumps(draw, draw(chat_record()))
        line = good[: draw(st.integers(0, max(len(good) - 1, 0)))]
    else:
        line = draw(st.sampled_from([b"", b" ", b"\t \r", b"\r"]))
    return line.replace(b"\n", b"\\n")


def hostile_file(draw, path: Path) -> list[bytes]:
    lines = draw(st.lists(hostile_line(), min_size=1, max_size=25))
    if draw(st.booleans()):
        lines[0] = b"\xef\xbb\xbf" + lines[0]  # a BOM on the first line
    crlf = draw(st.booleans())
    path.write_bytes(b"".join(line + (b"\r\n" if crlf else b"\n") for line in lines))
    return lines


def check_items(items: list, counts: dict, n_lines: int) -> None:
    """Each non-blank line yielded exactly once, in order, as a valid Record or a Rejection with a reason."""
    assert counts["lines_read"] == n_lines
    lines = [it.line for it in items]
    assert lines == sorted(set(lines)) and all(1 <= n <= n_lines for n in lines)
    assert len(items) + counts["blank"] == counts["lines_read"]
    for it in items:
        if isinstance(it, Rejection):
            assert it.reason and it.code and str(it).startswith(f"{it.path}:{it.line}: ")
            json.loads(it.to_json())  # a rejects.jsonl line is always valid JSON
        else:
            assert isinstance(it, Record)
            assert all(isinstance(m, dict) and m["role"] in ROLES and isinstance(m["content"], str)
                       for m in it.messages)
            assert any(m["role"] == "assistant" for m in it.messages)
            it.raw.encode("utf-8")  # encodable text: no lone surrogate reaches a tokenizer


@settings(max_examples=400)
@given(data=st.data())
def test_read_records_accounts_for_every_line(data, tmp_path_factory, counts):
    path = tmp_path_factory.mktemp("hostile") / "in.jsonl"
    lines = hostile_file(data.draw, path)
    reader = read_records(path)
    items = list(reader)
    check_items(items, reader.counts, len(lines))
    counts.add("hostile_files_read")
    counts.add("hostile_lines_read", len(lines))
    counts.add("hostile_lines_rejected", sum(isinstance(i, Rejection) for i in items))


@pytest.fixture(scope="module")
def tokenizer(chatml_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(chatml_tokenizer_dir)


@settings(max_examples=120)
@given(data=st.data())
def test_prepare_never_crashes_and_every_line_is_valid_or_rejected(data, tokenizer, tmp_path_factory, counts):
    from lora_data import DataError, ShardReader, prepare
    from lora_data.records import sample_origin

    root = tmp_path_factory.mktemp("prep")
    lines = hostile_file(data.draw, root / "in.jsonl")
    seq_len = data.draw(st.sampled_from([16, 64, 256]))
    overlong = data.draw(st.sampled_from(["drop", "truncate", "split"]))
    out = root / "out"
    try:
        m = prepare(root / "in.jsonl", out, tokenizer, max_seq_len=seq_len, overlong=overlong, verbose=False)
        c, trained = m.counts, {sample_origin(int(s))[1] for r in ShardReader(out) for s in r.sample_ids}
    except DataError as e:  # only when no line at all is trainable (or none is a record); rejects.jsonl is complete
        assert "no trainable record" in str(e) or "blank line(s) only" in str(e)
        c, trained = None, set()
    text = (out / "rejects.jsonl").read_text(encoding="utf-8")
    rejects = [json.loads(x) for x in text.split("\n") if x]
    assert len(text.splitlines()) == len(rejects)  # no U+2028 & co. splits a line for naive readers
    listed = {r["line"] for r in rejects}
    assert all(r["reason"] and r["code"] and r["line"] >= 1 for r in rejects)
    blank = {i + 1 for i, line in enumerate(lines) if not (line.removeprefix(b"\xef\xbb\xbf") if i == 0 else line).strip()}
    assert listed | trained | blank == set(range(1, len(lines) + 1)), "a line is neither trained on nor rejected"
    assert not blank & (listed | trained)
    if c is not None:
        assert c["lines_read"] == len(lines) == c["valid"] + c["rejected"] + c["blank"]
        assert c["blank"] == len(blank)
        dropped = {r["line"] for r in rejects if r["code"] in ("overlong_dropped",)}
        still_trained = {r["line"] for r in rejects if r["code"].startswith(NOT_REJECTED) and r["line"] not in dropped}
        assert not trained & dropped and not trained & ({r["line"] for r in rejects} - still_trained)
    counts.add("prepare_runs_on_hostile_files")
    counts.add("prepare_lines_tried", len(lines))


def test_cli_prepare_on_garbage_is_one_line_no_traceback(tokenizer, tmp_path):
    from click.testing import CliRunner
    from lora_data.cli import cli

    tok_dir = tmp_path / "tok"
    tokenizer.save_pretrained(tok_dir)
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_bytes(b"\xff\xfe\x00garbage\n" + b"[" * 100_000 + b"\n" + b'{"messages": "\\ud800"}\n')
    res = CliRunner().invoke(cli, ["prepare", str(garbage), str(tmp_path / "out"), "--tokenizer", str(tok_dir),
                                   "--max-seq-len", "64"])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert res.output.startswith("error: no trainable record in") and "rejects.jsonl" in res.output
    assert len((tmp_path / "out" / "rejects.jsonl").read_text().splitlines()) == 3


HUGE = textwrap.dedent("""
    import json, sys, tracemalloc
    from lora_data.records import read_records
    tracemalloc.start()
    reader = read_records(sys.argv[1])
    items = [(type(i).__name__, i.line, getattr(i, "code", None), len(getattr(i, "raw", ""))) for i in reader]
    print(json.dumps({"peak": tracemalloc.get_traced_memory()[1], "items": items, "counts": reader.counts}))
""")


def test_a_100_mb_line_is_rejected_with_memory_bounded(tmp_path, counts):
    """The line is never held whole: peak traced memory is bounded by the 32 MiB line limit, not the line."""
    path = tmp_path / "huge.jsonl"
    good = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}\n'
    with open(path, "wb") as f:
        f.write(good)
        f.write(b'{"messages": [{"role": "user", "content": "')
        block = b"x" * (1 << 20)
        for _ in range(100):
            f.write(block)
        f.write(b'"}, {"role": "assistant", "content": "ok"}]}\n')
        f.write(good)
    size = path.stat().st_size
    proc = subprocess.run([sys.executable, "-c", HUGE, str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(proc.stdout)
    assert res["items"] == [["Record", 1, None, len(good) - 1], ["Rejection", 2, "line_too_long", 1024],
                            ["Record", 3, None, len(good) - 1]]
    assert res["counts"]["bytes"] == size and res["counts"]["lines_read"] == 3
    # readline(limit) may copy its buffer once: ≤ 2 × the 32 MiB limit whatever the line's size
    assert res["peak"] < 2 * MAX_LINE_BYTES + (12 << 20) < size, f"peak {res['peak'] / 2**20:.0f} MiB on a {size >> 20} MiB line"
    counts["huge_line_bytes"] = size
    counts["huge_line_peak_traced_mib"] = round(res["peak"] / 2**20, 1)


def test_a_million_records_are_all_accounted_for(tmp_path, counts):
    """1M lines (every 1000th broken, every 997th blank): each counted exactly once."""
    good = b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}'
    n = 1_000_000
    lines = [good] * n
    for i in range(999, n, 1000):
        lines[i] = b'{"messages": [{"role": "bot"'
    for i in range(996, n, 997):
        lines[i] = b""
    path = tmp_path / "million.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    reader = read_records(path)
    valid = rejected = 0
    for item in reader:
        if isinstance(item, Record):
            valid += 1
        else:
            rejected += 1
    blank = sum(1 for x in lines if not x)
    assert reader.counts["lines_read"] == n == valid + rejected + reader.counts["blank"]
    assert reader.counts["blank"] == blank and rejected == sum(1 for x in lines if x and x != good)
    counts["million_records_lines"] = n


def _records(n: int, system: bool = False) -> list[bytes]:
    turns = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    if system:
        turns.insert(0, {"role": "system", "content": "be brief"})
    return [json.dumps({"messages": turns}).encode()] * n


def test_an_integer_past_pythons_digit_limit_is_a_reject_with_its_line(tokenizer, tmp_path, counts):
    from lora_data import prepare

    good = _records(1)[0]
    big = b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "n": ' + \
        b"9" * 5000 + b"}"
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\n".join([good, big, good]) + b"\n")
    m = prepare(path, tmp_path / "out", tokenizer, max_seq_len=64, verbose=False)
    (reject,) = [json.loads(x) for x in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert reject["line"] == 2 and reject["code"] == "number_too_long" and "digits" in reject["reason"]
    assert m.counts["valid"] == 2 and m.counts["rejected"] == 1
    counts.add("hostile_numbers_rejected")


def test_a_chunk_the_template_refuses_whole_is_rejected_and_later_chunks_still_prepared(tokenizer, tmp_path,
                                                                                       monkeypatch, counts):
    """A Mistral/Llama-2-style template that raises on a system turn, over a whole chunk of such records."""
    import copy

    import lora_data._run
    from lora_data import prepare

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not "
                         "supported') }}{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}")
    monkeypatch.setattr(lora_data._run, "CHUNK_RECORDS", 4)
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\n".join(_records(8, system=True) + _records(5)) + b"\n")
    m = prepare(path, tmp_path / "out", tok, max_seq_len=64, verbose=False)
    rejects = [json.loads(x) for x in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert [r["line"] for r in rejects] == list(range(1, 9))
    assert all(r["code"] == "render_error" and "System role not supported" in r["reason"] for r in rejects)
    assert m.counts["valid"] == 5 and m.counts["samples"] == 5
    counts.add("template_refusing_chunks_survived")


def test_a_template_that_would_run_for_hours_is_bounded(tokenizer, tmp_path, monkeypatch, counts):
    import copy

    import lora_data.sandbox
    from click.testing import CliRunner
    from lora_data.cli import cli

    monkeypatch.setattr(lora_data.sandbox, "TIME_LIMIT", 0.2)
    tok = copy.deepcopy(tokenizer)
    hang = "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}"
    tok.chat_template = ("{% for m in messages %}{% if m['content'] == 'slow' %}" + hang + "{% endif %}"
                         "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}")
    tok_dir = tmp_path / "tok"
    tok.save_pretrained(tok_dir)
    slow = json.dumps({"messages": [{"role": "user", "content": "slow"}, {"role": "assistant", "content": "a"}]})
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\n".join([*_records(2), slow.encode(), *_records(2)]) + b"\n")
    res = CliRunner().invoke(cli, ["prepare", str(path), str(tmp_path / "out"), "--tokenizer", str(tok_dir),
                                   "--max-seq-len", "64"])
    assert res.exit_code == 0, res.output
    (reject,) = [json.loads(x) for x in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert reject["line"] == 3 and reject["code"] == "render_limit" and "longer than 0.2 s" in reject["reason"]
    # a template that never finishes on any record: one error line, not hours of rejects
    path.write_bytes(b"\n".join([slow.encode()] * 8) + b"\n")
    res = CliRunner().invoke(cli, ["prepare", str(path), str(tmp_path / "out2"), "--tokenizer", str(tok_dir),
                                   "--max-seq-len", "64"])
    assert res.exit_code == 1 and res.output.count("\n") == 1, res.output
    assert res.output.startswith(f"error: {path}:5: the chat template ran longer than 0.2 s") and "in a row" in res.output
    counts.add("template_time_limits_held")


@pytest.mark.parametrize("blob", [b'{"format_version": 1, "seq_len": ' + b"7" * 5000 + b"}",
                                  b'{"format_version": 1, "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"],
                         ids=["5000-digit number", "100000-deep nesting"])
def test_a_hostile_manifest_is_one_error_line_in_inspect_and_on_load(blob, tmp_path, counts):
    from click.testing import CliRunner
    from lora_data import Manifest, ManifestError
    from lora_data.cli import cli

    (tmp_path / "manifest.json").write_bytes(blob)
    with pytest.raises(ManifestError, match=r"manifest\.json: (unreadable number|JSON nested too deeply)"):
        Manifest.load(tmp_path)
    res = CliRunner().invoke(cli, ["inspect", str(tmp_path)])
    assert res.exit_code == 1 and res.output.count("\n") == 1 and res.output.startswith("error: "), res.output
    counts.add("hostile_manifests_refused")
