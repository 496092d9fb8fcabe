"""Load the shipped JSON Schemas (schemas/*.json), rename their keys for training-hub's field_* options, and check.

`check(obj)` returns None or (json_path, reason, code). A small interpreter of the keywords our schemas use decides
pass/fail quickly (jsonschema costs ~90 µs a record, too slow for 10 GB); a failure is then explained by jsonschema
itself, so the message is the standard one, phrased for humans:

>>> Schema.load("chat").check({"messages": [{"role": "bot", "content": "hi"}]})
('messages[0].role', 'expected one of system, user, assistant, tool; got "bot"', 'bad_role')
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import lru_cache
from importlib import resources
from typing import Any

_TYPES = {"object": dict, "array": list, "string": str, "null": type(None)}
_KNOWN = {"$schema", "$id", "title", "description", "type", "required", "properties", "items", "enum", "minItems",
          "minLength"}


def json_path(parts) -> str:
    """["messages", 2, "role"] → "messages[2].role"."""
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _type_name(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer", float: "number",
            type(None): "null"}.get(type(value), type(value).__name__)


def _type_names(schema: dict) -> list[str]:
    """A schema's "type": one name or a list of them (none: any type)."""
    types = schema.get("type", [])
    return [types] if isinstance(types, str) else list(types)


def compile_check(schema: dict) -> Callable[[Any], bool]:
    """A fast pass/fail function for `schema` (the keywords in _KNOWN only), built once as nested closures."""
    t: Any = tuple(_TYPES[x] for x in _type_names(schema)) or object  # for isinstance
    enum = frozenset(schema["enum"]) if "enum" in schema else None
    required = tuple(schema.get("required", ()))
    props = tuple((k, compile_check(v)) for k, v in schema.get("properties", {}).items())
    items = compile_check(schema["items"]) if "items" in schema else None
    min_items, min_len = schema.get("minItems", 0), schema.get("minLength", 0)

    def ok(value: Any) -> bool:
        if not isinstance(value, t):
            return False
        if enum is not None and (not isinstance(value, str) or value not in enum):
            return False
        if isinstance(value, dict):
            return all(k in value for k in required) and all(f(value[k]) for k, f in props if k in value)
        if isinstance(value, list):
            return len(value) >= min_items and (items is None or all(map(items, value)))
        return not isinstance(value, str) or len(value) >= min_len

    return ok


def _walk_keywords(schema: dict) -> None:
    unknown = set(schema) - _KNOWN
    if unknown:
        raise RuntimeError(f"schema keyword(s) {sorted(unknown)} are not handled by lora_data._schema.compile_check")
    if any(x not in _TYPES for x in _type_names(schema)):
        raise RuntimeError(f"schema type {schema['type']!r} is not handled by lora_data._schema.compile_check")
    for sub in schema.get("properties", {}).values():
        _walk_keywords(sub)
    if "items" in schema:
        _walk_keywords(schema["items"])


class Schema:
    """A shipped schema with its top-level keys renamed (e.g. messages → conversation)."""

    def __init__(self, schema: dict) -> None:
        import jsonschema

        _walk_keywords(schema)
        self.schema = schema
        self._validator = jsonschema.Draft202012Validator(schema)
        self._ok = compile_check(schema)

    @classmethod
    @lru_cache(maxsize=16)
    def load(cls, name: str, renames: tuple[tuple[str, str], ...] = ()) -> Schema:
        """`name` is "chat" or "alpaca"; `renames` maps the schema's key names to the user's field names."""
        schema = json.loads(resources.files("lora_data").joinpath("schemas", f"{name}.json").read_text("utf-8"))
        mapping = dict(renames)
        schema["required"] = [mapping.get(k, k) for k in schema["required"]]
        schema["properties"] = {mapping.get(k, k): v for k, v in schema["properties"].items()}
        return cls(schema)

    def check(self, obj: Any) -> tuple[str, str, str] | None:
        if self._ok(obj):
            return None
        import jsonschema

        error = jsonschema.exceptions.best_match(self._validator.iter_errors(obj))
        return self._explain(error)

    @staticmethod
    def _explain(error) -> tuple[str, str, str]:
        path = list(error.absolute_path)
        kind, inst, arg = error.validator, error.instance, error.validator_value
        got = json.dumps(inst, ensure_ascii=False)
        got = got if len(got) <= 60 else got[:57] + "..."
        if kind == "enum":
            code = "bad_role" if path and path[-1] == "role" else "bad_value"
            return json_path(path), f"expected one of {', '.join(arg)}; got {got}", code
        if kind == "type":
            wanted = " or ".join(arg) if isinstance(arg, list) else arg
            shown = "" if inst is None else f" {got}"
            code = "wrong_type_" + ("_or_".join(arg) if isinstance(arg, list) else arg)
            return json_path(path), f"expected {wanted}, got {_type_name(inst)}{shown}", code
        if kind == "required":
            missing = next(k for k in arg if k not in inst)
            return json_path([*path, missing]), "missing required field", f"missing_{missing}"
        if kind == "minItems":
            return json_path(path), "must not be empty", f"empty_{path[-1] if path else 'array'}"
        if kind == "minLength":
            return json_path(path), "must not be an empty string", f"empty_{path[-1] if path else 'string'}"
        return json_path(path), error.message, f"schema_{kind}"
