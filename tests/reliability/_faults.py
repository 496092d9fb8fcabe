"""Kill points and faults for the crash trials, installed inside a forked training process (see _zygote.py).

`install_kill({"point": ..., "step": s, ...})` patches the process so it dies (SIGKILL), is signalled, or meets a
fault at that point, and returns the TrainerCallbacks that time it. The parent's faults (`tamper_pickle`,
`remote_code_model`) prepare files and never run torch code.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import shutil
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

import lora_runtime.checkpoint as ckpt
import lora_runtime.metrics as metrics_mod
import lora_runtime.trainer as trainer_mod


def die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class Kill:
    point: str
    step: int = 0
    n: int = 1
    in_step: list = field(default_factory=lambda: [False])  # True during optimizer step `step`

    @property
    def staged(self) -> str:
        return f".tmp-checkpoint-{self.step}"


def install_kill(spec: dict | None) -> list:
    """Patch this (child) process for `spec`; returns extra Trainer callbacks."""
    if not spec or spec["point"] in ("timer", "tamper_pickle"):
        return []
    kill = Kill(spec["point"], spec.get("step", 0), spec.get("n", 1))
    PATCHES.get(kill.point, lambda k: None)(kill)
    return [step_hook(kill)]


def step_hook(kill: Kill):
    """step_begin / step_end kills, SIGTERM/SIGINT during the step, and the in-step flag the OOM fault reads."""
    from transformers import TrainerCallback

    class Hook(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            kill.in_step[0] = state.global_step == kill.step - 1
            if kill.in_step[0] and kill.point == "step_begin":
                die()
            if kill.in_step[0] and kill.point in ("sigterm", "sigint"):
                os.kill(os.getpid(), signal.SIGTERM if kill.point == "sigterm" else signal.SIGINT)

        def on_step_end(self, args, state, control, **kw):
            if kill.point == "step_end" and state.global_step == kill.step:
                die()

    return Hook()


def staging(kill: Kill) -> None:
    """Inside checkpoint `step`: the adapter is written, the optimizer not yet."""
    real = trainer_mod.PackedTrainer._save_optimizer_and_scheduler

    def save_opt(self, output_dir):
        if self.state.global_step == kill.step:
            die()
        return real(self, output_dir)

    trainer_mod.PackedTrainer._save_optimizer_and_scheduler = save_opt


def fsync(kill: Kill) -> None:
    """At the n-th file fsync of checkpoint `step`'s commit."""
    real, seen = ckpt._fsync_file, [0]

    def fsync_file(path):
        real(path)
        if kill.staged in str(path):
            seen[0] += 1
            if seen[0] == kill.n:
                die()

    ckpt._fsync_file = fsync_file


def commit_dir(kill: Kill) -> None:
    """`marker`: COMPLETE written, not yet renamed; `renamed`: renamed, the parent dir not yet fsync'd."""
    real = ckpt._fsync_dir

    def fsync_dir(path):
        path = Path(path)
        if kill.point == "marker" and path.name == kill.staged:
            die()
        real(path)
        if kill.point == "renamed" and path.name == "checkpoints" and (path / f"checkpoint-{kill.step}").is_dir():
            die()

    ckpt._fsync_dir = fsync_dir


def rotate(kill: Kill) -> None:
    """In the rotation after checkpoint `step`: half an old checkpoint's files deleted (COMPLETE last)."""
    real_rmtree, real_rotate, committed = shutil.rmtree, ckpt.rotate, [False]

    def rotate_(root, keep):
        committed[0] = (Path(root) / f"checkpoint-{kill.step}").is_dir()
        return real_rotate(root, keep)

    def rmtree(path, *a, **kw):
        files = sorted((p for p in Path(path).rglob("*") if p.is_file()), reverse=True)  # COMPLETE sorts first
        if committed[0] and files:
            for f in files[: max(1, len(files) // 2)]:
                f.unlink()
            die()
        return real_rmtree(path, *a, **kw)

    ckpt.rotate = trainer_mod.checkpoint.rotate = rotate_
    shutil.rmtree = rmtree


def metrics(kill: Kill) -> None:
    """While appending step `step`'s row to metrics.jsonl: half the line written."""
    real = metrics_mod.MetricsWriter.write

    def torn_write(self, row):
        if row.get("step") == kill.step:
            line = json.dumps(row, sort_keys=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line[: len(line) // 2])
                f.flush()
                os.fsync(f.fileno())
            die()
        return real(self, row)

    metrics_mod.MetricsWriter.write = torn_write


def enospc(kill: Kill) -> None:
    """The disk fills during checkpoint `step`: its fsyncs raise ENOSPC."""
    real = ckpt._fsync_file

    def full_disk(path):
        if kill.staged in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path)

    ckpt._fsync_file = full_disk


def oom(kill: Kill) -> None:
    """The forward pass of step `step` raises torch.OutOfMemoryError."""
    import torch
    from transformers.models.llama.modeling_llama import LlamaForCausalLM

    real = LlamaForCausalLM.forward

    def forward(self, *a, **kw):
        if kill.in_step[0]:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return real(self, *a, **kw)

    LlamaForCausalLM.forward = forward


PATCHES = {"staging": staging, "fsync": fsync, "marker": commit_dir, "renamed": commit_dir, "rotate": rotate,
           "metrics": metrics, "enospc": enospc, "oom": oom}


def tamper_pickle(ckpt_dir: Path, name: str, marker: str) -> None:
    """Replace `name` in a checkpoint by a pickle that runs a command when unpickled, and rewrite COMPLETE to match
    (what an attacker who can write the directory can do)."""

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    blob = pickle.dumps(Payload())
    (ckpt_dir / name).write_bytes(blob)
    marker_file = ckpt_dir / "COMPLETE"
    listed = json.loads(marker_file.read_text())
    listed["bytes"][name] = len(blob)
    listed["sha256"][name] = hashlib.sha256(blob).hexdigest()
    marker_file.write_text(json.dumps(listed))


def remote_code_model(src: str, dst: str, marker: str) -> None:
    """A copy of `src` whose config asks for code shipped in the model dir; importing that code touches `marker`."""
    shutil.copytree(src, dst)
    Path(dst, "evil.py").write_text(f"import pathlib\npathlib.Path({marker!r}).touch()\n"
                                    "from transformers import LlamaConfig, LlamaForCausalLM\n"
                                    "class EvilConfig(LlamaConfig):\n    model_type = 'evil_llama'\n"
                                    "class EvilModel(LlamaForCausalLM):\n    config_class = EvilConfig\n")
    cfg = json.loads(Path(dst, "config.json").read_text())
    cfg.update(model_type="evil_llama", auto_map={"AutoConfig": "evil.EvilConfig",
                                                  "AutoModelForCausalLM": "evil.EvilModel"})
    Path(dst, "config.json").write_text(json.dumps(cfg))
