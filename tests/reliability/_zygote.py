"""Crash-trial runner: import torch/transformers/peft once, then fork one real training process per attempt.

    python _zygote.py PLAN.json RESULTS.json

The kill points and faults are in `_faults.py`. Each attempt is a forked child (its own pid) that trains through lora-cli's in-process path (`_train_in_process`:
the real SIGINT/SIGTERM handling) and may be killed:

- by itself with SIGKILL at a named point (`kill: {"point": ..., "step": s}`), deterministic:
  step_begin   during optimizer step s, before its forward pass
  step_end     after step s's optimizer update, before its checkpoint
  staging      inside checkpoint s: adapter written, optimizer not yet
  fsync        inside checkpoint s's commit: at the n-th file fsync (`n`)
  marker       inside commit: COMPLETE written into the staging dir, not yet renamed
  renamed      inside commit: renamed to checkpoint-s, parent dir not yet fsync'd
  rotate       inside the rotation after checkpoint s: half of an old checkpoint's files deleted
  metrics      while appending step s's row to metrics.jsonl: half the line written
- by the parent with SIGKILL after `after_s` seconds (`kill: {"point": "timer", "after_s": t}`), anywhere;
- by a fault at step s that must end the run with a clear error, nothing lost: `enospc` (the disk fills during
  checkpoint s: fsync raises ENOSPC), `oom` (the forward pass of step s raises torch.OutOfMemoryError);
- not at all after `tamper_pickle` (the parent first swaps a checkpoint file for a malicious pickle);
- by itself with SIGTERM / SIGINT during step s (`kill: {"point": "sigterm"|"sigint", "step": s}`): must save and
  exit 130.

Between attempts the parent records what is on disk (every `checkpoint-*` dir, whether it is complete and whether
its files match the sizes listed in COMPLETE) and which checkpoint a restart must resume from. Up to `parallel`
trials run at once, each child on one thread. The parent never runs torch code itself (fork safety).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sys
import time
from pathlib import Path

# Heavy imports happen once, here, before any fork (the parent only imports: it never runs torch code).
import _faults as faults
import lora_data._prepare  # noqa: F401
import lora_runtime.api
import lora_runtime.backends.peft
import lora_runtime.data
import lora_runtime.dataset
import lora_runtime.loop  # noqa: F401
import matplotlib
import peft  # noqa: F401
import torch
import transformers  # noqa: F401
from lora_cli.main import _train_in_process
from lora_runtime.config import LoraSftConfig

matplotlib.use("Agg")  # the loss plot at the end of every finished run
import matplotlib.pyplot

_NAME = re.compile(r"^checkpoint-(\d+)$")


def snapshot(out: Path) -> dict:
    """Independent of the code under test: checkpoint-N dirs, complete or not, and whether their files are whole."""
    root = out / "checkpoints"
    dirs = []
    if root.is_dir():
        for p in sorted(root.iterdir()):
            m = _NAME.match(p.name)
            if not m or not p.is_dir():
                continue
            marker = p / "COMPLETE"
            entry = {"step": int(m.group(1)), "name": p.name, "complete": marker.is_file(), "whole": False}
            if entry["complete"]:
                listed = json.loads(marker.read_text())
                sizes = listed.get("bytes") or {}
                entry["whole"] = all((p / f).is_file() and (f not in sizes or (p / f).stat().st_size == sizes[f])
                                     for f in listed["files"])
            dirs.append(entry)
    complete = [d for d in dirs if d["complete"]]
    return {"dirs": dirs, "newest_complete": max(complete, key=lambda d: d["step"])["name"] if complete else None}


def child(plan: dict, trial: dict, index: int) -> None:
    out = Path(trial["out"])
    out.mkdir(parents=True, exist_ok=True)
    log = os.open(out / f"attempt-{index}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    torch.set_num_threads(1)
    os.environ.update(trial.get("env", {}))
    kill = trial["attempts"][index]
    try:
        callbacks = faults.install_kill(kill)
        cfg = LoraSftConfig(model_path=trial.get("model", plan["model"]), data_path=trial.get("shards", plan["shards"]),
                            ckpt_output_dir=str(out), callbacks=callbacks or None,
                            **{**plan["run"], **trial.get("run", {})})
        code = _train_in_process(cfg)
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 3
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def build(spec: dict) -> None:
    """In a forked child (the parent must not run torch code before forking): tiny models and prepared shards."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            sys.path.insert(0, spec["tests_dir"])
            import _tiny
            import lora_data

            for _name, m in spec["models"].items():
                tok = _tiny.build_tokenizer(Path(m["dir"]) / "tokenizer", template=m["template"])
                _tiny.build_model(m["dir"], arch=m["arch"], tokenizer_dir=tok)
            for r in spec.get("remote_code", []):
                faults.remote_code_model(spec["models"][r["from"]]["dir"], r["dir"], r["marker"])
            for s in spec["shards"]:
                data = _tiny.write_jsonl(Path(s["dir"]).with_suffix(".jsonl"), _tiny.chat_records(s["n"], seed=1))
                lora_data.prepare(data, s["dir"], spec["models"][s["model"]]["dir"], max_seq_len=s["max_seq_len"],
                                  verbose=False)
        except BaseException:
            import traceback

            traceback.print_exc()
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    if status != 0:
        raise SystemExit(f"building the tiny models / shards failed (status {status})")


def run(plan: dict) -> list[dict]:
    results = [{"name": t["name"], "out": t["out"], "attempts": []} for t in plan["trials"]]
    pending = list(range(len(plan["trials"])))
    running: dict[int, tuple[int, int, float, dict]] = {}  # pid -> (trial, attempt, start, before)
    next_attempt = [0] * len(plan["trials"])
    while pending or running:
        while pending and len(running) < plan.get("parallel", 2):
            t = pending.pop(0)
            i = next_attempt[t]
            spec = plan["trials"][t]["attempts"][i]
            if spec and spec["point"] == "tamper_pickle":
                out = Path(plan["trials"][t]["out"])
                faults.tamper_pickle(out / "checkpoints" / snapshot(out)["newest_complete"], spec["file"],
                                     spec["marker"])
            before = snapshot(Path(plan["trials"][t]["out"]))
            pid = os.fork()
            if pid == 0:
                child(plan, plan["trials"][t], i)
            running[pid] = (t, i, time.monotonic(), before)
        _send_timer_kills(plan, running)
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            time.sleep(0.05)
            continue
        t, i, start, before = running.pop(pid)
        trial = plan["trials"][t]
        results[t]["attempts"].append({
            "kill": trial["attempts"][i], "before": before,
            "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
            "exit": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
            "seconds": round(time.monotonic() - start, 2),
            "log": (Path(trial["out"]) / f"attempt-{i}.log").read_text(errors="replace"),
        })
        next_attempt[t] += 1
        if next_attempt[t] < len(trial["attempts"]):
            pending.insert(0, t)
        else:
            results[t]["after"] = snapshot(Path(trial["out"]))
    return results


def _send_timer_kills(plan: dict, running: dict) -> None:
    now = time.monotonic()
    for pid, (t, i, start, _) in running.items():
        kill = plan["trials"][t]["attempts"][i]
        if kill and kill["point"] == "timer" and not kill.get("_sent") and now - start >= kill["after_s"]:
            kill["_sent"] = True
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


if __name__ == "__main__":
    plan = json.loads(Path(sys.argv[1]).read_text())
    if plan.get("build"):
        build(plan["build"])
    Path(sys.argv[2]).write_text(json.dumps(run(plan), indent=1))
