"""The crash/fault/safety trial plan run by `_zygote.py` (one run per test session: the `trials` fixture)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
SEED = 20261128
STEPS = 6
RUN = {"backend": "peft", "bf16": False, "lora_r": 8, "lora_alpha": 16, "learning_rate": 5e-3, "warmup_steps": 1,
       "max_steps": STEPS, "micro_batch_size": 2, "save_steps": 1, "save_total_limit": 2, "seed": 0,
       "max_seq_len": 128}
HOOK_POINTS = ["step_begin", "step_end", "metrics", "staging", "fsync", "marker", "renamed", "rotate"]
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
        {"name": "remote-code", "out": str(root / "remote-code"), "model": str(root / "remote_code_model"),
         "attempts": [None]},
        {"name": "pickle", "out": str(root / "pickle"),
         "attempts": [{"point": "sigterm", "step": 2},
                      {"point": "tamper_pickle", "file": "optimizer.pt", "marker": str(root / "PICKLE_RAN")}]},
        *random_trials(root, 7, rng),
    ]
    remote = [{"from": "llama", "dir": str(root / "remote_code_model"), "marker": str(root / "REMOTE_CODE_RAN")}]
    return {"model": models["llama"]["dir"], "shards": shards[0]["dir"], "parallel": 2, "run": RUN,
            "build": {"tests_dir": str(HERE.parent), "models": models, "shards": shards, "remote_code": remote},
            "trials": trials, "root": str(root)}


def run_trials(root: Path) -> dict[str, dict]:
    (root / "plan.json").write_text(json.dumps(plan(root)))
    proc = subprocess.run([sys.executable, str(HERE / "_zygote.py"), str(root / "plan.json"), str(root / "res.json")],
                          capture_output=True, text=True, timeout=560)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {"root": str(root), **{t["name"]: t for t in json.loads((root / "res.json").read_text())}}
