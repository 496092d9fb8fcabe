"""Click options generated from `LoraSftConfig`'s fields: one source of truth for names, types, defaults and help.

Every field becomes `--kebab-case` (a few also get a short alias, such as `--gpus` for `--nproc-per-node`), with the
field's help line, its type and its default in `--help`. Values are parsed into the field's own type:

    field annotation                  command line                         value
    int / float / str                 --lora-r 8                           8
    bool                              --bf16 / --no-bf16                   True / False
    bool | None                       --tf32 / --no-tf32 (absent: None)    True / False / None
    str with choices                  --lr-scheduler cosine                'cosine' (checked against the choices)
    bool | str (with choices)         --init-lora-weights pissa / false    'pissa' / False
    int | str (| None)                --micro-batch-size 8 / auto          8 / 'auto'
    tuple[str, ...] | str | None      --target-modules q_proj,v_proj       ('q_proj', 'v_proj');  all-linear → 'all-linear'
    dict[...] | None                  --rank-pattern '{"q_proj": 8}'       {'q_proj': 8}  (JSON)

`merge_values` combines the dataclass defaults, a --config file and the options the user actually typed (click's
parameter source), in that order of precedence, lowest first.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import yaml
from click.core import ParameterSource
from lora_runtime.config import ConfigError, LoraSftConfig, check_known_keys, field_defaults

# Extra (usually shorter) names for some fields; the --kebab-case name of the field itself always exists too.
ALIASES = {
    "model_path": ["--model"],
    "data_path": ["--data"],
    "ckpt_output_dir": ["--output"],
    "nproc_per_node": ["--gpus"],
}
# Fields whose command-line form is handled by hand: --shards is another spelling of data_path for a prepared dir.
NOT_GENERATED = {f.name for f in dataclasses.fields(LoraSftConfig) if f.metadata.get("cli") is False}
REQUIRED = ("model_path", "data_path", "ckpt_output_dir")


class ConfigFileError(Exception):
    """A --config file that cannot be read as a mapping of options (a user error: exit code 1)."""


class ModelPathError(OSError):
    """A local base model directory that is missing or holds no config.json (a user error: exit code 1)."""


def check_model_path(model_path: str, option: str = "--model") -> None:
    """A local model directory must exist and hold config.json (a hub id such as Qwen/Qwen2.5-1.5B passes through)."""
    p = Path(model_path).expanduser()
    looks_local = model_path.startswith(("/", "./", "../", "~")) or p.exists()
    if looks_local and not p.is_dir():
        raise ModelPathError(f"{option} {model_path}: no such directory")
    if looks_local and not (p / "config.json").is_file():
        raise ModelPathError(f"{option} {model_path}: no config.json there; pass a Hugging Face model directory "
                             "(config.json + weights + tokenizer) or a hub id")


class _BoolOrChoice(click.ParamType):
    """`true`/`false` (any case) → bool, anything else must be one of the string choices."""

    name = "bool|choice"

    def __init__(self, choices: list) -> None:
        self.strings = [c for c in choices if isinstance(c, str)]

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        return "[" + "|".join(["true", "false", *self.strings]) + "]"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, bool):
            return value
        low = str(value).lower()
        if low in ("true", "false"):
            return low == "true"
        if value in self.strings:
            return value
        self.fail(f"expected true, false or one of {', '.join(self.strings)}; got {value!r}", param, ctx)


class _ModuleList(click.ParamType):
    r"""`q_proj,v_proj` → ('q_proj', 'v_proj'); `q_proj` → ('q_proj',); `all-linear` stays a string (PEFT's keyword),
    and so does anything else that is not names and commas: a regex PEFT matches against whole module names
    (`.*\.mlp\..*`), as lora_sft takes it."""

    name = "modules"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, (list, tuple)):
            return tuple(value)
        if value == "all-linear" or not re.fullmatch(r"[\w\s,]*", str(value)):
            return value
        parts = [p.strip() for p in str(value).split(",") if p.strip()]
        if not parts:
            self.fail("expected module names separated by commas, e.g. q_proj,v_proj", param, ctx)
        return tuple(parts)


class _JsonDict(click.ParamType):
    name = "json"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, dict):
            return value
        try:
            out = json.loads(value)
        except json.JSONDecodeError as e:
            self.fail(f"expected a JSON object such as '{{\"q_proj\": 8}}'; {e.msg} at column {e.colno}", param, ctx)
        if not isinstance(out, dict):
            self.fail(f"expected a JSON object, got {type(out).__name__}", param, ctx)
        return out


class _IntOrAuto(click.ParamType):
    name = "INTEGER|auto"

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        if isinstance(value, int) or value == "auto":
            return value
        try:
            return int(value)
        except ValueError:
            self.fail(f"expected a whole number or 'auto', got {value!r}", param, ctx)


class _NumberOrNone(click.ParamType):
    """A number, or `none` for None: a field whose default is another value (`--save-total-limit none`), or one set
    in the --config file that the command line clears (`--max-steps none`)."""

    def __init__(self, inner: click.ParamType) -> None:
        self.inner, self.name = inner, f"{inner.name.upper()}|none"

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        if value is None or (isinstance(value, str) and value.strip().lower() == "none"):
            return None
        return self.inner.convert(value, param, ctx)


def _click_type(f: dataclasses.Field) -> tuple[Any, bool]:
    """(click type, is_flag) for a field, from its annotation string and its choices."""
    kinds = [t.strip() for t in str(f.type).split("|")]
    base = [k for k in kinds if k != "None"]
    choices = f.metadata.get("choices")
    if base == ["bool"]:
        return None, True
    if "bool" in base and choices:
        return _BoolOrChoice(choices), False
    if base == ["int", "str"]:
        return _IntOrAuto(), False
    if base[0].startswith("tuple"):
        return _ModuleList(), False
    if base[0].startswith("dict"):
        return _JsonDict(), False
    if choices:
        return click.Choice([c for c in choices if isinstance(c, str)]), False
    plains: dict[str, click.ParamType] = {"int": click.INT, "float": click.FLOAT, "str": click.STRING}
    plain = plains[base[0]]
    if "None" in kinds and base[0] != "str":  # None must be typed to be given
        return _NumberOrNone(plain), False
    return plain, False


def _default_text(default: Any) -> str:
    if default is dataclasses.MISSING:
        return "required: here or in --config"
    if default is None:
        return "none"
    if isinstance(default, bool):
        return str(default).lower()
    return str(default)


def option_name(field: str) -> str:
    """How the command line spells a config field: its short alias where it has one (`--data`), else `--kebab-case`."""
    return ALIASES.get(field, ["--" + field.replace("_", "-")])[0]


def option_for(f: dataclasses.Field) -> Callable:
    """The click option for one `LoraSftConfig` field."""
    ctype, is_flag = _click_type(f)
    kebab = "--" + f.name.replace("_", "-")
    names = [*ALIASES.get(f.name, []), kebab]
    help_text = f"{f.metadata.get('help', '')}  [default: {_default_text(f.default)}]"
    default = None if f.default is dataclasses.MISSING else f.default
    if is_flag:
        return click.option(f"{kebab}/--no-{kebab[2:]}", f.name, default=default, help=help_text)
    if isinstance(default, tuple):
        default = ",".join(default)
    return click.option(*names, f.name, type=ctype, default=default, help=help_text, show_default=False)


def config_options(func: Callable) -> Callable:
    """Decorate a click command with one option per `LoraSftConfig` field (in the dataclass's order)."""
    for f in reversed(dataclasses.fields(LoraSftConfig)):
        if f.name not in NOT_GENERATED:
            func = option_for(f)(func)
    return func


def cli_field_names() -> list[str]:
    """Field names that have a generated option (every field but those marked `cli=False`)."""
    return [f.name for f in dataclasses.fields(LoraSftConfig) if f.name not in NOT_GENERATED]


MAX_YAML_NODES = 100_000  # a YAML alias bomb expands to billions of values; a real config has a few dozen


@dataclasses.dataclass(frozen=True)
class ConfigFile:
    """A --config file read without raising for its keys: `values` (known keys), `issues` (unknown keys, a
    `callbacks` key), `lines` (key → line number, where the format tells us)."""

    path: Path
    values: dict[str, Any]
    issues: list[str]
    lines: dict[str, int]

    def where(self, key: str) -> str:
        return f"{self.path}:{self.lines[key]}" if key in self.lines else str(self.path)


def read_config_file(path: str | Path) -> ConfigFile:
    """Read a YAML or TOML run config (snake_case or kebab-case keys), or a run's own record (lora_sft_config.json, a
    YAML subset). Raises ConfigFileError only when the file cannot be parsed (naming the file and line); key problems
    are collected in `.issues`."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")  # a byte-order mark, as some Windows editors write, is skipped
    except UnicodeDecodeError as e:
        raise ConfigFileError(f"{p}: not UTF-8 text (byte {e.start}: {e.object[e.start:e.start + 1]!r}); save it "
                              "as UTF-8") from e
    repeated: list[tuple[str, int]] = []  # TOML refuses a repeated key itself
    try:
        if p.suffix == ".toml":
            data, lines = tomllib.loads(text), _toml_lines(text)
        else:
            data, lines, repeated = _load_yaml(p, text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as e:  # both messages carry the line and column
        raise ConfigFileError(f"{p}: cannot parse: {' '.join(str(e).split())}") from e
    if not isinstance(data, dict):
        raise ConfigFileError(f"{p}: expected a mapping of option: value, got {type(data).__name__}")
    issues = [f"`{key}` is set again on line {line}; keep one" for key, line in repeated]
    sets = {k: _field(k) for k in data}  # the file's key → the field it sets
    fields = list(sets.values())
    issues += [f"`{f}` is set twice ({' and '.join(str(k) for k, g in sets.items() if g == f)}); keep one"
               for f in dict.fromkeys(f for f in fields if fields.count(f) > 1)]
    data = {sets[k]: v for k, v in data.items()}
    lines = {_field(k): n for k, n in lines.items()}
    if p.suffix == ".json" and isinstance(data.get("resolved"), dict):  # a run's record (lora_sft_config.json): the
        data.pop("resolved")  # call's settings, less those at their defaults (a shard dir decided them) and those
        # whose default is "auto" (the record holds what the run decided there: the new run decides again)
        defaults = field_defaults()
        data = {k: v for k, v in data.items() if k not in defaults or (v != defaults[k] and defaults[k] != "auto")}
    if "callbacks" in data:
        data.pop("callbacks")
        issues.append("`callbacks` holds live Python objects (transformers TrainerCallbacks), which a config file "
                      "cannot: pass callbacks=[...] to lora_runtime.lora_sft() in Python, or drop the key")
    try:
        check_known_keys(data)
    except ConfigError as e:
        issues += e.issues
    known = set(cli_field_names())
    values = {k: tuple(v) if k == "target_modules" and isinstance(v, list) else v for k, v in data.items() if k in known}
    return ConfigFile(p, {k: _yaml11_bool(k, v) for k, v in values.items()}, issues, lines)


_YAML11_BOOLS = {"yes": True, "on": True, "no": False, "off": False}


def _yaml11_bool(name: str, value: Any) -> Any:
    """yes/no/on/off as YAML 1.1 reads them, for a field that takes a bool and has no such string choice
    (`bf16: yes` is True; `selective_recompute: off` stays the choice 'off')."""
    word = value.lower() if isinstance(value, str) else None
    if word not in _YAML11_BOOLS:
        return value
    f = next(f for f in dataclasses.fields(LoraSftConfig) if f.name == name)
    return value if "bool" not in str(f.type) or word in (f.metadata.get("choices") or ()) else _YAML11_BOOLS[word]


def _field(key: object) -> str:
    """The field a config file's key sets: snake_case or kebab-case, or the command line's name (`model`)."""
    return _FILE_ALIASES.get(str(key), str(key).replace("-", "_"))


def load_config_file(path: str | Path) -> dict[str, Any]:
    """The values of a --config file; ConfigFileError (unparsable) or ConfigError (every bad key) otherwise."""
    file = read_config_file(path)
    if file.issues:
        raise ConfigError(file.issues)
    return file.values


class _Loader(yaml.SafeLoader):
    """YAML 1.2's numbers and booleans: `2e-4` is a number (YAML 1.1, PyYAML's, reads an exponent without a dot as a
    string), `010` is ten and `1:40` a string (1.1 reads octal 8 and base-60 100; `0x10` and `0o10` are hex and
    octal, and 1.1's `1_000` is kept), and only true/false are booleans
    (YAML 1.1 also reads on/off/yes/no: `selective_recompute: off`; see `_yaml11_bool` for the fields where they still
    mean a bool)."""

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int | str:
        text = str(self.construct_scalar(node)).replace("_", "")
        sign, digits = (-1, text[1:]) if text.startswith("-") else (1, text.lstrip("+"))
        base = {"0x": 16, "0o": 8}.get(digits[:2].lower(), 10)
        try:
            return sign * int(digits[2:] if base != 10 else digits, base)
        except ValueError:  # `0x_`: no digits; the field's type check names it
            return str(self.construct_scalar(node))


_BOOL, _INT, _FLOAT = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_Loader.yaml_implicit_resolvers = {first: [(tag, rx) for tag, rx in resolvers if tag not in (_BOOL, _INT, _FLOAT)]
                                   for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(_FLOAT, re.compile(  # 1.1's, without its base 60 (`1:40.5`)
    r"^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+][0-9]+)?|\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?|[-+]?\.(?:inf|Inf|INF)"
    r"|\.(?:nan|NaN|NAN))$"), list("-+0123456789."))
_Loader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Loader.add_implicit_resolver(_INT, re.compile(r"^[-+]?(?:[0-9][0-9_]*|0[xX][0-9a-fA-F_]+|0[oO][0-7_]+)$"),
                              list("-+0123456789"))
_Loader.add_constructor(_INT, _Loader.construct_yaml_int)
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(
    r"^[-+]?(?:[0-9][0-9_]*\.?[0-9_]*|\.[0-9_]+)[eE][-+]?[0-9]+$"), list("-+0123456789."))
# the command line's names for the required options (--model, --data / --shards, --output) and --gpus, as keys
_FILE_ALIASES = {"model": "model_path", "data": "data_path", "shards": "data_path", "output": "ckpt_output_dir",
                 "gpus": "nproc_per_node"}


def _load_yaml(path: Path, text: str) -> tuple[Any, dict[str, int], list[tuple[str, int]]]:
    """yaml.safe_load (YAML 1.2's floats and booleans), bounded: the composed graph (aliases not expanded) is walked
    once, counting values. Also each top-level key's line, and the keys written twice (with the later line)."""
    node = yaml.compose(text, Loader=_Loader)
    if node is None:
        return {}, {}, []
    stack, seen = [node], 0
    while stack:
        n = stack.pop()
        seen += 1
        if seen > MAX_YAML_NODES:
            raise ConfigFileError(f"{path}: more than {MAX_YAML_NODES:,} values once its aliases (&x / *x) are "
                                  "expanded; a run config is a flat mapping of options")
        if isinstance(n, yaml.MappingNode):
            stack += [x for pair in n.value for x in pair]
        elif isinstance(n, yaml.SequenceNode):
            stack += n.value
    lines: dict[str, int] = {}
    repeated: list[tuple[str, int]] = []
    if isinstance(node, yaml.MappingNode):
        for k, _ in node.value:
            if isinstance(k, yaml.ScalarNode):
                if str(k.value) in lines:  # PyYAML keeps the last silently
                    repeated.append((str(k.value), k.start_mark.line + 1))
                lines.setdefault(str(k.value), k.start_mark.line + 1)
    return yaml.load(text, Loader=_Loader), lines, repeated  # _Loader is a SafeLoader


def _toml_lines(text: str) -> dict[str, int]:
    lines = {}
    for number, line in enumerate(text.splitlines(), 1):
        m = re.match(r"""\s*["']?([A-Za-z0-9_-]+)["']?\s*=""", line)
        if m and m[1] not in lines:
            lines[m[1]] = number
    return lines


def name_file_keys(issues: list[str], file: ConfigFile, typed: set[str]) -> list[str]:
    """Prefix an issue about a key the file set (and the command line did not) with `file:line: `, spelling the
    key as the file does; the rest keep their `field` form (shown as --options)."""
    out = []
    for issue in issues:
        m = re.search(r"`(\w+)`|\b(\w+)=", issue)
        key = m and (m[1] or m[2])
        unknown = issue.startswith(("unknown parameter", "`callbacks`")) or "ignored by training-hub" in issue
        if key and (unknown or (key in file.values and key not in typed)):
            issue = f"{file.where(key)}: " + re.sub(r"`(\w+)`", r"\1", issue)
        out.append(issue)
    return out


def given_on_command_line(ctx: click.Context, name: str) -> bool:
    return ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)


def merge_values(ctx: click.Context, params: dict[str, Any], file_values: dict[str, Any]) -> dict[str, Any]:
    """Dataclass defaults < --config file < options typed on the command line. Returns `lora_sft` keyword arguments:
    with the defaults lora_r=16, lora_alpha=32, a file giving lora_r=8, lora_alpha=16 and `--lora-r 4` typed, lora_r=4
    and lora_alpha=16."""
    values = {name: params[name] for name in cli_field_names() if name in params}
    out = {name: v for name, v in values.items() if v is not None or name not in REQUIRED}
    out.update(file_values)
    out.update({name: v for name, v in values.items() if given_on_command_line(ctx, name)})
    return out


def passthrough_args(ctx: click.Context, params: dict[str, Any]) -> list[str]:
    """The options the user typed, re-spelled for the command line (used to re-invoke `train` under torchrun).

    Only names present in `params` are passed on (so --dry-run and --debug never reach the workers).
    """
    args: list[str] = []
    for p in ctx.command.params:
        if not isinstance(p, click.Option) or p.name not in params or not given_on_command_line(ctx, p.name):
            continue
        value = params[p.name]
        long = max((o for o in p.opts if o.startswith("--")), key=len)
        if p.is_bool_flag or (p.secondary_opts and isinstance(value, bool)):
            args.append(long if value else p.secondary_opts[0])
        elif p.is_flag:
            if value:
                args.append(long)
        elif isinstance(value, tuple):
            args += [long, ",".join(value)]
        elif isinstance(value, dict):
            args += [long, json.dumps(value)]
        else:
            args += [long, os.fspath(value) if isinstance(value, os.PathLike) else str(value)]
    return args
