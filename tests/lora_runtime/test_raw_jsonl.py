"""Raw JSONL through lora_sft: prepared by lora-data into a content-keyed cache (reused on the next run), eval data,
and the report_to integrations (wandb offline, TensorBoard)."""

from __future__ import annotations

import re

import _runs
import _tiny
import pytest
from lora_runtime import ConfigError, lora_sft
from lora_runtime.metrics import read_metrics

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    d = tmp_path_factory.mktemp("raw")
    return _tiny.write_jsonl(d / "train.jsonl", _tiny.chat_records(16, seed=3)), d


def test_raw_jsonl_is_prepared_once_and_reused_with_eval_and_reporting(raw, tiny_llama_dir, monkeypatch, capsys):
    jsonl, d = raw
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(d))
    monkeypatch.setenv("WANDB_SILENT", "true")
    kw = {**_runs.RUN, "max_steps": 3, "save_steps": 3, "data_output_dir": str(d / "cache")}
    first = lora_sft(str(tiny_llama_dir), str(jsonl), str(d / "run1"), **kw, eval_data_path=str(jsonl),
                     eval_steps=3, wandb_project="lora-runtime-tests", tensorboard_log_dir=str(d / "tb"))
    cached = list((d / "cache").iterdir())
    assert len(cached) == 1 and (cached[0] / "manifest.json").is_file()
    assert first.manifest.cache_key.startswith(cached[0].name)
    rows = read_metrics(first.metrics_path)
    assert any("eval_loss" in r for r in rows) and [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    assert list((d / "tb").rglob("events.out.tfevents.*")), "no TensorBoard event file"
    assert list(d.glob("wandb/offline-run-*")), "no offline wandb run"

    # same file, tokenizer and options: the cache entry is reused as is (checked without training again)
    from lora_runtime.config import LoraSftConfig
    from lora_runtime.data import ensure_shards

    mtime = (cached[0] / "manifest.json").stat().st_mtime_ns
    capsys.readouterr()
    config = LoraSftConfig(str(tiny_llama_dir), str(jsonl), str(d / "run2"), **kw)
    assert ensure_shards(config)[1].train_dir == cached[0]
    assert "reusing prepared shards" in capsys.readouterr().out
    assert (cached[0] / "manifest.json").stat().st_mtime_ns == mtime
    # another option → another key → another entry (prepare runs, no training needed)
    ensure_shards(LoraSftConfig(str(tiny_llama_dir), str(jsonl), str(d / "run3"), **{**kw, "train_on_inputs": True}))
    assert len(list((d / "cache").iterdir())) == 2


def test_eval_split_ratio_evaluates_on_the_lines_it_holds_out(raw, tiny_llama_dir, tmp_path, capsys):
    """The held-out share is evaluated every eval_steps, as eval_data_path is (it was held out and never used)."""
    jsonl, _ = raw
    kw = {**_runs.RUN, "max_steps": 4, "save_steps": 4, "data_output_dir": str(tmp_path / "cache")}
    result = lora_sft(str(tiny_llama_dir), str(jsonl), str(tmp_path / "run"), **kw, eval_split_ratio=0.25,
                      eval_steps=2)
    assert [r["step"] for r in read_metrics(result.metrics_path) if "eval_loss" in r] == [2, 4]
    assert result.eval_loss is not None
    assert "are training samples too" not in capsys.readouterr().out  # records held out are not trained on
    # the card's counts say where the held-out records went (it said "48 valid of 60 read (0 rejected, ...)")
    counts = result.manifest.counts
    assert (f"{counts['valid']} valid of {counts['lines_read']} read (0 rejected, 0 overlong dropped, "
            f"{counts['blank']} blank lines, the records eval_split_ratio=0.25 held out for eval among them)"
            ) in (tmp_path / "run" / "README.md").read_text()


def test_eval_samples_that_are_training_samples_too_are_counted(raw, tiny_llama_dir, tmp_path, capsys):
    """Eval data that repeats training records (here some of them, and one twice) measures what was trained on:
    said before training, counted token for token; nothing said where none repeat (the test above)."""
    import json

    jsonl, _ = raw
    lines = sorted(jsonl.read_text().splitlines(), key=len)  # the shortest: none is dropped as overlong
    fresh = [json.dumps({"messages": [{"role": "user", "content": f"unseen question {i}?"},
                                      {"role": "assistant", "content": f"unseen answer {i}."}]}) for i in range(3)]
    evals = tmp_path / "eval.jsonl"
    evals.write_text("\n".join([lines[0], lines[5], lines[5], *fresh]) + "\n")
    kw = {**_runs.RUN, "max_steps": 1, "data_output_dir": str(tmp_path / "cache")}
    lora_sft(str(tiny_llama_dir), str(jsonl), str(tmp_path / "run"), **kw, eval_data_path=str(evals))
    assert re.search(r"warning: 3 of the 6 eval samples in \S+ are training samples too \(the same tokens, in "
                     r"\S+\): eval_loss measures them after training on them", capsys.readouterr().out)


def test_eval_shards_with_another_loss_mask_than_the_training_shards_are_named(raw, tiny_llama_dir, tmp_path, capsys):
    """Eval shards prepared with the prompts in the loss, training shards without (or the reverse): eval_loss
    measured another objective, and the only line said "training as prepared" about the eval set."""
    from lora_runtime import LoraSftConfig
    from lora_runtime.data import ensure_shards

    jsonl, _ = raw
    kw = {**_runs.RUN, "data_output_dir": str(tmp_path / "cache")}
    answers = ensure_shards(LoraSftConfig(str(tiny_llama_dir), str(jsonl), str(tmp_path / "a"), **kw))[1].train_dir
    every = ensure_shards(LoraSftConfig(str(tiny_llama_dir), str(jsonl), str(tmp_path / "b"), **kw,
                                        train_on_inputs=True))[1].train_dir
    capsys.readouterr()
    ensure_shards(LoraSftConfig(str(tiny_llama_dir), str(answers), str(tmp_path / "c"), **kw, eval_data_path=str(every)))
    out = capsys.readouterr().out
    assert (f"warning: the eval shards in {every} were prepared with train_on_inputs=True, the training shards in "
            f"{answers} with train_on_inputs=False: eval_loss measures another objective") in out, out
    assert f"data: the shards in {every} were prepared with train_on_inputs=True (not the defaults): evaluating on " \
           "them as prepared" in out, out
    ensure_shards(LoraSftConfig(str(tiny_llama_dir), str(answers), str(tmp_path / "d"), **kw, eval_data_path=str(answers)))
    assert "another objective" not in capsys.readouterr().out


def test_a_raw_eval_file_is_read_with_the_training_shards_field_names(raw, tiny_llama_dir, tmp_path):
    """Training shards prepared with field_messages='conversations', a raw eval file of the same kind: every eval
    line was rejected ("messages: missing required field") where the config left field_messages at its default."""
    import json

    from lora_data import Manifest
    from lora_runtime import LoraSftConfig
    from lora_runtime.data import ensure_shards

    jsonl, _ = raw
    renamed = [json.dumps({"conversations": json.loads(line)["messages"]}) for line in jsonl.read_text().splitlines()]
    train, evals = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train.write_text("\n".join(renamed) + "\n")
    evals.write_text("\n".join(renamed[:4]) + "\n")
    kw = {**_runs.RUN, "data_output_dir": str(tmp_path / "cache")}
    shards = ensure_shards(LoraSftConfig(str(tiny_llama_dir), str(train), str(tmp_path / "a"), **kw,
                                         field_messages="conversations"))[1].train_dir
    _, got = ensure_shards(LoraSftConfig(str(tiny_llama_dir), str(shards), str(tmp_path / "b"), **kw,
                                         eval_data_path=str(evals)))
    assert got.eval_dir is not None and Manifest.load(got.eval_dir).counts["valid"] == 4


def test_options_one_cpu_process_has_no_use_for_are_said_to_be_ignored(tiny_llama_dir, llama_shards, tmp_path, capsys):
    """A memory budget without a GPU, and torchrun's rendezvous options for one process: accepted without a word."""
    lora_sft(str(tiny_llama_dir), str(llama_shards), str(tmp_path / "run"), **{**_runs.RUN, "max_steps": 1},
             max_memory_gib=4, rdzv_id="job", master_port=29555)
    out = capsys.readouterr().out
    assert "max_memory_gib=4 is a budget of GPU memory; this run is on the CPU: ignored" in out
    assert "rdzv_id, master_port: one process trains (no torchrun rendezvous): ignored" in out


def test_passthrough_is_refused_with_the_alternative(raw, tiny_llama_dir, tmp_path):
    jsonl, _ = raw
    with pytest.raises(ConfigError, match="use 'chat_template'"):
        lora_sft(str(tiny_llama_dir), str(jsonl), str(tmp_path / "o"), dataset_type="passthrough",
                 data_output_dir=str(tmp_path / "c"))


def test_missing_data_path_is_named_before_the_tokenizer_loads(tiny_llama_dir, tmp_path, monkeypatch):
    import transformers

    for name, kw in (("data_path", {}), ("eval_data_path", {"eval_data_path": str(tmp_path / "nope.jsonl")})):
        data = str(tmp_path / ("nope.jsonl" if name == "data_path" else "d.jsonl"))
        (tmp_path / "d.jsonl").write_text("{}\n")
        with monkeypatch.context() as m:
            m.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: pytest.fail("tokenizer loaded"))
            with pytest.raises(ConfigError, match=rf"`{name}`=.*nope.jsonl does not exist"):
                lora_sft(str(tiny_llama_dir), data, str(tmp_path / "o"), **kw)


def test_a_model_dir_without_its_tokenizer_is_named(tiny_llama_dir, tmp_path):
    import shutil

    weights_only = tmp_path / "weights_only"
    shutil.copytree(tiny_llama_dir, weights_only, ignore=lambda d, names: [n for n in names if "token" in n])
    (tmp_path / "d.jsonl").write_text("{}\n")
    with pytest.raises(ConfigError, match=r"`model_path`=.*weights_only has no tokenizer \(no tokenizer.json"):
        lora_sft(str(weights_only), str(tmp_path / "d.jsonl"), str(tmp_path / "o"))
    (weights_only / "tokenizer.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"`model_path`=.*weights_only: cannot load its tokenizer: "):
        lora_sft(str(weights_only), str(tmp_path / "d.jsonl"), str(tmp_path / "o"))


def test_a_cache_entry_another_process_holds_is_waited_for(tmp_path, capsys):
    """Two runs preparing the same raw file: the second waits for the first's lock, then reuses what it wrote."""
    import subprocess
    import sys
    import time

    from lora_runtime.data import cache_entry

    entry = tmp_path / "entry"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time, lora_data\n"
        f"with lora_data.locked({str(entry)!r}, what='the other run'):\n"
        "    print('held', flush=True); time.sleep(3)\n")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    start = time.monotonic()
    with cache_entry(entry, poll_s=0.2):
        waited = time.monotonic() - start
    holder.wait(timeout=30)
    assert waited > 1.0, waited
    out = capsys.readouterr().out
    assert out.count("waiting for another run preparing the same data") == 1 and f"pid {holder.pid}" in out


def test_a_second_run_on_the_same_raw_file_waits_for_the_first_and_uses_its_shards(raw, tiny_llama_dir, tmp_path,
                                                                                    capsys):
    """Issue 17.3: two runs preparing the same raw file into one data cache. The second waits on the entry's lock
    while the first prepares (here: a process that holds it, then puts finished shards in place), and then trains
    on those shards instead of preparing (or clobbering) them again."""
    import subprocess
    import sys

    from lora_runtime.config import LoraSftConfig
    from lora_runtime.data import ensure_shards

    jsonl, _ = raw
    kw = {**_runs.RUN, "data_output_dir": str(tmp_path / "elsewhere")}
    (prepared,) = [ensure_shards(LoraSftConfig(str(tiny_llama_dir), str(jsonl), str(tmp_path / "o"), **kw))[1].train_dir]
    entry = tmp_path / "cache" / prepared.name  # the same key: the same file, tokenizer and options
    first = subprocess.Popen([sys.executable, "-c", (
        "import shutil, sys, time, lora_data\n"
        f"with lora_data.locked({str(entry)!r}, what='the first run'):\n"
        "    print('held', flush=True); time.sleep(2)\n"
        f"    shutil.copytree({str(prepared)!r}, {str(entry)!r}, dirs_exist_ok=True, "
        "ignore=shutil.ignore_patterns('.lock'))\n")], stdout=subprocess.PIPE, text=True)
    assert first.stdout.readline().strip() == "held"
    capsys.readouterr()
    config = LoraSftConfig(str(tiny_llama_dir), str(jsonl), str(tmp_path / "o"), **{**kw, "data_output_dir": str(
        tmp_path / "cache")})
    assert ensure_shards(config)[1].train_dir == entry
    assert first.wait(timeout=30) == 0
    out = capsys.readouterr().out
    assert f"waiting for another run preparing the same data into {entry}" in out and f"pid {first.pid}" in out, out
    assert f"reusing prepared shards {entry} (prepared by another run meanwhile)" in out, out
    assert "preparing" not in out.replace("preparing the same data", ""), out


def test_a_wandb_run_the_caller_started_is_used_and_left_open(tiny_llama_dir, llama_shards, tmp_path, monkeypatch):
    """A script that opened its own wandb run (offline) before lora_sft keeps it open after the call, to log more."""
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    mine = wandb.init(project="lora-runtime-tests", dir=str(tmp_path))
    try:
        settings = {**_runs.RUN, "max_steps": 2, "save_steps": 2}
        lora_sft(str(tiny_llama_dir), str(llama_shards), str(tmp_path / "run"), **settings,
                 wandb_project="lora-runtime-tests")
        assert wandb.run is mine and not mine._is_finished
        mine.log({"after": 1.0})
    finally:
        mine.finish()


def test_wandb_without_a_login_is_one_error_naming_the_ways_out(tiny_llama_dir, llama_shards, tmp_path):
    """wandb asked for online with no API key and no terminal to prompt on: its UsageError was a 22-frame traceback.
    In a process of its own: wandb keeps settings of the offline runs of this one."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB")}
    env |= {"HOME": str(tmp_path), "NETRC": str(tmp_path / "none"), "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"}
    code = ("import sys\nfrom lora_runtime import ConfigError, lora_sft\ntry:\n"
            f"    lora_sft({str(tiny_llama_dir)!r}, {str(llama_shards)!r}, {str(tmp_path / 'run')!r}, "
            f"**{ {**_runs.RUN, 'max_steps': 1}!r}, wandb_project='p')\n"
            "except ConfigError as e:\n    print('ISSUES', *e.issues, sep='\\n')\n")
    res = subprocess.run([sys.executable, "-c", code], env=env, stdin=subprocess.DEVNULL, capture_output=True,
                         text=True, timeout=300)
    (said,) = res.stdout.partition("ISSUES\n")[2].splitlines() or [res.stdout[-3000:] + res.stderr[-3000:]]
    assert said.startswith("wandb reporting (wandb_project, wandb_entity, wandb_run_name or WANDB_PROJECT) cannot "
                           "start: No API key configured"), said
    assert said.endswith("Set WANDB_API_KEY, or WANDB_MODE=offline to log to files (`wandb sync` uploads them later)")


@pytest.mark.parametrize(("error", "code"), [(KeyboardInterrupt, 255), (RuntimeError, 1)])
def test_a_wandb_run_that_fails_finishes_with_the_exit_code_wandb_gives_it(tiny_llama_dir, llama_shards, tmp_path,
                                                                          monkeypatch, error, code):
    """A run stopped by a Ctrl-C that aborts (KeyboardInterrupt) ends with wandb's own code for it, 255; any other
    error with 1."""
    import wandb
    from transformers import TrainerCallback

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    finished = []
    real_finish = wandb.finish
    monkeypatch.setattr(wandb, "finish", lambda *a, **kw: (finished.append(kw.get("exit_code")),
                                                           real_finish(*a, **kw))[1])

    class Fails(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            raise error("stop")

    with pytest.raises(error):
        lora_sft(str(tiny_llama_dir), str(llama_shards), str(tmp_path / "run"), **{**_runs.RUN, "max_steps": 2},
                 wandb_project="lora-runtime-tests", callbacks=[Fails()])
    assert finished == [code] and wandb.run is None


def test_rejected_lines_are_named_every_run_by_their_line_in_data_path(tiny_llama_dir, tmp_path, capsys):
    """Each run says which lines of data_path do not train (a cache hit too), with line, field and reason; under
    eval_split_ratio the rejects keep the line numbers of data_path, not of the split files."""
    import json

    from lora_runtime.config import LoraSftConfig
    from lora_runtime.data import ensure_shards

    records = [json.dumps(r) for r in _tiny.chat_records(19, seed=4)]
    records.insert(7, json.dumps({"messages": [{"role": "bogus", "content": "x"}]}))  # line 8
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(records) + "\n")
    kw = {**_runs.RUN, "max_seq_len": 256, "data_output_dir": str(tmp_path / "cache")}
    for _ in range(2):  # prepared, then reused
        capsys.readouterr()
        _, shards = ensure_shards(LoraSftConfig(str(tiny_llama_dir), str(data), str(tmp_path / "o"), **kw))
        out = capsys.readouterr().out
        assert (f"data: 1 of 20 lines of {data} rejected, not trained (all in {shards.train_dir / 'rejects.jsonl'}): "
                'line 8, messages[0].role: expected one of system, user, assistant, tool; got "bogus"') in out, out
    _, split = ensure_shards(LoraSftConfig(str(tiny_llama_dir), str(data), str(tmp_path / "o"), **{**kw,
                                           "eval_split_ratio": 0.25, "seed": 3}))
    lines = [json.loads(x)["line"] for d in (split.train_dir, split.eval_dir)
             for x in (d / "rejects.jsonl").read_text().splitlines()]
    assert lines == [8]


def test_a_run_on_raw_jsonl_prepared_again_by_a_newer_lora_data_is_offered_its_earlier_shards(
        raw, tiny_llama_dir, tmp_path, monkeypatch):
    """An upgrade that changes how lora-data prepares records changes the shards' key: resuming on the unchanged
    file is refused (the data differs), naming the cached shards the run trained on, which resume it."""
    import lora_data.options

    jsonl, _ = raw
    kw = {**_runs.RUN, "max_steps": 2, "save_steps": 2, "data_output_dir": str(tmp_path / "cache")}
    first = lora_sft(str(tiny_llama_dir), str(jsonl), str(tmp_path / "run"), **kw)
    earlier = tmp_path / "cache" / first.manifest.cache_key[:20]
    monkeypatch.setattr(lora_data.options, "RECORD_RULES", lora_data.options.RECORD_RULES + 1)
    with pytest.raises(ConfigError, match=f"an upgrade\\): pass data_path={earlier}, the shards that run trained on"):
        lora_sft(str(tiny_llama_dir), str(jsonl), str(tmp_path / "run"), **kw)
    assert lora_sft(str(tiny_llama_dir), str(earlier), str(tmp_path / "run"), **kw).steps == 2


def test_a_damaged_cache_entry_is_named_as_the_cache_with_the_way_out(tiny_llama_dir, tmp_path):
    """A flipped byte in a cached shard failed every later run on that file with a sha256 error about a directory the
    user never made, and nothing said it could be removed."""
    from lora_data import ShardError
    from lora_runtime.batching import fixed_plan
    from lora_runtime.config import LoraSftConfig
    from lora_runtime.data import ensure_shards, open_datasets

    jsonl = _tiny.write_jsonl(tmp_path / "train.jsonl", _tiny.chat_records(8, seed=1))
    config = LoraSftConfig(str(tiny_llama_dir), str(jsonl), str(tmp_path / "run"), max_seq_len=256,
                           micro_batch_size=1, data_output_dir=str(tmp_path / "cache"))
    config, shards = ensure_shards(config)
    shard = next(shards.train_dir.glob("shard-*.bin"))
    blob = bytearray(shard.read_bytes())
    blob[-1] ^= 0xFF
    shard.write_bytes(bytes(blob))
    with pytest.raises(ShardError, match=r"sha256 does not match manifest.json \(corrupted or modified\); "
                                         rf"{re.escape(str(shards.train_dir))} is lora_sft's cache of the prepared raw "
                                         "data: remove it and run again to prepare it anew"):
        open_datasets(config, shards, fixed_plan(config, 1))


def test_raw_eval_data_is_prepared_as_the_training_shards_were(tiny_llama_dir, tmp_path):
    """Training shards prepared with train_on_inputs (the config's default defers to them) and a raw eval file: the
    eval file was prepared with the default, so eval_loss measured the answers alone against a loss over every
    token."""
    import lora_data
    from lora_runtime.config import LoraSftConfig
    from lora_runtime.data import ensure_shards

    train = _tiny.write_jsonl(tmp_path / "train.jsonl", _tiny.chat_records(8, seed=1))
    evals = _tiny.write_jsonl(tmp_path / "eval.jsonl", _tiny.chat_records(4, seed=2))
    lora_data.prepare(train, tmp_path / "shards", tiny_llama_dir, max_seq_len=256, train_on_inputs=True)
    config = LoraSftConfig(str(tiny_llama_dir), str(tmp_path / "shards"), str(tmp_path / "run"), max_seq_len=256,
                           eval_data_path=str(evals), data_output_dir=str(tmp_path / "cache"))
    _, shards = ensure_shards(config)
    assert shards.eval_dir is not None
    assert lora_data.Manifest.load(shards.eval_dir).options["train_on_inputs"] is True
