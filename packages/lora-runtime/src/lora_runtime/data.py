"""`ensure_shards(config) -> (config, Shards)`: make `data_path` a verified shard directory before any model is loaded.

- a directory with `manifest.json` is used as is; its row length is the run's `max_seq_len` unless the config asks
  for another (the default defers to the shards, as `lora-cli train --shards` and `lora_sft(model, DIR, out)` both do);
- a raw JSONL file is prepared through `lora_data.prepare` into `<cache>/<key>/`, where key = lora-data's cache key
  (sha256 of the file content, the tokenizer fingerprint and every preparation option); a second run reuses it;
- either way the manifest's tokenizer fingerprint must equal the model tokenizer's (TokenizerMismatchError shows
  both), and the shards' row length must equal `max_seq_len`.

Under torchrun global rank 0 prepares while the others wait at a barrier; on a node that does not share rank 0's
cache directory, its local rank 0 prepares the same (byte-identical) shards after that barrier.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_data import MANIFEST_NAME, DataError, Manifest
from lora_data.manifest import NOT_REJECTED

from lora_runtime.config import ConfigError, LoraSftConfig, field_defaults
from lora_runtime.distributed import barrier, dist_env, init_process_group, print0

if TYPE_CHECKING:
    from lora_runtime.batching import BatchPlan


@dataclass(frozen=True)
class Shards:
    train_dir: Path
    manifest: Any
    eval_dir: Path | None = None


def ensure_shards(config: LoraSftConfig) -> tuple[LoraSftConfig, Shards]:
    """Resolve train (and eval) data to verified shard dirs (raw JSONL is prepared and cached); returns the config
    with the shards' row length where it inherits it."""
    init_process_group()
    if issues := data_path_issues(config):  # before the tokenizer loads: a typo fails in a second
        raise ConfigError(issues)
    config = inherit_seq_len(config)
    tokenizer = model_tokenizer(config)
    apply_chat_template(config, tokenizer)
    train_path, eval_path = config.data_path, config.eval_data_path
    if config.eval_split_ratio:
        train_path, eval_path = split_eval(Path(config.data_path), config)
    train_dir = resolve(train_path, "data_path", config, tokenizer)
    manifest = Manifest.load(train_dir)
    eval_dir = None
    if eval_path:  # raw eval data is prepared as the training shards were (a shard dir's masking, overlong policy and
        # field names, which a config left at its defaults defers to): else eval_loss measured another objective, or
        # the eval file's records were all rejected for a field the training data names otherwise
        raw = not (Path(eval_path) / MANIFEST_NAME).is_file()
        baked = {k: v for k, v in prepared_options(manifest).items()  # as the training shards were prepared
                 if raw and k in ("train_on_inputs", "overlong", "field_messages", "field_instruction", "field_input",
                                  "field_output") and v is not None}
        eval_dir = resolve(eval_path, "eval_data_path", dataclasses.replace(config, **baked), tokenizer)
        if not raw:
            report_other_objective(train_dir, manifest, eval_dir)
        report_overlap(train_dir, eval_dir)
    return config, Shards(train_dir, manifest, eval_dir)


def report_other_objective(train_dir: Path, train: Any, eval_dir: Path) -> None:
    """Say where eval shards were prepared with another loss mask than the training shards (prompts in the loss on
    one side only): eval_loss then measures another objective than the training loss (a raw eval file is prepared
    with the training shards' masking)."""
    theirs = Manifest.load(eval_dir).options.get("train_on_inputs")
    ours = train.options.get("train_on_inputs")
    if None not in (theirs, ours) and theirs != ours:
        print0(f"warning: the eval shards in {eval_dir} were prepared with train_on_inputs={theirs!r}, the training "
               f"shards in {train_dir} with train_on_inputs={ours!r}: eval_loss measures another objective than the "
               "training loss (prepare the eval data as the training data was, or pass it as raw JSONL)")


OVERLAP_MAX_TOKENS = 1_000_000_000  # training tokens up to which report_overlap hashes every sample


def report_overlap(train_dir: Path, eval_dir: Path) -> None:
    """Say (rank 0) how many eval samples are training samples too, token for token (a record in both files, or
    given twice to the file eval_split_ratio splits): eval_loss then measures in part what the run trained on."""
    import numpy as np
    from lora_data import ShardReader

    if not dist_env().is_main:
        return
    train = ShardReader(train_dir, verify=False)
    tokens = int(train.manifest.counts.get("tokens") or 0)
    if tokens > OVERLAP_MAX_TOKENS:  # about a minute a billion tokens, while the other ranks wait
        print0(f"eval: not checked for samples that are training samples too ({tokens:,} training tokens, over "
               f"{OVERLAP_MAX_TOKENS:,})")
        return
    evals = ShardReader(eval_dir, verify=False).sample_keys()
    shared = int(np.isin(evals, train.sample_keys()).sum())
    if shared:
        print0(f"warning: {shared} of the {evals.size} eval samples in {eval_dir} are training samples too (the same "
               f"tokens, in {train_dir}): eval_loss measures them after training on them")


def model_tokenizer(config: LoraSftConfig) -> Any:
    """The tokenizer saved with `model_path`; a directory without one (weights only) is a ConfigError naming it."""
    from lora_data.tokenizer import lacks_tokenizer
    from transformers import AutoTokenizer

    if lacks_tokenizer(Path(config.model_path).expanduser()):
        raise ConfigError([f"`model_path`={config.model_path} has no tokenizer (no tokenizer.json, "
                           "tokenizer_config.json or vocabulary file): copy in the tokenizer files of the model it "
                           "was saved from"])
    try:
        return AutoTokenizer.from_pretrained(config.model_path, trust_remote_code=config.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError([f"`model_path`={config.model_path}: cannot load its tokenizer: "
                           + " ".join(str(e).split())]) from e


def inherit_seq_len(config: LoraSftConfig) -> LoraSftConfig:
    """A shard dir is packed to one row length: train at it unless max_seq_len was set to something else (an explicit
    other value is refused by `check_shards`: records over the shards' length were dropped or cut)."""
    shard_dir = Path(config.data_path)
    if not (shard_dir / MANIFEST_NAME).is_file():
        return config

    seq_len = Manifest.load(shard_dir).seq_len
    default = next(f.default for f in dataclasses.fields(LoraSftConfig) if f.name == "max_seq_len")
    if seq_len == config.max_seq_len or config.max_seq_len != default:
        return config
    print0(f"max_seq_len={seq_len}, the row length the shards in {shard_dir} were packed to")
    return dataclasses.replace(config, max_seq_len=seq_len)


CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def chat_template_text(name: str, tokenizer: Any) -> str:
    """`chat_template=`: inline Jinja, a file, 'chatml', 'default' (lora-data's), or one of the tokenizer's own
    named templates."""
    from lora_data.templates import DEFAULT_CHAT_TEMPLATE

    own = tokenizer.chat_template if isinstance(getattr(tokenizer, "chat_template", None), dict) else {}
    if "{{" in name or "{%" in name:
        return name
    if Path(name).expanduser().is_file():
        return Path(name).expanduser().read_text(encoding="utf-8")
    if name in own:
        return own[name]
    builtin = {"chatml": CHATML_TEMPLATE, "default": DEFAULT_CHAT_TEMPLATE}
    if name in builtin:
        return builtin[name]
    raise ConfigError([f"`chat_template`={name!r} is not a file, inline Jinja, one of {sorted(builtin)}"
                       + (f" or one of the tokenizer's templates {sorted(own)}" if own else "")])


def apply_chat_template(config: LoraSftConfig, tokenizer: Any) -> Any:
    """Put the config's chat template on `tokenizer` (the data is rendered with it and it is saved with the adapter,
    so inference formats prompts the way training did)."""
    if config.chat_template:
        tokenizer.chat_template = chat_template_text(config.chat_template, tokenizer)
        print0(f"chat template: {config.chat_template if len(config.chat_template) < 80 else 'inline'} "
               "(chat_template=), instead of the tokenizer's")
        if note := turn_end_note(tokenizer.chat_template, tokenizer):
            print0(f"warning: {note}")
    return tokenizer


def turn_end_note(template: str, tokenizer: Any) -> str | None:
    """A template that ends an assistant turn with ChatML's `<|im_end|>` on a tokenizer whose eos is another token
    trains the model to stop with `<|im_end|>`, which generation (transformers, vLLM) does not stop at unless told;
    on a tokenizer without that token the model learns it as several pieces, which no stop token catches."""
    end, eos = "<|im_end|>", getattr(tokenizer, "eos_token", None)
    if end not in template or eos == end:
        return None
    if tokenizer.convert_tokens_to_ids(end) in (None, getattr(tokenizer, "unk_token_id", None)):
        return (f"the chat template ends each turn with {end}, which this tokenizer has no token for: the model learns "
                "it as several pieces and generation cannot stop at it; use a template that ends turns with the "
                f"tokenizer's eos ({eos}), e.g. chat_template='default'")
    return (f"the chat template ends each turn with {end}, but this tokenizer's eos is {eos}: generation stops at "
            f"{eos}, so pass {end} as a stop token at inference (generate(eos_token_id=[...]), vLLM's stop_token_ids)")


def split_eval(data_file: Path, config: LoraSftConfig) -> tuple[str, str]:
    """`eval_split_ratio`: a seeded choice of the file's non-blank lines (of a `.json` array file: its elements; of a
    parquet/CSV/arrow file or a saved dataset: its rows) goes to eval, the rest to training; the two JSONL files live
    in the data cache, named by the content, ratio and seed (the same inputs give the same split). Each keeps every
    line where it was, the other file's lines blank, so a reject names its line in `data_path` (its element's or
    row's number)."""
    import hashlib
    import random

    raw = _split_source(data_file)
    key = hashlib.sha256(raw + f"|{config.eval_split_ratio}|{config.seed}|numbered".encode()).hexdigest()[:20]
    out = cache_root(config) / "splits" / key
    lines = raw.splitlines(keepends=True)
    if lines and not lines[-1].endswith(b"\n"):
        lines[-1] += b"\n"
    used = [i for i, line in enumerate(lines) if line.strip()]
    n_eval = max(1, round(len(used) * (config.eval_split_ratio or 0.0)))
    if n_eval >= len(used):
        raise ConfigError([f"`eval_split_ratio`={config.eval_split_ratio} leaves no training record of the "
                           f"{len(used)} in {data_file}"])
    held = set(random.Random(config.seed).sample(used, n_eval))
    for name, keep in (("train.jsonl", lambda i: i not in held), ("eval.jsonl", lambda i: i in held)):
        if not (out / name).is_file():
            out.mkdir(parents=True, exist_ok=True)
            tmp = out / f".{name}.{os.getpid()}.tmp"
            # the other file's lines blank: a reject's line number is the line's in data_path
            tmp.write_bytes(b"".join(line if keep(i) and line.strip() else b"\n" for i, line in enumerate(lines)))
            os.replace(tmp, out / name)
    print0(f"data: eval_split_ratio={config.eval_split_ratio}: {n_eval} of {len(used)} records of {data_file} held "
           f"out for eval (seed {config.seed}) → {out}")
    return str(out / "train.jsonl"), str(out / "eval.jsonl")


def _split_source(data_file: Path) -> bytes:
    """What `split_eval` splits, as JSON lines: a JSONL file's bytes (gzip read through), a `.json` array's elements,
    or a dataset's rows (row n on line n, as lora-data numbers them)."""
    import json

    from lora_data.records import GZIP_ERRORS, json_array, open_input
    from lora_data.rows import is_dataset, iter_rows, row_text

    if is_dataset(data_file):
        return b"".join(row_text(row).encode() + b"\n" for row in iter_rows(data_file))
    if not data_file.is_file():
        raise ConfigError([f"`data_path`={data_file} is not a file (eval_split_ratio splits a file of records: JSONL, "
                           "JSON, gzip, parquet, CSV, arrow, or a saved dataset dir)"])
    elements = json_array(data_file)
    if elements is not None:
        return b"".join(json.dumps(e, ensure_ascii=False).encode() + b"\n" for e in elements)
    try:
        with open_input(data_file) as f:
            return bytes(f.read())
    except GZIP_ERRORS as e:
        raise DataError(f"not a readable gzip file: {e}", path=data_file) from None


def resolve(path: str, name: str, config: LoraSftConfig, tokenizer: Any) -> Path:
    """One data path → a checked shard dir."""
    p = Path(path)  # a file, or a directory with manifest.json (ensure_shards checked: data_path_issues)
    if p.is_dir():
        shard_dir = p
    else:
        shard_dir = prepare_cached(p, config, tokenizer)
        report_losses(shard_dir, Path(getattr(config, name) or config.data_path))
    check_shards(shard_dir, config, tokenizer, name)
    return shard_dir


def report_losses(shard_dir: Path, data_file: Path) -> None:
    """Say, every run (a cache hit too), what of `data_file` does not train as written: rejected lines, the first
    three with line, field and reason, overlong records dropped, and reasoning the template leaves out; all of them
    are in the shards' rejects.jsonl."""
    import itertools
    import json

    manifest = Manifest.load(shard_dir)
    counts, listed = manifest.counts, shard_dir / "rejects.jsonl"
    if counts.get("rejected"):
        try:
            with open(listed, encoding="utf-8") as f:
                entries = (json.loads(line) for line in f if line.strip())
                first = list(itertools.islice((e for e in entries
                                               if not str(e.get("code", "")).startswith(NOT_REJECTED)), 3))
        except (OSError, ValueError):  # removed or edited by hand: the count stands alone
            first = []
        shown = "; ".join(f"line {e['line']}" + (f", {e['field']}" if e.get("field") else "") + f": {e['reason']}"
                          for e in first)
        more = "; ..." if counts["rejected"] > len(first) else ""
        print0(f"data: {counts['rejected']} of {counts['lines_read']} lines of {data_file} rejected, not trained "
               f"(all in {listed}): {shown}{more}")
    if counts.get("dropped"):
        policy = manifest.options.get("overlong")
        keep = "; overlong='truncate' or 'split' keeps them" if policy == "drop" else ""
        print0(f"data: {counts['dropped']} records of {data_file} longer than max_seq_len={manifest.seq_len} "
               f"dropped, not trained (overlong={policy!r}{keep}; listed in {listed})")
    if counts.get("reasoning_not_trained"):
        print0(f"data: {counts['reasoning_not_trained']} records of {data_file} hold reasoning the chat template "
               f"leaves out of the text; it is not trained, the rest of each record is (listed in {listed})")


def data_path_issues(config: LoraSftConfig) -> list[str]:
    """data_path and eval_data_path each a file, or a directory of prepared shards; raw data in a format lora-data
    prepares; ckpt_output_dir not a file (lora-cli's --dry-run checks them too)."""
    issues = []
    if Path(config.ckpt_output_dir).expanduser().is_file():
        issues.append(f"`ckpt_output_dir`={config.ckpt_output_dir} is a file, not a directory; pass a directory for "
                      "the run")
    if config.dataset_type not in FORMATS and Path(config.data_path).is_file():
        issues.append(_unprepared_format(config))
    for name in ("data_path", "eval_data_path"):
        path = getattr(config, name)
        if not path or Path(path).is_file():
            continue
        if Path(path).is_dir():
            if not (Path(path) / MANIFEST_NAME).is_file():
                issues.append(f"`{name}`={path} is a directory without manifest.json; pass a JSONL file, or a "
                              "directory made by `lora-cli prepare`")
        else:
            issues.append(f"`{name}`={path} {_why_not_a_file(Path(path))}")
    return issues


def _why_not_a_file(p: Path) -> str:
    """A data path that is neither a file nor a directory: stdin and named pipes are not read by training, which
    reads its data twice (the data cache's key is the bytes' hash, then the records are prepared); prepare reads them."""
    how = ("save it to a file, or prepare it first (`lora-cli prepare - OUT --tokenizer MODEL` reads stdin, and "
           "prepare reads a named pipe too) and train on OUT")
    if str(p) == "-":
        return f"(stdin) is not read by train; {how}"
    if p.exists():
        return f"is not a regular file (a named pipe, socket or device), which train cannot read twice; {how}"
    return "does not exist"


def check_shards(shard_dir: Path, config: LoraSftConfig, tokenizer: Any, name: str = "data_path") -> None:
    """Same tokenizer, rows packed to exactly max_seq_len; raise before training otherwise. `name`: the config field
    that named the shards."""
    from lora_data.errors import TokenizerMismatchError

    manifest = Manifest.load(shard_dir)
    if not manifest.rows:  # lora-data never writes one; a hand-made set can be empty
        use = "evaluate" if name == "eval_data_path" else "train"
        raise DataError(f"the shard set has no rows; nothing to {use} on", path=shard_dir / MANIFEST_NAME)
    try:
        manifest.check_tokenizer(tokenizer, path=shard_dir / MANIFEST_NAME, hint=f"model_path={config.model_path}")
    except TokenizerMismatchError as e:
        if config.chat_template is None:
            raise
        raise ConfigError([f"{shard_dir}: the shards were rendered with another chat template (or tokenizer) than "
                           f"chat_template={config.chat_template!r} on this model's (fingerprints {e.expected} and "
                           f"{e.actual}): a prepared shard dir is rendered already; pass the raw JSONL as data_path to "
                           "render it with this template, or drop chat_template"]) from e
    _check_vocab(shard_dir, config, tokenizer)
    if manifest.seq_len != config.max_seq_len:  # shorter rows too: records over their length were dropped or cut
        raise ConfigError([f"{shard_dir}: rows are packed to {manifest.seq_len} tokens but max_seq_len="
                           f"{config.max_seq_len}; pass max_seq_len={manifest.seq_len} or prepare the data again"])
    check_data_options(shard_dir, manifest, config, name)


def _check_vocab(shard_dir: Path, config: LoraSftConfig, tokenizer: Any) -> None:
    """A tokenizer with more tokens than the model has embeddings (tokens added, the model not resized): a shard id
    past them failed in the first step (an index error; on a GPU, a device-side assert). Read only then."""
    from lora_data import ShardReader
    from transformers import AutoConfig

    try:
        model_config = AutoConfig.from_pretrained(config.model_path, trust_remote_code=config.trust_remote_code)
        vocab = int(model_config.get_text_config().vocab_size)
    except Exception:  # no readable config here: the model load names the problem
        return
    if len(tokenizer) <= vocab:
        return
    largest = ShardReader(shard_dir, verify=False).max_token_id()
    if largest >= vocab:
        raise DataError(f"token id {largest} is past the model's {vocab} token embeddings (its tokenizer has "
                        f"{len(tokenizer)} tokens: some were added and the model was not resized). Resize it "
                        "(model.resize_token_embeddings(len(tokenizer)), then save it) or prepare the data with the "
                        "tokenizer it was trained with", path=shard_dir)


def _option(name: str) -> Callable[[Any], Any]:
    return lambda manifest: manifest.options.get(name)


# config field → how the manifest records it (prepare-time choices a shard directory has already made)
_BAKED_IN: dict[str, Callable[[Any], Any]] = {
    "sample_packing": lambda manifest: manifest.packing,
    "dataset_type": lambda manifest: {"messages": "chat_template", "alpaca": "alpaca"}.get(manifest.dataset_format),
    **{f: _option(f) for f in ("train_on_inputs", "overlong", "field_messages", "field_instruction", "field_input",
                               "field_output")}}


def prepared_options(manifest: Any) -> dict[str, Any]:
    """The config fields a shard dir fixed when it was prepared, with the values it recorded (None: not recorded)."""
    return {name: read(manifest) for name, read in _BAKED_IN.items()}


def prepared_differences(manifest: Any, values: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(option, the shards' value, the value in `values`) for each option a shard dir was prepared with otherwise
    than `values` say (passthrough aside: the shards are tokenized already)."""
    return [(option, baked, values[option]) for option, baked in prepared_options(manifest).items()
            if baked is not None and baked != values[option] and (option, values[option]) != ("dataset_type",
                                                                                               "passthrough")]


def check_data_options(shard_dir: Path, manifest: Any, config: LoraSftConfig, name: str = "data_path") -> None:
    """A shard dir fixed masking, packing, overlong policy and field names when it was prepared. A config value that
    differs from the default AND from the shards' is an error (it would be silently ignored); defaults defer to the
    shards, and the log says so. `name`: the config field that named the shards."""
    defaults = field_defaults()
    issues, inherited = [], []
    for option, baked, asked in prepared_differences(manifest, config.to_dict()):
        if asked != defaults[option]:
            issues.append(f"{shard_dir}: the shards were prepared with {option}={baked!r} but the config asks for "
                          f"{option}={asked!r}, which a prepared shard dir cannot honour; prepare the data again with "
                          "it (or pass the raw JSONL as data_path), or drop the option")
        else:
            inherited.append(f"{option}={baked!r}")
    if issues:
        raise ConfigError(issues)
    if inherited:
        use = "evaluating on them" if name == "eval_data_path" else "training"
        print0(f"data: the shards in {shard_dir} were prepared with {', '.join(inherited)} (not the defaults): {use} "
               "as prepared")


FORMATS = {"chat_template": "messages", "alpaca": "alpaca"}  # our dataset_type → lora-data's format


def prepare_options(config: LoraSftConfig, data_file: Path | None = None) -> dict[str, Any]:
    """The `lora_data.prepare` options that the config decides (every one is part of lora-data's cache key); with
    `data_file`, its record format as `record_format` settles it."""
    if config.dataset_type not in FORMATS:
        raise ConfigError([_unprepared_format(config)])
    fmt = FORMATS[config.dataset_type] if data_file is None else record_format(data_file, config)
    return {"max_seq_len": config.max_seq_len, "format": fmt,
            "field_messages": config.field_messages, "field_instruction": config.field_instruction,
            "field_input": config.field_input, "field_output": config.field_output, "overlong": config.overlong,
            "packing": config.sample_packing, "train_on_inputs": config.train_on_inputs, "seed": config.seed}


def _unprepared_format(config: LoraSftConfig) -> str:
    return (f"dataset_type={config.dataset_type!r} (pre-rendered text, tokenized by the trainer) is not supported: "
            "lora-data renders and masks records itself; use 'chat_template' (messages) or 'alpaca', or pass a "
            "prepared shard directory as data_path")


def record_format(data_file: Path, config: LoraSftConfig) -> str:
    """lora-data's format for `data_file`: the dataset_type's, except that the default (chat_template) yields to a
    file whose every record is Alpaca (instruction/output keys, none with the messages key), which the chat format
    would reject line by line; logged when it does. A dataset_type other than the default is never second-guessed."""
    import lora_data

    default = next(f.default for f in dataclasses.fields(LoraSftConfig) if f.name == "dataset_type")
    fmt = FORMATS[config.dataset_type]
    if config.dataset_type != default:
        return fmt
    fields = lora_data.Fields(messages=config.field_messages, instruction=config.field_instruction,
                              input=config.field_input, output=config.field_output)
    if not lora_data.is_alpaca_file(data_file, fields):
        return fmt
    print0(f"data: {data_file} holds Alpaca records ({config.field_instruction!r}/{config.field_output!r} keys, no "
           f"{config.field_messages!r}): training it as dataset_type='alpaca'")
    return "alpaca"


def cache_root(config: LoraSftConfig) -> Path:
    if config.data_output_dir:
        return Path(config.data_output_dir)
    if os.environ.get("LORA_DATA_CACHE"):
        return Path(os.environ["LORA_DATA_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "lora-sft" / "data"


def prepare_cached(data_file: Path, config: LoraSftConfig, tokenizer: Any) -> Path:
    """Prepare `data_file` once per (content, tokenizer, options) key; reuse the cached shards afterwards."""
    import lora_data

    options = prepare_options(config, data_file)
    key = lora_data.cache_key(data_file, tokenizer, **options)
    out = cache_root(config) / key[:20]
    if _cached(out, key):
        print0(f"data: reusing prepared shards {out} (same file content, tokenizer and options)")
        return out
    env = dist_env()
    if env.is_main:
        with cache_entry(out):
            if _cached(out, key):  # another run prepared it while this one waited
                print0(f"data: reusing prepared shards {out} (prepared by another run meanwhile)")
            else:
                print0(f"data: preparing {data_file} → {out}")
                lora_data.prepare(data_file, out, tokenizer, **options)
    barrier()
    if env.local_rank == 0 and not env.is_main and not _cached(out, key):  # another node, its own (unshared) cache
        print(f"[lora_runtime] rank {env.rank}: {out} is not shared with rank 0's node; preparing it here "
              "(byte-identical: same file, tokenizer and options)", flush=True)
        with cache_entry(out):
            if not _cached(out, key):
                lora_data.prepare(data_file, out, tokenizer, verbose=False, **options)
    barrier()
    if not _cached(out, key):
        raise RuntimeError(f"{out}: prepared shards are missing or carry another cache key after prepare; is another "
                           "process writing the same data_output_dir?")
    return out


@contextlib.contextmanager
def cache_entry(out: Path, *, poll_s: float = 2.0) -> Iterator[Path]:
    """Hold the cache entry's lock (lora_data.locked: released by the OS if this process dies); while another run
    holds it (preparing the same file with the same tokenizer and options), wait for it, saying so once."""
    import lora_data

    waited = False
    with contextlib.ExitStack() as stack:
        while True:
            try:
                stack.enter_context(lora_data.locked(out, what="lora_sft data cache"))
                break
            except lora_data.LockedError as e:
                if not waited:
                    print0(f"data: waiting for another run preparing the same data into {out} ({e})")
                    waited = True
                time.sleep(poll_s)
        yield out


def _cached(out: Path, key: str) -> bool:
    return (out / MANIFEST_NAME).is_file() and Manifest.load(out).cache_key == key


def open_datasets(config: LoraSftConfig, shards: Shards, plan: BatchPlan) -> tuple[Any, Any]:
    """(train, eval|None) PackedShardDatasets for this rank, laid out by the batch plan."""
    from lora_runtime.dataset import PackedShardDataset

    env = dist_env()
    micro = plan.micro
    with _cache_hint(config):
        train = PackedShardDataset(shards.train_dir, rank=env.rank, world_size=env.world_size, seed=config.seed,
                                   micro_batch_size=micro, grad_accum=plan.accumulation)
        evals = None
        if shards.eval_dir is not None:
            evals = PackedShardDataset(shards.eval_dir, rank=env.rank, world_size=env.world_size, seed=config.seed,
                                       shuffle=False, micro_batch_size=config.per_device_eval_batch_size or micro,
                                       mask_repeats=True)
    return train, evals


@contextlib.contextmanager
def _cache_hint(config: LoraSftConfig) -> Iterator[None]:
    """A damaged shard set in the raw-data cache (never the user's own) is named as such, with the way out: the same
    call with the entry removed prepares it again."""
    from lora_data import ShardError

    try:
        yield
    except ShardError as e:
        root = cache_root(config).resolve()
        entry = next((p for p in Path(e.path or "").resolve().parents  # an entry: named by its cache key
                      if p.parent == root and re.fullmatch("[0-9a-f]{20}", p.name)), None)
        if entry is None:
            raise
        raise ShardError(f"{e.message}; {entry} is lora_sft's cache of the prepared raw data: remove it and run "
                         "again to prepare it anew", path=e.path, field=e.field) from None
