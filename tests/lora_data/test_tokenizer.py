"""Loading the tokenizer for prepare: hub ids (offline here), no torch, and the same fingerprint as the runtime's
`AutoTokenizer.from_pretrained(model)`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import _tiny
import lora_data
import pytest
from click.testing import CliRunner
from lora_data.cli import cli
from lora_data.options import VERSION
from lora_data.tokenizer import FastTokenizer, load_tokenizer

SRC = Path(__file__).parents[2] / "packages" / "lora-data" / "src" / "lora_data"


@pytest.fixture(autouse=True)
def tokenizer_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("LORA_DATA_TOKENIZER_CACHE", str(tmp_path / "tokcache"))
    return tmp_path / "tokcache"


@pytest.mark.parametrize("which", ["chatml_tokenizer_dir", "llama3_tokenizer_dir", "plain_tokenizer_dir",
                                   "tiny_qwen2_dir", "tiny_llama_dir"])
def test_the_fingerprint_is_the_one_the_runtime_computes(which, request, tokenizer_cache):
    """Shards prepared before still match, and the runtime's check (fingerprint of AutoTokenizer) still passes."""
    from transformers import AutoTokenizer

    directory = request.getfixturevalue(which)
    want = lora_data.tokenizer_fingerprint(AutoTokenizer.from_pretrained(directory))
    first, second = load_tokenizer(directory), load_tokenizer(directory)  # model dirs: transformers once, then cached
    assert lora_data.tokenizer_fingerprint(first) == lora_data.tokenizer_fingerprint(second) == want
    assert isinstance(second, FastTokenizer)
    assert bool(list(tokenizer_cache.glob("*.json"))) == which.startswith("tiny_")


def _config(d: Path, **changes) -> None:
    config = json.loads((d / "tokenizer_config.json").read_text()) | changes
    (d / "tokenizer_config.json").write_text(json.dumps(config))


VARIANTS = {  # what transformers reads into a generic tokenizer beyond tokenizer.json and tokenizer_config.json
    "special_tokens_map": lambda d: (_config(d, pad_token=None), (d / "special_tokens_map.json").write_text(
        json.dumps({"pad_token": "<|endoftext|>"}))),
    "additional_chat_templates": lambda d: ((d / "additional_chat_templates").mkdir(),
                                            (d / "additional_chat_templates" / "tool_use.jinja").write_text("{{ 1 }}")),
    "new_pad_token": lambda d: _config(d, pad_token="<newpad>"),
    "new_extra_special_token": lambda d: _config(d, extra_special_tokens=["<|im_start|>", "<tool>"]),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_a_generic_tokenizer_with_more_than_the_fast_path_reads_loads_as_transformers_does(
        variant, tmp_path, chatml_tokenizer_dir):
    import shutil

    from transformers import AutoTokenizer

    directory = tmp_path / variant
    shutil.copytree(chatml_tokenizer_dir, directory)
    VARIANTS[variant](directory)
    want = AutoTokenizer.from_pretrained(directory)
    got = load_tokenizer(directory)
    assert lora_data.tokenizer_fingerprint(got) == lora_data.tokenizer_fingerprint(want)
    assert (got.eos_token, got.pad_token) == (want.eos_token, want.pad_token)


def test_shards_are_byte_identical_whichever_loader(tmp_path, chatml_tokenizer_dir, tokenizers):
    data = _tiny.write_jsonl(tmp_path / "d.jsonl", _tiny.chat_records(80, seed=9))
    a = lora_data.prepare(data, tmp_path / "a", chatml_tokenizer_dir, max_seq_len=96, verbose=False)
    b = lora_data.prepare(data, tmp_path / "b", tokenizers["chatml"], max_seq_len=96, verbose=False)
    assert isinstance(load_tokenizer(chatml_tokenizer_dir), FastTokenizer)
    assert a.shards == b.shards and a.fingerprint == b.fingerprint and a.cache_key == b.cache_key


NO_TORCH = textwrap.dedent("""
    import sys
    from lora_data.cli import cli
    cli.main(["prepare", *sys.argv[1:]], prog_name="lora-data", standalone_mode=False)
    heavy = [m for m in ("torch", "transformers", "polars") if m in sys.modules]
    print("heavy:", heavy)
""")


def test_prepare_does_not_import_torch(tmp_path, chatml_tokenizer_dir, tiny_qwen2_dir):
    data = _tiny.write_jsonl(tmp_path / "d.jsonl", _tiny.chat_records(20, seed=2))
    env = {**os.environ, "LORA_DATA_TOKENIZER_CACHE": str(tmp_path / "tokcache")}
    load_tokenizer(tiny_qwen2_dir)  # a model dir: the first load (transformers) fills the cache
    for tok in (chatml_tokenizer_dir, tiny_qwen2_dir):
        proc = subprocess.run([sys.executable, "-c", NO_TORCH, str(data), str(tmp_path / tok.name), "--tokenizer",
                               str(tok), "--max-seq-len", "64"], capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "heavy: []" in proc.stdout, proc.stdout


def _offline_cli(args: list, hf_home: Path, cache: Path) -> subprocess.CompletedProcess:
    """huggingface_hub reads HF_* when imported: a fresh process per environment."""
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "LORA_DATA_TOKENIZER_CACHE": str(cache)}
    env.pop("HF_HUB_CACHE", None)
    code = "from lora_data.cli import main; main()"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=300)


def test_a_hub_id_offline_is_one_clear_line_or_loads_from_the_local_cache(tmp_path, chatml_tokenizer_dir):
    data = _tiny.write_jsonl(tmp_path / "d.jsonl", _tiny.chat_records(20, seed=2))
    hf_home = tmp_path / "hf"
    proc = _offline_cli(["prepare", data, tmp_path / "o1", "--tokenizer", "nobody/no-such-model", "--max-seq-len", 64],
                        hf_home, tmp_path / "c")
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("error: tokenizer: cannot get the tokenizer of hub repo 'nobody/no-such-model' "
                                  "(HF_HUB_OFFLINE is set")
    # the layout huggingface_hub keeps under HF_HOME/hub: refs/main → snapshots/<commit>/<files>
    repo = hf_home / "hub" / "models--someorg--tiny-chat"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in Path(chatml_tokenizer_dir).iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    proc = _offline_cli(["prepare", data, tmp_path / "o2", "--tokenizer", "someorg/tiny-chat", "--max-seq-len", 64],
                        hf_home, tmp_path / "c")
    assert proc.returncode == 0, proc.stderr[-2000:]
    manifest = json.loads((tmp_path / "o2" / "manifest.json").read_text())
    assert manifest["tokenizer"]["name_or_path"] == "someorg/tiny-chat"
    assert manifest["tokenizer"]["fingerprint"] == lora_data.tokenizer_fingerprint(load_tokenizer(chatml_tokenizer_dir))


def test_a_tokenizer_file_stands_for_its_directory(chatml_tokenizer_dir):
    by_file = load_tokenizer(str(chatml_tokenizer_dir / "tokenizer.json"))
    assert lora_data.tokenizer_fingerprint(by_file) == lora_data.tokenizer_fingerprint(
        load_tokenizer(chatml_tokenizer_dir))


def test_a_local_path_that_does_not_exist_is_not_sent_to_the_hub(tmp_path):
    res = CliRunner().invoke(cli, ["prepare", "-", str(tmp_path / "o"), "--tokenizer", str(tmp_path / "nope"),
                                   "--max-seq-len", "64"], input=b"")
    assert res.exit_code == 1 and res.output.startswith("error: tokenizer: tokenizer directory not found"), res.output


def test_version_and_no_private_transformers_api():
    res = CliRunner().invoke(cli, ["--version"])
    assert res.exit_code == 0 and res.output.strip() == f"lora-data {VERSION}"
    for path in SRC.rglob("*.py"):
        assert "_compile_jinja_template" not in path.read_text(), path


def test_the_fingerprint_cache_is_keyed_by_the_tokenizer_state(chatml_tokenizer_dir, tokenizer_cache, monkeypatch):
    import lora_data.fingerprint

    want = lora_data.tokenizer_fingerprint(load_tokenizer(chatml_tokenizer_dir))
    assert list(tokenizer_cache.glob("fp-*"))

    def boom(tok):
        raise AssertionError("recomputed although cached")

    monkeypatch.setattr(lora_data.fingerprint, "compute_fingerprint", boom)
    assert lora_data.tokenizer_fingerprint(load_tokenizer(chatml_tokenizer_dir)) == want  # read from the cache
    monkeypatch.undo()
    tok = load_tokenizer(chatml_tokenizer_dir)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert lora_data.tokenizer_fingerprint(tok) != want  # another template, another fingerprint: never a stale hit


def test_a_directory_without_tokenizer_files_says_so(tmp_path):
    from lora_data.tokenizer import load_tokenizer

    (tmp_path / "config.json").write_text("{}")  # a model's config alone
    with pytest.raises(lora_data.DataError, match=r"no tokenizer in .*: no tokenizer\.json, tokenizer_config\.json or "):
        load_tokenizer(tmp_path)
