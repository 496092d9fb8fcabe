"""Stream a JSONL file line by line → `Record` (a validated conversation) or `Rejection` (why, where, the raw line).

Lines are split on b"\\n" only, so U+2028/U+2029 inside JSON strings stay inside their record; a UTF-8 BOM on the
first line and CRLF endings are accepted; blank lines are skipped and counted (`reader.counts["blank"]`).

Alpaca records become a two-turn conversation at read time::

    {"instruction": "Add", "input": "2+2", "output": "4"}
    → [{"role": "user", "content": "Add\\n\\n2+2"}, {"role": "assistant", "content": "4"}]

`--format auto` decides each file's format from its first record that has the messages key (messages) or the
instruction/output keys (alpaca); earlier lines that have neither are rejected (`unknown_format`).

A line longer than `MAX_LINE_BYTES` (32 MiB) is rejected (`line_too_long`) without being held in memory: it is read
in 1 MiB pieces (still hashed), and rejects.jsonl keeps its first KiB. Memory stays bounded whatever the JSON Lines
input. A `.json` file holding one JSON array of records (what training-hub's `load_dataset("json")` also reads) is
read whole instead, each element numbered by its place in the array (a rejection names the line it starts on).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import io
import itertools
import json
import os
import re
import sys
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._schema import Schema, json_path
from .errors import DataError
from .rows import is_dataset, iter_rows, row_text

FORMATS = ("auto", "messages", "alpaca")
MAX_LINE_BYTES = 32 << 20
_PIECE = 1 << 20
_LINE_BREAKS = {c: f"\\u{c:04x}" for c in (0x85, 0x2028, 0x2029)}  # str.splitlines breaks there; JSON need not
LINE_BITS = 40  # sample id = source_index << 40 | line: a packed sample traces back to its file and line


def sample_id(source_index: int, line: int) -> int:
    return (source_index << LINE_BITS) | line


def sample_origin(sid: int) -> tuple[int, int]:
    """Inverse of `sample_id`: (index of the source file in the manifest's `sources`, 1-based line)."""
    return sid >> LINE_BITS, sid & ((1 << LINE_BITS) - 1)


@dataclass(slots=True)
class Record:
    """A valid record: a conversation (Alpaca already converted), where it came from, its sample id, and the
    variables its chat template is rendered with beside `messages` (`template_context`)."""

    path: str
    line: int
    messages: list[dict[str, Any]]
    format: str
    sample_id: int = 0
    raw: str = ""
    context: dict[str, Any] = field(default_factory=dict)


TEMPLATE_KEYS = ("tools", "documents")  # a chat record's keys that apply_chat_template passes to the template
TEMPLATE_KWARGS = "chat_template_kwargs"  # a chat record's object of further template variables, as TRL reads it


def template_context(obj: dict[str, Any]) -> dict[str, Any]:
    """The variables a chat record's template is rendered with beside `messages`: `tools` and `documents` where
    given, and the entries of `chat_template_kwargs` (`enable_thinking`, say).

    >>> template_context({"messages": [], "tools": [{"name": "f"}], "id": 7, "chat_template_kwargs": {"x": 1}})
    {'tools': [{'name': 'f'}], 'x': 1}
    """
    context = {k: obj[k] for k in TEMPLATE_KEYS if obj.get(k) is not None}
    return context | (obj.get(TEMPLATE_KWARGS) or {})


def _tools_in(column: str) -> list | None:
    """The tool definitions a string column holds: its JSON array; None for "" or "null" (an empty cell); ValueError
    for anything else."""
    tools = json.loads(column) if column.strip() else None
    if tools is not None and not isinstance(tools, list):
        raise ValueError(f"not a JSON array: {column[:40]!r}")
    return tools


@dataclass(slots=True)
class Rejection:
    """A line that cannot be trained on. `field` is a JSON path (`messages[2].role`); `code` groups the reasons."""

    path: str
    line: int
    field: str | None
    reason: str
    raw: str
    code: str = "invalid"

    def to_json(self) -> str:
        """One rejects.jsonl line; U+0085/2028/2029 escaped, so readers that split on them (str.splitlines) work."""
        return json.dumps({"source": self.path, "line": self.line, "field": self.field, "reason": self.reason,
                           "code": self.code, "raw": self.raw}, ensure_ascii=False
                          ).translate(_LINE_BREAKS)

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.field + ': ' if self.field else ''}{self.reason}"


@dataclass(frozen=True)
class Fields:
    """training-hub's field-name overrides: the option `field_messages` (CLI `--field-messages`) sets `messages`, ...

    >>> Fields.from_options({"field_messages": "conversation", "seed": 1})
    Fields(messages='conversation', instruction='instruction', input='input', output='output')
    >>> Fields().as_options()["field_output"]
    'output'
    """

    messages: str = "messages"
    instruction: str = "instruction"
    input: str = "input"
    output: str = "output"

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        """("field_messages", "field_instruction", "field_input", "field_output")"""
        return tuple(f"field_{f.name}" for f in dataclasses.fields(cls))

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> Fields:
        """The `field_*` entries of `options` (others ignored; missing ones keep their defaults)."""
        return cls(**{f.name: options[f"field_{f.name}"] for f in dataclasses.fields(cls) if f"field_{f.name}" in options})

    def as_options(self) -> dict[str, str]:
        return {f"field_{k}": v for k, v in dataclasses.asdict(self).items()}


@dataclass
class RecordReader:
    """Iterate over one file's records and rejections; `counts` holds lines_read and blank once iterated."""

    path: str | Path
    format: str = "auto"
    fields: Fields = field(default_factory=Fields)
    source_index: int = 0
    counts: dict[str, int] = field(default_factory=lambda: {"lines_read": 0, "blank": 0, "bytes": 0})
    detected: str | None = None
    hasher: Any = None  # e.g. hashlib.sha256(): fed every byte of the file as it streams by
    split: str | None = None  # of a hub dataset or a saved DatasetDict (see `rows.iter_rows`)
    config: str | None = None  # of a hub dataset
    train_on_inputs: bool = False  # the prompts train too: a record whose answers are all empty still teaches

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}; got {self.format!r}")
        f = self.fields
        self._schemas = {
            "messages": Schema.load("chat", (("messages", f.messages),)),
            "alpaca": Schema.load("alpaca", (("instruction", f.instruction), ("input", f.input),
                                             ("output", f.output))),
        }
        self.detected = None if self.format == "auto" else self.format

    def __iter__(self):
        path = str(self.path)
        if is_dataset(path):
            yield from self._rows(path)
            return
        try:
            yield from self._lines(path)
        except GZIP_ERRORS as e:
            raise DataError(f"not a readable gzip file: {e}", path=path) from None

    def _lines(self, path: str):
        with open_input(self.path) as stream:
            fh: Any = stream
            first = fh.readline(MAX_LINE_BYTES + 1)
            rest = iter(lambda: fh.readline(MAX_LINE_BYTES + 1), b"")
            lines: Iterator[bytes] = itertools.chain([first] if first else [], rest)
            if _array_file(path, first):
                data = first + fh.read()
                records = self._array(path, data, first)
                if records is not None:
                    self._count(data)
                    yield from records
                    return
                fh = io.BytesIO(data)  # JSON Lines whose first line is a list: each line judged on its own
                lines = iter(lambda: fh.readline(MAX_LINE_BYTES + 1), b"")
            for number, raw in enumerate(lines, start=1):
                self.counts["lines_read"] += 1
                self._count(raw)
                if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                    yield self._too_long(path, number, fh, raw)
                    continue
                if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]
                raw = raw.rstrip(b"\r\n")
                if not raw.strip():
                    self.counts["blank"] += 1
                    continue
                yield self._parse(path, number, raw)

    def _array(self, path: str, data: bytes, first: bytes) -> list[Record | Rejection] | None:
        """The elements of a file holding one JSON array, numbered by their place in it (a rejection also names the
        line the element starts on). None where the first line is a JSON value of its own (JSON Lines whose first
        record is a list: read line by line, nothing counted here); a DataError naming the line and column where an
        array spread over lines is not valid JSON."""
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            self._not_an_array(path, first, data[:e.start].count(b"\n") + 1, f"invalid UTF-8 at byte {e.start}")
            return None
        decoder, line, at = json.JSONDecoder(), 1, 0
        out: list[Record | Rejection] = []
        detected = self.detected
        i = _skip_space(text, text.index("[") + 1)
        try:
            while i < len(text) and text[i] != "]":
                line, at = line + text.count("\n", at, i), i
                item, end = self._element(path, len(out) + 1, decoder, text, i)
                if isinstance(item, Rejection):
                    item = dataclasses.replace(item, reason=f"{item.reason} (array element {item.line}, from line "
                                                            f"{line})")
                out.append(item)
                i = _skip_space(text, end)
                if i < len(text) and text[i] == ",":
                    i = _skip_space(text, i + 1)
                elif i < len(text) and text[i] != "]":
                    raise json.JSONDecodeError("expected ',' or ']'", text, i)
            if i >= len(text):
                raise json.JSONDecodeError("the array is not closed", text, i)
            if text[i + 1:].strip():
                raise json.JSONDecodeError("more after the array", text, _skip_space(text, i + 1))
        except (json.JSONDecodeError, RecursionError) as e:
            self.detected = detected  # decided by elements now read again as lines
            where = (e.lineno, f"invalid JSON: {e.msg} at column {e.colno}") if isinstance(e, json.JSONDecodeError) \
                else (line, "JSON nested too deeply to parse")
            self._not_an_array(path, first, *where)
            return None
        self.counts["lines_read"] += len(out)
        return out

    def _element(self, path: str, number: int, decoder: json.JSONDecoder, text: str, i: int) -> tuple[Any, int]:
        """The array element at `text[i:]`, checked, and where it ends; an integer longer than Python reads (as in
        a JSON Lines line) is that element's rejection, found with the limit lifted."""
        try:
            obj, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            raise
        except ValueError as e:  # sys.get_int_max_str_digits()
            limit = sys.get_int_max_str_digits()
            sys.set_int_max_str_digits(0)
            try:
                _, end = decoder.raw_decode(text, i)
            finally:
                sys.set_int_max_str_digits(limit)
            return Rejection(path, number, None, f"a number Python cannot read: {e}", text[i:end],
                             "number_too_long"), end
        return self._checked(path, number, obj, text[i:end]), end

    @staticmethod
    def _not_an_array(path: str, first: bytes, line: int, why: str) -> None:
        """DataError unless the first line is a JSON value of its own (then the file is JSON Lines)."""
        try:
            json.loads(first.decode("utf-8-sig"))
        except (ValueError, RecursionError):
            raise DataError(f"{why} (a file starting with '[' is read as one JSON array of records)", path=path,
                            line=line) from None

    def _rows(self, path: str):
        """A parquet/CSV/arrow file, a save_to_disk folder or a hub dataset, row by row (`line` = the 1-based row
        number); the hasher gets each row's JSON text and a newline."""
        for number, row in enumerate(iter_rows(path, split=self.split, config=self.config), start=1):
            self.counts["lines_read"] += 1
            text = row_text(row)
            self.counts["bytes"] += len(text)
            if self.hasher is not None:
                self.hasher.update(text.encode())
                self.hasher.update(b"\n")
            yield self._check(path, number, row, text)

    def _count(self, raw: bytes) -> None:
        self.counts["bytes"] += len(raw)
        if self.hasher is not None:
            self.hasher.update(raw)

    def _too_long(self, path: str, number: int, fh: Any, head: bytes) -> Rejection:
        """Skip the rest of an over-long line in pieces (hashed and counted, never held whole)."""
        size, preview = len(head), head[:1024]
        while not head.endswith(b"\n"):
            head = fh.readline(_PIECE)
            if not head:
                break
            self._count(head)
            size += len(head)
        return Rejection(path, number, None, f"line of {size:,} bytes is longer than the {MAX_LINE_BYTES:,}-byte "
                         "limit; split the record or fix the file (a missing newline?); raw holds its first KiB",
                         preview.decode("utf-8", "replace"), "line_too_long")

    def _parse(self, path: str, number: int, raw: bytes) -> Record | Rejection:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            utf16 = (" (the file is UTF-16, as Windows tools write it: save it as UTF-8)"
                     if number == 1 and raw[:2] in (b"\xff\xfe", b"\xfe\xff") else "")
            return Rejection(path, number, None, f"invalid UTF-8 at byte {e.start}{utf16}",
                             raw.decode("utf-8", "replace"), "invalid_utf8")
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            msg = e.msg.removesuffix(" at")  # "Unterminated string starting at" would read "... at at column 1"
            hint = (" (the file looks like one JSON array: name it .json to read it as an array of records)"
                    if number == 1 and text.lstrip().startswith("[") else "")
            return Rejection(path, number, None, f"invalid JSON: {msg} at column {e.colno}{hint}", text,
                             "invalid_json")
        except ValueError as e:  # an integer longer than sys.get_int_max_str_digits() (4,300 by default)
            return Rejection(path, number, None, f"a number Python cannot read: {e}", text, "number_too_long")
        except RecursionError:
            return Rejection(path, number, None, "JSON nested too deeply to parse (Python's recursion limit)", text,
                             "too_deep")
        return self._checked(path, number, obj, text)

    def _checked(self, path: str, number: int, obj: Any, text: str) -> Record | Rejection:
        """A parsed record: its strings valid Unicode, no key twice in an object, then `_check`."""
        if ("\\ud" in text or "\\uD" in text) and _has_lone_surrogate(obj):
            return Rejection(path, number, None, "a string holds a lone UTF-16 surrogate escape (\\ud800-\\udfff "
                             "without its pair): not valid Unicode text, no tokenizer can encode it", text,
                             "lone_surrogate")
        twice = _key_twice(obj, text)
        if twice is not None:
            return Rejection(path, number, twice, "this key appears twice in one object: JSON keeps only the last "
                             "value, so the first would be dropped without a word; remove or rename one", text,
                             "duplicate_key")
        return self._check(path, number, obj, text)

    def _check(self, path: str, number: int, obj: Any, text: str) -> Record | Rejection:
        """A parsed line (or dataset row) → Record or Rejection."""
        if not isinstance(obj, dict):
            return Rejection(path, number, None, f"expected a JSON object, got {type(obj).__name__}", text,
                             "not_an_object")
        fmt = self.detected or self._detect(obj)
        if fmt is None:
            return Rejection(path, number, None, f'neither a chat record (no "{self.fields.messages}" key) nor an '
                             f'Alpaca record (no "{self.fields.instruction}"/"{self.fields.output}" keys); '
                             "pass --format or the --field-* names", text, "unknown_format")
        self.detected = fmt
        bad = self._schemas[fmt].check(obj)
        if bad:
            return Rejection(path, number, bad[0], bad[1] + self._other_format(fmt, obj), text, bad[2])
        messages = obj[self.fields.messages] if fmt == "messages" else self._alpaca_to_messages(obj)
        for i, m in enumerate(messages):
            if m["content"] is None and not (m["role"] == "assistant" and m.get("tool_calls")):
                return Rejection(path, number, f"{self.fields.messages}[{i}].content", "is null: only an assistant "
                                 "turn with tool_calls may leave its content out", text, "null_content")
        answers = [m for m in messages if m["role"] == "assistant"]
        if not answers:
            return Rejection(path, number, self.fields.messages, "no assistant turn: nothing to learn from", text,
                             "no_assistant")
        if not self.train_on_inputs and not any((a["content"] or "").strip() or a.get("tool_calls") for a in answers):
            where = self.fields.messages if fmt == "messages" else self.fields.output
            return Rejection(path, number, where, "every assistant turn is empty: it would teach the model to answer "
                             "nothing", text, "empty_answer")
        context = template_context(obj) if fmt == "messages" else {}
        if isinstance(context.get("tools"), str):  # as HF datasets often store them: JSON in a string column
            try:
                tools = _tools_in(context.pop("tools"))
            except ValueError:
                return Rejection(path, number, "tools", "is a string that does not hold a JSON array of tool "
                                 "definitions", text, "bad_tools")
            if tools is not None:
                context["tools"] = tools
        return Record(path, number, messages, fmt, sample_id(self.source_index, number), text, context)

    def _detect(self, obj: dict) -> str | None:
        return detect_format(obj, self.fields)

    def _other_format(self, fmt: str, obj: dict) -> str:
        """A record of the other format read under an explicit one fails the schema on every line; say which format
        it is, in both tools' words, so the one rejects.jsonl line explains the whole file."""
        other = detect_format(obj, self.fields)
        if other is None or other == fmt:
            return ""
        if other == "alpaca":
            return (f' (an Alpaca record: "{self.fields.instruction}"/"{self.fields.output}" keys; prepare it with '
                    "--format alpaca, or train with dataset_type=\"alpaca\")")
        return (f' (a chat record: "{self.fields.messages}" key; prepare it with --format messages, or train with '
                'dataset_type="chat_template")')

    def _alpaca_to_messages(self, obj: dict) -> list[dict[str, str]]:
        prompt = obj[self.fields.instruction]
        extra = obj.get(self.fields.input)
        if extra:
            prompt = f"{prompt}\n\n{extra}"
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": obj[self.fields.output]}]


def detect_format(obj: dict, fields: Fields) -> str | None:
    """The format a record's keys say: "messages" (the messages key), "alpaca" (instruction or output), else None."""
    if fields.messages in obj:
        return "messages"
    if fields.instruction in obj or fields.output in obj:
        return "alpaca"
    return None


def is_alpaca_file(path: str | Path, fields: Fields | None = None, *, split: str | None = None,
                   config: str | None = None) -> bool:
    """True when every record of a file (or dataset) is an Alpaca record and none is a chat record: a file that can
    only be meant as Alpaca, whatever format a default named. Stops at the first record that is not Alpaca, so a chat
    file costs one line. Lines that are not JSON objects are skipped (every format rejects them); an unreadable file
    is not Alpaca (prepare then names the problem).
    """
    fields = fields or Fields()
    found = False
    try:
        for obj in _objects(path, split=split, config=config):
            if not isinstance(obj, dict):
                continue
            if detect_format(obj, fields) != "alpaca":
                return False
            found = True
    except (OSError, EOFError, zlib.error, DataError):
        return False
    return found


def json_array(path: str | Path) -> list[Any] | None:
    """The elements of a `.json` file holding one JSON array of records (read whole), else None: JSON Lines, another
    kind of file, or not valid JSON (prepare then names the line)."""
    if str(path) == STDIN or not _array_file(path, b"["):
        return None
    try:
        with open_input(path) as fh:
            data = fh.read()
        if not _array_file(path, data):
            return None
        value = json.loads(data.decode("utf-8-sig"))
    except (OSError, EOFError, zlib.error, ValueError, RecursionError):
        return None
    return value if isinstance(value, list) else None


def _objects(path: str | Path, *, split: str | None, config: str | None):
    """The parsed JSON value of each line of a (gzipped) JSONL file, each element of a `.json` array file, or each
    row of a dataset; unparsable and over-long lines skipped."""
    if is_dataset(str(path)):
        yield from iter_rows(path, split=split, config=config)
        return
    elements = json_array(path)
    if elements is not None:
        yield from elements
        return
    with open_input(path) as fh:
        for raw in iter(lambda: fh.readline(MAX_LINE_BYTES + 1), b""):
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                while raw and not raw.endswith(b"\n"):
                    raw = fh.readline(_PIECE)
                continue
            try:
                yield json.loads(raw.removeprefix(b"\xef\xbb\xbf"))
            except (ValueError, RecursionError):
                continue


class _Twice(dict):
    """A parsed object whose text held `key` twice."""

    key = ""


def _pairs(pairs: list[tuple[str, Any]]) -> dict:
    out = dict(pairs)
    if len(out) == len(pairs):
        return out
    twice, seen = _Twice(out), set()
    for key, _ in pairs:
        if key in seen:
            twice.key = key
            break
        seen.add(key)
    return twice


_KEY_END = re.compile(r'"\s*:')  # a key's closing quote and its colon, whitespace between allowed
_ESCAPED_KEY_END = re.compile(r'\\"\s*:')  # the same inside a string (JSON in a string), not a key


def _key_twice(obj: Any, text: str) -> str | None:
    """The JSON path of a key that an object of the record's text holds twice (`messages[1].role`), else None. The
    text is parsed again, keeping each object's pairs, only where it has more `"` + whitespace + `:` than the parsed
    record has keys, not counting `\\"` + `:` (JSON inside a string) unless a parsed key ends in a backslash."""
    keys, backslashed, stack = 0, 0, [obj]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            keys += len(value)
            backslashed += sum(str(k).endswith("\\") for k in value)  # written `\\"` + `:`: matched as escaped
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    if len(_KEY_END.findall(text)) - len(_ESCAPED_KEY_END.findall(text)) + backslashed <= keys:
        return None
    try:
        parsed = json.loads(text, object_pairs_hook=_pairs)
    except (ValueError, RecursionError):
        return None
    found: list[tuple[Any, list]] = [(parsed, [])]
    while found:
        value, at = found.pop()
        if isinstance(value, _Twice):
            return json_path([*at, value.key])
        if isinstance(value, dict):
            found.extend((v, [*at, k]) for k, v in reversed(value.items()))
        elif isinstance(value, list):
            found.extend((v, [*at, i]) for i, v in reversed(list(enumerate(value))))
    return None


def _has_lone_surrogate(obj: Any) -> bool:
    """Only JSON escapes make lone surrogates (raw UTF-8 cannot); a valid pair decodes to one code point."""
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


STDIN = "-"  # as an input path: read standard input
GZIP_MAGIC = b"\x1f\x8b"
GZIP_ERRORS = (EOFError, zlib.error, gzip.BadGzipFile)  # what reading a truncated or corrupt gzip stream raises


def _array_file(path: str | Path, head: bytes) -> bool:
    """Whether a file may hold one JSON array of records: a `.json` (or `.json.gz`) file, which training-hub's loader
    reads as JSON Lines or as one array, whose text (`head`, its start) opens with "["."""
    json_file = str(path).lower().removesuffix(".gz").endswith(".json")
    return json_file and head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"[")


def _skip_space(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


@contextlib.contextmanager
def open_input(path: str | Path) -> Iterator[Any]:
    """A file, a FIFO, or `-` (standard input, left open when done); read through gzip where a file's name ends in .gz
    or any of them starts with gzip's magic bytes (peeked: a pipe keeps them)."""
    with contextlib.ExitStack() as stack:
        stream: Any
        if str(path) == STDIN:
            stream = sys.stdin.buffer
        elif is_gzip(path):
            stream = stack.enter_context(gzip.open(path, "rb"))
        else:
            stream = stack.enter_context(open(path, "rb"))
        if not isinstance(stream, gzip.GzipFile):
            if not hasattr(stream, "peek"):  # a stdin replaced by an in-memory stream
                stream = io.BufferedReader(stream)
            if stream.peek(2)[:2] == GZIP_MAGIC:
                stream = stack.enter_context(gzip.GzipFile(fileobj=stream, mode="rb"))
        yield stream


def is_gzip(path: str | Path) -> bool:
    """Whether a file is read through gzip: its name ends in .gz, or a regular file starts with gzip's magic bytes
    (a FIFO is not peeked at: that would consume them)."""
    import stat

    if str(path).endswith(".gz"):
        return True
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return False
        with open(path, "rb") as f:
            return f.read(2) == GZIP_MAGIC
    except OSError:
        return False


def read_records(path: str | Path, *, format: str = "auto", fields: Fields | None = None, source_index: int = 0,
                 hasher: Any = None, split: str | None = None, config: str | None = None,
                 train_on_inputs: bool = False, **field_options: str) -> RecordReader:
    """Records and rejections of one JSONL file (or .jsonl.gz, FIFO, `-` for stdin; or a parquet/CSV/arrow file,
    save_to_disk folder or hub dataset name with its `split` / `config`, see `rows`), in line order (see the module
    docstring).

    Field names come as `fields=Fields(...)` or as training-hub's options (`field_messages="conversation"`, ...).
    """
    unknown = set(field_options) - set(Fields.option_names())
    if unknown:
        raise TypeError(f"read_records() got unexpected keyword argument(s) {', '.join(sorted(unknown))}")
    return RecordReader(path, format, fields or Fields.from_options(field_options), source_index, hasher=hasher,
                        split=split, config=config, train_on_inputs=train_on_inputs)
