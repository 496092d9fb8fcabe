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
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

HERE = Path(__file__).parent
SEED = 20261128
STEPS = 6
RUN = {"backend": "peft", "bf16": False, "lora_r": 8, "lora_alpha": 16, "learning_rate": 5e-3, "warmup_steps": 1,
       "max_steps": STEPS, "micro_batch_size": 2, "save_steps": 1, "save_total_limit": 2, "seed": 0,
       "max_seq_len": 128}
HOOK_POINTS = ["step_begin", "step_end", "staging", "fsync", "marker", "renamed", "rotate"]
SECRETS = {"WANDB_API_KEY": "wandb-SECRET-0f9e8d7c6b5a", "HF_TOKEN": "hf_SECRETtokenABCDEFGH",
           "HUGGING_FACE_HUB_TOKEN": "hf_SECREThubtoken12345", "MY_SERVICE_TOKEN": "svc-SECRET-77a1",
           "OPENAI_API_KEY": "sk-SECRET-openai-1234", "AWS_SECRET_ACCESS_KEY": "aws-SECRET-abcdef123"}


def random_trials(root: Path, n: int, rng: random.Random) -> list[dict]:
    """`n` trials of 3 SIGKILLs at increasing steps (every hook point used), every third one then a timer kill."""
    trials, points = [], [HOOK_POINTS[i % len(HOOK_POINTS)] for i in range(3 * n)]
    rng.shuffle(points)
    for t in range(n):
        steps = sorted(rng.sample(range(1, STEPS + 1), 3))
        mine = sorted(points[3 * t : 3 * t + 3], key=lambda p: p == "rotate")  # rotate last: its step is ≥ 3
        kills = []
        for step, point in zip(steps, mine, strict=True):
            kill = {"point": point, "step": step}
            if point == "fsync":
                kill["n"] = rng.randint(1, 8)
            kills.append(kill)
        if t % 3 == 0:  # wherever the timer lands (start-up, a step, a save, or after the end)
            kills.append({"point": "timer", "after_s": round(rng.uniform(1.0, 4.0), 2)})
        trials.append({"name": f"random-{t}", "out": str(root / f"random-{t}"), "attempts": [*kills, None]})
    return trials


def plan(root: Path) -> dict:
    rng = random.Random(SEED)
    models = {"llama": {"dir": str(root / "llama"), "arch": "llama", "template": "llama3"},
              "qwen2": {"dir": str(root / "qwen2"), "arch": "qwen2", "template": "chatml"}}
    shards = [{"dir": str(root / "shards"), "model": "llama", "n": 24, "max_seq_len": 128}]
    trials = [
        {"name": "reference", "out": str(root / "reference"), "attempts": [None]},
        {"name": "signals", "out": str(root / "signals"),
         "attempts": [{"point": "sigterm", "step": 2}, {"point": "sigint", "step": 4}, None]},
        {"name": "faults", "out": str(root / "faults"),
         "attempts": [{"point": "enospc", "step": 3}, {"point": "oom", "step": 4}, None]},
        {"name": "secrets", "out": str(root / "secrets"), "env": SECRETS,
         "attempts": [{"point": "staging", "step": 3}, None]},
        {"name": "other-tokenizer", "out": str(root / "other-tokenizer"), "model": models["qwen2"]["dir"],
         "attempts": [None]},
        {"name": "other-seq-len", "out": str(root / "other-seq-len"), "run": {"max_seq_len": 64},  # rows of 128
         "attempts": [None]},
        *random_trials(root, 7, rng),
    ]
    return {"model": models["llama"]["dir"], "shards": shards[0]["dir"], "parallel": 2, "run": RUN,
            "build": {"tests_dir": str(HERE.parent), "models": models, "shards": shards}, "trials": trials}


@pytest.fixture(scope="module")
def trials(tmp_path_factory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("crash")
    (root / "plan.json").write_text(json.dumps(plan(root)))
    proc = subprocess.run([sys.executable, str(HERE / "_zygote.py"), str(root / "plan.json"), str(root / "res.json")],
                          capture_output=True, text=True, timeout=560)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {t["name"]: t for t in json.loads((root / "res.json").read_text())}


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
    hint = [line for line in oom["log"].splitlines() if line.startswith("lora_runtime.trainer.OutOfMemoryHint")]
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
