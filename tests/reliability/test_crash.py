"""Crash mid-training: real processes SIGKILLed at seeded points (in a step, in every phase of a checkpoint write,
in the rotation, on a timer), SIGTERM/SIGINT, a full disk and an out-of-memory error, each followed by a restart.

One runner (`_zygote.py`) imports torch/transformers/peft once and forks a fresh training process per attempt, so a
trial costs seconds, not an import. What every trial must show:

- the final adapter equals the uninterrupted run's, bit for bit, and metrics.jsonl has each step exactly once;
- no `checkpoint-<step>` directory is ever incomplete or missing a byte of what its COMPLETE marker lists;
- each restart resumes from the newest complete checkpoint (or starts fresh when there is none).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

from _crash_plan import HOOK_POINTS, SECRETS, STEPS  # noqa: E402


def adapter(out: str | Path) -> dict:
    from safetensors.numpy import load_file

    return load_file(Path(out) / "adapter_model.safetensors")


def assert_same_adapter(out: str, reference: str) -> None:
    want, got = adapter(reference), adapter(out)
    assert want.keys() == got.keys()
    for k in want:
        assert (want[k] == got[k]).all(), f"{out}: {k} differs from the uninterrupted run"


def assert_finished_like_reference(trial: dict, reference: dict) -> None:
    last = trial["attempts"][-1]
    assert last["exit"] == 0, last["log"][-3000:]
    assert_same_adapter(trial["out"], reference["out"])
    steps = [json.loads(line)["step"] for line in (Path(trial["out"]) / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1)), f"{trial['name']}: steps logged {steps}"


def assert_never_half_written(trial: dict) -> None:
    for i, a in enumerate([*trial["attempts"], {"before": trial["after"]}]):
        for d in a["before"]["dirs"]:
            assert d["complete"] and d["whole"], f"{trial['name']} before attempt {i}: {d} is visible half-written"


def assert_resumed_from_newest(trial: dict) -> None:
    for i, a in enumerate(trial["attempts"]):
        newest = a["before"]["newest_complete"]
        said = re.findall(r"resuming from (\S+) \(step", a["log"])
        if a["signal"] == 9 and not said and a["kill"] and a["kill"]["point"] == "timer":
            continue  # killed before it got to decide
        if newest is None:
            assert not said, f"{trial['name']} attempt {i} resumed from {said} with no complete checkpoint"
        else:
            assert said == [str(Path(trial["out"]) / "checkpoints" / newest)], \
                f"{trial['name']} attempt {i}: newest complete is {newest}, resumed from {said}"


def test_sigkill_anywhere_then_restart_equals_the_uninterrupted_run(trials, counts):
    reference = trials["reference"]
    assert reference["attempts"][0]["exit"] == 0, reference["attempts"][0]["log"][-3000:]
    kills, points = 0, set()
    for name, trial in trials.items():
        if not name.startswith("random-"):
            continue
        for a in trial["attempts"][:-1]:
            if a["kill"]["point"] != "timer":
                assert a["signal"] == 9, f"{name}: {a['kill']} did not fire: {a['log'][-2000:]}"
            if a["signal"] == 9:
                kills += 1
                points.add(a["kill"]["point"])
        assert_never_half_written(trial)
        assert_resumed_from_newest(trial)
        assert_finished_like_reference(trial, reference)
    assert kills >= 20 and points >= set(HOOK_POINTS), (kills, points)
    counts.add("crash_trials", sum(n.startswith("random-") for n in trials))
    counts.add("sigkills_survived", kills)


def test_sigterm_and_sigint_save_a_checkpoint_and_exit_130(trials, counts):
    trial = trials["signals"]
    for a, nxt in zip(trial["attempts"], trial["attempts"][1:], strict=False):
        step, name = a["kill"]["step"], a["kill"]["point"].upper()
        assert a["exit"] == 130 and a["signal"] is None, a["log"][-3000:]
        assert f"stopped by SIG{name[3:]} after step {step}" in a["log"]
        assert nxt["before"]["newest_complete"] == f"checkpoint-{step}"  # saved the very step it stopped after
        counts.add("signal_stops_saved")
    assert_never_half_written(trial)
    assert_resumed_from_newest(trial)
    assert_finished_like_reference(trial, trials["reference"])


def test_full_disk_during_a_checkpoint_keeps_the_previous_one_and_says_so(trials, counts):
    trial = trials["faults"]
    full, after = trial["attempts"][0], trial["attempts"][1]["before"]
    assert full["signal"] is None and full["exit"] not in (0, None)
    assert "disk full (No space left on device) while writing checkpoint-3" in full["log"]
    assert "the previous checkpoint" in full["log"] and "checkpoint-2 is intact" in full["log"]
    assert after["newest_complete"] == "checkpoint-2" and all(d["whole"] for d in after["dirs"])
    assert not list((Path(trial["out"]) / "checkpoints").glob(".tmp-checkpoint-3")), "partial write left behind"
    counts.add("disk_full_survived")


def test_out_of_memory_names_the_knobs(trials, counts):
    trial = trials["faults"]
    oom = trial["attempts"][1]
    assert oom["signal"] is None and oom["exit"] not in (0, None)
    hint = [line for line in oom["log"].splitlines() if line.startswith("lora_runtime.errors.OutOfMemoryHint")]
    assert hint, oom["log"][-3000:]
    for knob in ("micro_batch_size", "max_seq_len", "load_in_4bit", "step 4"):
        assert knob in hint[0]
    assert_finished_like_reference(trial, trials["reference"])  # and nothing was lost by either fault
    counts.add("oom_explained")


def test_secrets_in_the_environment_never_reach_any_output_file(trials, counts):
    trial = trials["secrets"]
    assert_finished_like_reference(trial, trials["reference"])
    files = [p for p in Path(trial["out"]).rglob("*") if p.is_file()]
    assert any(p.name == "optimizer.pt" for p in files) and any(p.suffix == ".log" for p in files)
    for p in files:  # adapter, tokenizer, configs, metrics, every checkpoint file (pickles too), and the logs
        blob = p.read_bytes()
        for name, value in SECRETS.items():
            assert value.encode() not in blob, f"{name}'s value leaked into {p}"
    counts.add("files_scanned_for_secrets", len(files))


def test_shards_of_another_tokenizer_or_seq_len_are_refused_before_training(trials, counts):
    for name, expect in (("other-tokenizer", "tokenizer fingerprint mismatch"), ("other-seq-len", "rows are packed to 128 tokens but max_seq_len=64")):
        a = trials[name]["attempts"][0]
        assert a["exit"] not in (0, None), a["log"][-2000:]
        assert expect in a["log"], a["log"][-2000:]
        assert "'loss'" not in a["log"] and not (Path(trials[name]["out"]) / "checkpoints").exists()
        counts.add("mismatched_shards_refused")
