"""Schemas and records: hand-checkable literals for every kind of line."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
from lora_data import DataError, Record, Rejection, read_records
from lora_data._schema import Schema

USER = {"role": "user", "content": "Hi"}
BOT = {"role": "assistant", "content": "Hello!"}


def _items(tmp_path, lines: list, **kw):
    p = tmp_path / "in.jsonl"
    p.write_bytes(b"".join((x if isinstance(x, bytes) else (json.dumps(x) if not isinstance(x, str) else x).encode())
                           + b"\n" for x in lines))
    reader = read_records(p, **kw)
    return list(reader), reader


@pytest.mark.parametrize("obj, expected", [
    ({"messages": [USER, BOT]}, None),
    ({"messages": [USER, {**BOT, "name": "x", "weight": 0}], "id": 7}, None),  # extra fields are kept, not errors
    ({"messages": [{"role": "bot", "content": "x"}]},
     ("messages[0].role", 'expected one of system, user, assistant, tool; got "bot"', "bad_role")),
    ({"messages": []}, ("messages", "must not be empty", "empty_messages")),
    ({"messages": [USER, {"role": "assistant", "content": 3}]},
     ("messages[1].content", "expected string or null, got integer 3", "wrong_type_string_or_null")),
    ({"messages": [USER, {"role": "assistant"}]}, ("messages[1].content", "missing required field", "missing_content")),
    ({"messages": "hi"}, ("messages", 'expected array, got string "hi"', "wrong_type_array")),
    ({"messages": [USER, None]}, ("messages[1]", "expected object, got null", "wrong_type_object")),
])
def test_chat_schema_literals(obj, expected):
    schema = Schema.load("chat")
    assert schema.check(obj) == expected
    # the fast check and jsonschema itself agree on pass/fail, from the same shipped file
    assert jsonschema.Draft202012Validator(schema.schema).is_valid(obj) == (expected is None)


@pytest.mark.parametrize("obj, expected", [
    ({"instruction": "Add", "output": "4"}, None),
    ({"instruction": "Add", "input": "2+2", "output": "4"}, None),
    ({"instruction": "", "output": "4"}, ("instruction", "must not be an empty string", "empty_instruction")),
    ({"instruction": "Add"}, ("output", "missing required field", "missing_output")),
    ({"instruction": "Add", "input": 2, "output": "4"},
     ("input", "expected string or null, got integer 2", "wrong_type_string_or_null")),
    ({"instruction": "Add", "input": None, "output": "4"}, None),  # training-hub's loader reads a null input as none
    ({"instruction": "Add", "output": ""}, None),  # the reader rejects it (empty_answer) unless prompts train too
])
def test_alpaca_schema_literals(obj, expected):
    schema = Schema.load("alpaca")
    assert schema.check(obj) == expected
    assert jsonschema.Draft202012Validator(schema.schema).is_valid(obj) == (expected is None)


def test_a_record_whose_every_answer_is_empty_is_rejected(tmp_path):
    empty = {"role": "assistant", "content": " \n"}
    items, _ = _items(tmp_path, [{"messages": [USER, empty]}, {"messages": [USER, empty, USER, BOT]}])
    items += _items(tmp_path, [{"instruction": "Say hi", "output": "  "}])[0]
    assert [(getattr(i, "code", None), getattr(i, "field", None)) for i in items] == [
        ("empty_answer", "messages"), (None, None), ("empty_answer", "output")]  # one answer is enough to learn from
    assert items[0].reason == "every assistant turn is empty: it would teach the model to answer nothing"
    kept = list(read_records(tmp_path / "in.jsonl", train_on_inputs=True))  # the prompt trains: kept
    assert [type(i).__name__ for i in kept] == ["Record"]


def test_a_key_twice_in_one_object_is_rejected_with_its_path(tmp_path):
    """JSON keeps a repeated key's last value: the first would vanish without a word. Strings holding `":` (JSON in
    the content) and keys spaced from their colon are read as usual; a .json array's elements are checked too."""
    lines = ['{"messages": [{"role": "user", "content": "Hi"}, {"role": "user", "role": "assistant", "content": "x"}]}',
             '{"messages": [], "messages": [' + json.dumps(USER) + ", " + json.dumps(BOT) + "]}",
             json.dumps({"messages": [{"role": "user", "content": 'say {"a": 1}'}, BOT]}),
             '{"instruction" : "Add", "output" : "4", "output" : "5"}',
             json.dumps({"messages": [USER, BOT]}, indent=None, separators=(",", " : ")),
             '{"instruction"  :  "Add",  "output"\t:  "4",  "output"  :"5"}',  # any whitespace before a colon
             '{"instruction": "Add", "x\\\\": 1, "output": "4", "output": "5"}']  # a key ending in a backslash
    items, _ = _items(tmp_path, lines)
    assert [(getattr(i, "code", None), getattr(i, "field", None)) for i in items] == [
        ("duplicate_key", "messages[1].role"), ("duplicate_key", "messages"), (None, None),
        ("duplicate_key", "output"), (None, None), ("duplicate_key", "output"), ("duplicate_key", "output")]
    assert items[0].reason.startswith("this key appears twice in one object: JSON keeps only the last value")
    array = tmp_path / "in.json"
    array.write_text("[\n" + lines[2] + ",\n" + lines[0] + "\n]\n")
    found = list(read_records(array))
    assert [(getattr(i, "code", None), getattr(i, "field", None)) for i in found] == [
        (None, None), ("duplicate_key", "messages[1].role")]


def test_alpaca_becomes_a_conversation(tmp_path):
    (a, b, c), _ = _items(tmp_path, [{"instruction": "Add", "input": "2+2", "output": "4"},
                                     {"instruction": "Say hi", "input": "", "output": "hi"},
                                     {"instruction": "Say hi", "output": "hi"}])
    assert a.messages == [{"role": "user", "content": "Add\n\n2+2"}, {"role": "assistant", "content": "4"}]
    assert b.messages == c.messages == [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]
    assert a.format == "alpaca"


def test_field_overrides(tmp_path):
    items, _reader = _items(tmp_path, [{"conv": [USER, BOT]}, {"messages": [USER, BOT]}], field_messages="conv")
    assert isinstance(items[0], Record) and items[0].messages == [USER, BOT]
    assert isinstance(items[1], Rejection) and (items[1].field, items[1].code) == ("conv", "missing_conv")
    items, _ = _items(tmp_path, [{"q": "Add", "ctx": "1+1", "a": "2"}], format="alpaca", field_instruction="q",
                      field_input="ctx", field_output="a")
    assert items[0].messages[0]["content"] == "Add\n\n1+1" and items[0].messages[1]["content"] == "2"


def test_bom_crlf_blank_and_line_separator(tmp_path):
    rec = {"messages": [{"role": "user", "content": "a\u2028b\u2029c"}, BOT]}
    raw = json.dumps(rec, ensure_ascii=False).encode()
    items, reader = _items(tmp_path, [b"\xef\xbb\xbf" + raw + b"\r", b"", b"  \t\r", raw])
    assert [i.line for i in items] == [1, 4]
    assert all(isinstance(i, Record) for i in items)
    assert items[0].messages[0]["content"] == "a\u2028b\u2029c"
    assert reader.counts["lines_read"] == 4 and reader.counts["blank"] == 2


def test_a_utf16_file_is_named_as_such(tmp_path):
    path = tmp_path / "win.jsonl"
    path.write_bytes(json.dumps({"messages": [USER, BOT]}).encode("utf-16") + "\n".encode("utf-16-le"))
    first = next(iter(read_records(path)))
    assert first.code == "invalid_utf8" and first.reason.endswith("(the file is UTF-16, as Windows tools write it: "
                                                                  "save it as UTF-8)")


def test_every_bad_line_names_line_field_and_reason(tmp_path):
    lines = ['{"messages": [', [1, 2], {"messages": [USER]}, b"\xff\xfe", {"text": "x"}, {"messages": [USER, BOT]}]
    items, _reader = _items(tmp_path, lines)
    got = [(i.line, i.field, i.code) if isinstance(i, Rejection) else (i.line, "ok") for i in items]
    assert got == [(1, None, "invalid_json"), (2, None, "not_an_object"), (3, "messages", "no_assistant"),
                   (4, None, "invalid_utf8"), (5, "messages", "missing_messages"), (6, "ok")]
    assert str(items[2]).endswith("in.jsonl:3: messages: no assistant turn: nothing to learn from")
    assert items[0].raw == '{"messages": ['


@pytest.mark.parametrize(("line", "reason"), [
    (b'{"messages": "abc', "invalid JSON: Unterminated string starting at column 14"),
    (b'{"messages": "a\x01"}', "invalid JSON: Invalid control character at column 16"),
    (b'{"messages": [1,]}', "invalid JSON: Expecting value at column 17"),
])
def test_an_invalid_json_reason_names_the_column_once(tmp_path, line, reason):
    (item,), _ = _items(tmp_path, [line])
    assert item.reason == reason


def test_auto_format_from_first_recognisable_record(tmp_path):
    items, reader = _items(tmp_path, [{"foo": 1}, {"instruction": "a", "output": "b"}, {"messages": [USER, BOT]}])
    assert [getattr(i, "code", "ok") for i in items] == ["unknown_format", "ok", "missing_instruction"]
    assert reader.detected == "alpaca"


def test_sample_id_traces_back_to_file_and_line():
    from lora_data.records import sample_id, sample_origin

    assert sample_origin(sample_id(3, 17)) == (3, 17)


def test_is_alpaca_file_only_when_every_record_is_alpaca(tmp_path):
    import gzip

    from lora_data import Fields, is_alpaca_file

    alpaca = {"instruction": "Add", "input": "2+2", "output": "4"}

    def write(name, lines):
        data = b"".join((x if isinstance(x, bytes) else json.dumps(x).encode()) + b"\n" for x in lines)
        p = tmp_path / name
        p.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
        return p

    assert is_alpaca_file(write("a.jsonl", [b"\xef\xbb\xbf" + json.dumps(alpaca).encode(), b"", b"{oops", alpaca]))
    assert is_alpaca_file(write("a.jsonl.gz", [alpaca, {"output": "only an output"}]))
    assert not is_alpaca_file(write("chat.jsonl", [{"messages": [USER, BOT]}, alpaca]))
    assert not is_alpaca_file(write("late.jsonl", [alpaca, {**alpaca, "messages": [USER, BOT]}]))
    assert not is_alpaca_file(write("neither.jsonl", [alpaca, {"text": "x"}]))
    assert not is_alpaca_file(write("empty.jsonl", [b"", b"[1]"]))
    assert not is_alpaca_file(tmp_path / "missing.jsonl")
    renamed = write("renamed.jsonl", [{"q": "Add", "a": "4"}])
    assert not is_alpaca_file(renamed) and is_alpaca_file(renamed, Fields(instruction="q", output="a"))


def test_a_record_of_the_other_format_says_which_it_is(tmp_path):
    items, _ = _items(tmp_path, [{"instruction": "Add", "output": "4"}, {"text": "x"}], format="messages")
    assert items[0].reason.startswith('missing required field (an Alpaca record: "instruction"/"output" keys; '
                                      'prepare it with --format alpaca, or train with dataset_type="alpaca")')
    assert items[1].reason == "missing required field"  # neither format: nothing to suggest
    items, _ = _items(tmp_path, [{"messages": [USER, BOT]}], format="alpaca")
    assert 'a chat record: "messages" key; prepare it with --format messages' in items[0].reason


def test_a_json_array_file_reads_its_elements_by_their_place(tmp_path):
    """training-hub's `.json` files (`load_dataset("json")` reads an array too), pretty-printed or on one line: each
    element numbered by its place (distinct sample ids), a rejection naming the line the element starts on."""
    records = [{"messages": [USER, BOT]}, {"messages": [USER]}, {"instruction": "x", "output": "y"}]
    pretty = tmp_path / "data.json"
    pretty.write_text("\ufeff" + json.dumps(records, indent=2) + "\n")
    items = list(read_records(pretty))
    opens = [n for n, line in enumerate(pretty.read_text().splitlines(), start=1) if line == "  {"]
    assert [i.line for i in items] == [1, 2, 3] and len(opens) == 3
    assert [getattr(i, "code", None) for i in items] == [None, "no_assistant", "missing_messages"]
    assert items[1].reason.endswith(f"(array element 2, from line {opens[1]})")
    one_line = tmp_path / "one.json"
    one_line.write_text(json.dumps(records[:1] * 3))
    reader = read_records(one_line)
    got = list(reader)
    assert [i.line for i in got] == [1, 2, 3] and len({i.sample_id for i in got}) == 3
    assert reader.counts["lines_read"] == 3


def test_a_json_array_element_with_a_number_python_cannot_read_is_that_elements_rejection(tmp_path):
    """As for a JSON Lines line; the array was a traceback."""
    path = tmp_path / "data.json"
    path.write_text('[{"instruction": "a", "output": "b"},\n{"instruction": "a", "output": "b", "id": ' + "9" * 5000
                    + '},\n{"instruction": "c", "output": "d"}]')
    items = list(read_records(path))
    assert [getattr(i, "code", None) for i in items] == [None, "number_too_long", None]
    assert items[1].reason.endswith("(array element 2, from line 2)")


def test_a_json_array_of_alpaca_records_is_alpaca(tmp_path):
    from lora_data.records import is_alpaca_file

    p = tmp_path / "a.json"
    p.write_text(json.dumps([{"instruction": "x", "output": "y"}] * 2, indent=1))
    assert is_alpaca_file(p) and [i.format for i in read_records(p)] == ["alpaca", "alpaca"]


def test_json_lines_whose_first_record_is_a_list_stay_json_lines(tmp_path):
    """In a .json file (tried as one array first) as in a .jsonl file (JSON Lines only: an array line is a record
    that is not an object, and a pretty-printed array's first line says to name the file .json)."""
    lines = json.dumps([1, 2]) + "\n" + json.dumps({"messages": [USER, BOT]}) + "\n"
    for name in ("data.json", "data.jsonl"):
        (tmp_path / name).write_text(lines)
        reader = read_records(tmp_path / name)
        items = list(reader)
        assert [(i.line, getattr(i, "code", None)) for i in items] == [(1, "not_an_object"), (2, None)]
        assert reader.counts["lines_read"] == 2  # the elements tried as an array first are not counted
    (tmp_path / "pretty.jsonl").write_text(json.dumps([{"messages": [USER, BOT]}], indent=2))
    first = next(iter(read_records(tmp_path / "pretty.jsonl")))
    assert first.reason.endswith("(the file looks like one JSON array: name it .json to read it as an array of records)")


def test_an_array_spread_over_lines_that_is_not_valid_json_names_the_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[\n  {"messages": []},\n  {"messages": [}\n]\n')
    with pytest.raises(DataError, match=re.escape(f"{bad}:3: invalid JSON: Expecting value at column 17 (a file "
                                                  "starting with '[' is read as one JSON array of records)")):
        list(read_records(bad))
