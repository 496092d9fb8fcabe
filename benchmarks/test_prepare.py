"""Data-prep benchmark: lora_data.prepare vs the way TRL's SFTTrainer prepares the same corpus.

Fast by default (2,000 records, so CI's `--benchmark-disable` run stays quick: one round, no memory probe);
LORA_BENCH_FULL=1 uses 100,000, LORA_BENCH_RECORDS=N any number; LORA_BENCH_WORKERS=N sets prepare's workers. The default corpus is generated text with the tests'
1,000-token tokenizer (the kept baseline's definition); LORA_BENCH_CORPUS=docstrings uses real English instead:
Python docstrings as chat records (`_corpus.write_docstring_corpus`) with a BPE trained on them and padded to a
151,643-entry vocabulary (`_corpus.build_vocab_tokenizer`). extra_info also has the bare `encode_batch` time of the
same rendered texts on all cores (`encode_batch_s`, `vs_encode_batch` = its throughput ratio, ours ÷ bare). With the benchmark enabled, prepare runs ROUNDS times (a fresh output folder each)
and its peak resident memory is measured once in a fresh process (extra_info `peak_rss_mib`).
Both paths render the same template, mask to assistant tokens, and pack best-fit-decreasing to the same length:
  lora-data: lora_data.prepare(...) → shards on disk (validation, rejects, sha256, manifest included)
  TRL:       datasets JSON load → SFTTrainer._prepare_dataset(packing=True, packing_strategy="bfd",
             assistant_only_loss=True), i.e. map(apply_chat_template) + labels + trl.data_utils.pack_dataset
Run: LORA_BENCH_FULL=1 uv run pytest benchmarks/test_prepare.py --benchmark-enable -s
Regression gate against the kept baseline (recorded on a 2-core x86_64 CPU, see benchmarks/baselines/README.md):
    uv run pytest benchmarks/test_prepare.py --benchmark-enable --benchmark-json new.json
    uv run python -m benchmarks.compare benchmarks/baselines/prepare_cpu-2core.json new.json
"""

from __future__ import annotations

import itertools
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from benchmarks._corpus import (
    build_bench_tokenizer,
    build_vocab_tokenizer,
    docstrings,
    write_corpus,
    write_docstring_corpus,
)

FULL = os.environ.get("LORA_BENCH_FULL") == "1"
N_RECORDS = int(os.environ.get("LORA_BENCH_RECORDS") or (100_000 if FULL else 2_000))
CORPUS = os.environ.get("LORA_BENCH_CORPUS", "generated")
WORKERS = int(os.environ.get("LORA_BENCH_WORKERS") or 0) or None  # prepare's render processes (default: all cores)
SEQ_LEN = 4096
ROUNDS = 5

PEAK_RSS = """
import resource, sys
import lora_data
from transformers import AutoTokenizer
lora_data.prepare(sys.argv[1], sys.argv[2], AutoTokenizer.from_pretrained(sys.argv[3]), max_seq_len=int(sys.argv[4]))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def peak_rss_mib(path: Path, out: Path, tokenizer_dir: Path) -> float:
    """Peak resident memory (MiB) of a fresh process that imports lora_data and prepares the corpus."""
    done = subprocess.run([sys.executable, "-c", PEAK_RSS, str(path), str(out), str(tokenizer_dir), str(SEQ_LEN)],
                          capture_output=True, text=True, check=True)
    return float(done.stdout.split()[-1])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    import _tiny

    d = tmp_path_factory.mktemp("bench_prepare")
    if CORPUS == "docstrings":
        docs = docstrings()
        path = write_docstring_corpus(d / "chat.jsonl", N_RECORDS, docs=docs)
        return path, build_vocab_tokenizer(d / "tok", [doc for _, doc in docs])
    return write_corpus(d / "chat.jsonl", N_RECORDS, vocab=_tiny._WORDS.split()), build_bench_tokenizer(d / "tok")


def bare_encode_s(path: Path, tok) -> float:
    """Seconds of the tokenizer's own `encode_batch` (all cores) over the texts prepare renders from `path`."""
    from lora_data.records import Record, read_records
    from lora_data.render import Renderer

    messages = [r.messages for r in read_records(path) if isinstance(r, Record)]
    renderer = Renderer(tok)
    texts = [r.text for i in range(0, len(messages), 2048) for r in renderer.render_batch(messages[i : i + 2048])]
    t0 = time.perf_counter()
    tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    return time.perf_counter() - t0


def trl_prepare(path: Path, tokenizer_dir: Path, seq_len: int):
    """TRL's own preparation code, called the way SFTTrainer.__init__ calls it (no model needed)."""
    import datasets
    from transformers import AutoTokenizer
    from trl import SFTConfig
    from trl.trainer.sft_trainer import SFTTrainer

    datasets.disable_caching()
    datasets.disable_progress_bars()
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    args = SFTConfig(output_dir=str(path.parent / "trl_out"), max_length=seq_len, packing=True,
                     packing_strategy="bfd", assistant_only_loss=True, report_to=[], dataset_num_proc=None, bf16=False, use_cpu=True)
    trainer = SimpleNamespace(_tokenizer=tok, completion_only_loss=None, chat_template=None)
    t0 = time.perf_counter()
    ds = datasets.load_dataset("json", data_files=str(path), split="train", keep_in_memory=True)
    ds = SFTTrainer._prepare_dataset(trainer, ds, tok, args, packing=True, formatting_func=None, dataset_name="train")
    seconds = time.perf_counter() - t0
    lengths = [sum(s) for s in ds["seq_lengths"]]
    return seconds, sum(lengths), len(ds)


@pytest.mark.timeout(3600 if FULL else 600)
def test_prepare_vs_trl(benchmark, corpus, tmp_path):
    import lora_data

    path, tok_dir = corpus
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    outs = (tmp_path / f"shards{i}" for i in itertools.count())
    seconds: list[float] = []

    def timed_prepare(*args, **kwargs):
        t0 = time.perf_counter()
        manifest = lora_data.prepare(*args, **kwargs)
        seconds.append(time.perf_counter() - t0)
        return manifest

    def fresh_output():
        out = next(outs)
        return (path, out, tok), {"max_seq_len": SEQ_LEN, "workers": WORKERS}

    manifest = benchmark.pedantic(timed_prepare, setup=fresh_output, rounds=ROUNDS, iterations=1)
    out = tmp_path / f"shards{len(seconds) - 1}"
    ours = statistics.median(seconds)
    c = manifest.counts
    assert c["valid"] == N_RECORDS and c["overlong"] == 0 and c["rows"] == len(lora_data.ShardReader(out))

    encode_s = bare_encode_s(path, tok)
    trl_s, trl_tokens, trl_rows = trl_prepare(path, tok_dir, SEQ_LEN)
    trl_eff = trl_tokens / (trl_rows * SEQ_LEN)
    info = {
        "corpus": CORPUS, "vocab": len(tok), "cores": len(os.sched_getaffinity(0)), "workers": WORKERS or "cores",
        "records": N_RECORDS, "seq_len": SEQ_LEN, "tokens": c["tokens"], "loss_tokens": c["loss_tokens"],
        "lora_data_s": round(ours, 2), "records_per_s": round(N_RECORDS / ours), "tokens_per_s": round(c["tokens"] / ours),
        "packing_efficiency": manifest.packing_efficiency, "rows": c["rows"],
        "trl_s": round(trl_s, 2), "trl_records_per_s": round(N_RECORDS / trl_s), "trl_rows": trl_rows,
        "trl_packing_efficiency": round(trl_eff, 6), "speedup_vs_trl": round(trl_s / ours, 2),
        "encode_batch_s": round(encode_s, 2), "vs_encode_batch": round(encode_s / ours, 2),
        "rounds": len(seconds), "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    if not benchmark.disabled:
        info["peak_rss_mib"] = round(peak_rss_mib(path, tmp_path / "shards_rss", tok_dir), 1)
    benchmark.extra_info.update(info)
    print("\n" + "\n".join(f"  {k}: {v}" for k, v in info.items()))
    assert trl_tokens == c["tokens"], "both paths must tokenize the corpus to the same number of tokens"
    assert manifest.packing_efficiency >= trl_eff - 1e-9
    if FULL:
        assert manifest.packing_efficiency >= 0.97
