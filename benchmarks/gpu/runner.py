"""Runs the measurement processes a set of scenarios asks for, each under a time cap, within one deadline.

Scenarios ask for runs by side (`want("ours", [...])`); the runs of one side, from every scenario of the invocation,
share one process (one model load, one compile), and each side runs once, in SIDES order. A process that fails,
times out or is skipped for lack of time still answers every run it was asked for, with the error: a peer that
fails is a row with its error, and the rest continues. Every process gets its own results folder and log.

Start-up is measured from outside: the wall clock when the process was launched to the wall clock of its first
optimizer step (`common.StepMeter`), so imports, model load and compilation are all in it. Compile caches (Triton,
Inductor, Unsloth's generated modules) live under WORK/cache/<family>, one family per kind of process, wiped when
the invocation starts: the first process of a family starts cold, a later one warm.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.gpu import common, rows

PY = sys.executable
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Side:
    """How to launch one kind of process: `argv(session, runs, budget_s)`, its time cap, the payload field naming
    the run (None: one run a process), and its compile-cache family."""

    argv: object
    cap_s: float
    run_field: str | None
    family: str
    est_s: float = 60  # typical seconds on one H200 for the process, and for each run in it: to balance --lanes
    per_run_s: float = 0


@dataclass
class Proc:
    key: str
    runs: list[str]
    argv: list[str] = field(default_factory=list)
    rc: int | None = None
    launch_unix: float | None = None
    wall_s: float | None = None
    log: Path | None = None
    error: str | None = None
    payloads: dict = field(default_factory=dict)


def _portable(argv: list[str]) -> list[str]:
    """The command line without the options naming this machine's folders (--out, --work, --data).

    >>> _portable(["frontier", "--out", "/tmp/o.jsonl", "--work=/w", "--lanes", "4"])
    ['frontier', '--lanes', '4']
    """
    out, skip = [], False
    for x in argv:
        if skip:
            skip = False
        elif x in ("--out", "--work", "--data"):
            skip = True
        elif not x.startswith(("--out=", "--work=", "--data=")):
            out.append(x)
    return out


class Session:
    """One invocation: the options, the folders, the deadline, the wanted runs and what each process returned."""

    def __init__(self, a, scenarios: list[str]):
        self.a, self.scenarios = a, scenarios
        self.cpu = a.cpu
        self.work = Path(a.work).resolve()
        self.data = Path(a.data).resolve()
        self.deadline = time.monotonic() + a.budget_s
        self.run_id = rows.now().replace(":", "").replace("-", "") + f"-{os.getpid()}"
        self.command = "python -m benchmarks.gpu " + " ".join(shlex.quote(x) for x in _portable(a.argv))
        self.card = rows.card(self.cpu)
        self.versions = common.versions()
        self.wanted: dict[str, list[str]] = {}
        self.offered: set[str] = set()  # every run the scenarios asked for, before --only
        self.procs: dict[str, Proc] = {}
        self.sides: dict[str, Side] = {}
        self.gpu_of: dict[str, str] = {}  # key → CUDA_VISIBLE_DEVICES, when processes run side by side (--lanes)
        for d in ("res", "logs"):
            (self.work / d).mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.work / "cache", ignore_errors=True)

    # ---- asking for runs -------------------------------------------------------------------------------------
    def define(self, key: str, side: Side) -> None:
        self.sides.setdefault(key, side)

    def want(self, key: str, runs: list[str], first: bool = False) -> None:
        """Ask for `runs` of side `key` (once each); `first`: before the others (a process's first run carries its
        start-up). With `--only`, runs not named there are left out (a side left with none is not started; the
        model builds stay)."""
        only = getattr(self.a, "only", None)
        self.offered.update(runs)
        if only and not key.startswith("build_"):
            runs = [r for r in runs if r in only.split(",")]
            if not runs and key not in self.wanted:
                return
        have = self.wanted.setdefault(key, [])
        if first:
            have[:] = runs + [r for r in have if r not in runs]
        else:
            have += [r for r in runs if r not in have]

    def unknown_only(self) -> list[str]:
        """The --only names no scenario of this invocation has (a typo would otherwise run nothing)."""
        only = getattr(self.a, "only", None)
        return [r for r in only.split(",") if r not in self.offered] if only else []

    def left_out(self, key: str, run: str | None) -> bool:
        """Whether --only left this run (or this side's process) out: its row is not written."""
        if not getattr(self.a, "only", None):
            return False
        return key not in self.wanted or (run is not None and run != key and run not in self.wanted[key])

    def left(self) -> float:
        return self.deadline - time.monotonic()

    # ---- running them ----------------------------------------------------------------------------------------
    def execute(self, order: list[str]) -> None:
        for key in [k for k in order if k in self.wanted] + [k for k in self.wanted if k not in order]:
            self.run(key)

    def run(self, key: str) -> Proc:
        if key in self.procs:
            return self.procs[key]
        side, runs = self.sides[key], self.wanted.get(key, [key])
        proc = self.procs[key] = Proc(key, runs)
        cap = min(side.cap_s, self.left() - 10)
        if cap < 30:
            proc.error = f"skipped: {max(0, self.left()):.0f} s left of the invocation's --budget-s"
            print(f"SKIP {key}: {proc.error}", flush=True)
            return proc
        res = self.work / "res" / key
        shutil.rmtree(res, ignore_errors=True)
        res.mkdir(parents=True)
        proc.argv = [str(x) for x in side.argv(self, runs, res, cap)]
        proc.log = self.work / "logs" / f"{key}.log"
        print(f"=== {key} (cap {cap:.0f} s, {self.left():.0f} s left): {' '.join(proc.argv)}", flush=True)
        proc.launch_unix = time.time()
        t0 = time.monotonic()
        with proc.log.open("w") as log:
            p = subprocess.Popen(proc.argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=self.env(side.family, key),
                                 start_new_session=True)
            try:
                proc.rc = p.wait(timeout=cap)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
                proc.rc = 124
                proc.error = f"timed out after {cap:.0f} s"
        proc.wall_s = time.monotonic() - t0
        self.collect(proc, side, res)
        print(f"rc={proc.rc} {key} in {proc.wall_s:.0f} s; {len(proc.payloads)} result(s)", flush=True)
        return proc

    def env(self, family: str, key: str = "") -> dict:
        cache = self.work / "cache" / family
        env = dict(os.environ, **common.OFFLINE_ENV, PYTHONUNBUFFERED="1",
                   TRITON_CACHE_DIR=str(cache / "triton"), TORCHINDUCTOR_CACHE_DIR=str(cache / "inductor"),
                   UNSLOTH_COMPILE_LOCATION=str(cache / "unsloth_compiled_cache"), XDG_CACHE_HOME=str(cache / "xdg"))
        paths = [str(ROOT), *(str(ROOT / "packages" / p / "src") for p in ("lora-data", "lora-runtime", "lora-cli"))]
        env["PYTHONPATH"] = os.pathsep.join([*paths, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        if key in self.gpu_of:
            env["CUDA_VISIBLE_DEVICES"] = self.gpu_of[key]
        return env

    def collect(self, proc: Proc, side: Side, res: Path) -> None:
        payloads = [json.loads(p.read_text()) for p in sorted(res.glob("*.json"))]
        if payloads and proc.launch_unix:
            first = min(payloads, key=lambda p: p.get("first_step_unix") or float("inf"))
            if first.get("first_step_unix"):
                first["startup_s"] = first["first_step_unix"] - proc.launch_unix
        for p in payloads:
            name = p.get(side.run_field) if side.run_field else proc.runs[0]
            proc.payloads[name] = p
        if proc.rc and not proc.error:
            proc.error = f"exit code {proc.rc}: {self.log_tail(proc)}"

    @staticmethod
    def log_tail(proc: Proc, n: int = 3) -> str:
        if not proc.log or not proc.log.exists():
            return ""
        lines = [x for x in proc.log.read_text(errors="replace").splitlines() if x.strip()]
        err = [x for x in lines if "Error" in x or "error" in x][-n:]
        return " | ".join(err or lines[-n:])[:600]

    # ---- reading results -------------------------------------------------------------------------------------
    def result(self, key: str, run: str | None = None) -> tuple[dict, Proc | None]:
        """The payload of `run` (default: the side's only run), or one carrying the reason there is none."""
        proc = self.procs.get(key)
        if proc is None:
            return {"error": f"not run ({key})"}, None
        payload = proc.payloads.get(run or proc.runs[0])
        if payload is None:
            return {"error": proc.error or f"no result for {run or key} (exit code {proc.rc}; log {proc.log})"}, proc
        return payload, proc

    def row(self, scenario: str, key: str, run: str | None, name: str, role: str, **fields) -> dict:
        payload, proc = self.result(key, run)
        row = rows.make_row(scenario, name, role, payload, run_id=self.run_id, command=self.command,
                            process=" ".join(proc.argv) if proc and proc.argv else None,
                            startup_s=payload.get("startup_s"), **fields)
        if key in self.gpu_of:
            row["gpu"] = self.gpu_of[key]
        row["date"] = row["date"] or rows.now()
        row["card"] = row["card"] or self.card
        row["versions"] = row["versions"] or self.versions
        if self.left_out(key, run):
            row["left_out"] = True  # dropped before the rows are written (--only)
        return row
