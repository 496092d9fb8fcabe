"""Named benchmark scenarios for a GPU machine; each appends rows to one results file.

    python -m benchmarks.gpu SCENARIO [SCENARIO...] [--out benchmarks/results.jsonl] [--data .gpu] [--budget-s 560]
    python -m benchmarks.gpu prepare .gpu        # on a CPU machine: tokenizers, records, lora-data shards, parity set
    python -m benchmarks.gpu report              # RESULTS.md from the results file
    python -m benchmarks.gpu table RESULTS.jsonl # the short table of one results file

Scenarios: throughput, frontier, compiled, offload, startup, parity, kernels, prompts (one GPU); ddp-scaling,
resume-dead-rank, model-splitting, fsdp (several GPUs); ceilings. `--cpu` runs the single-GPU scenarios on a tiny
shape on the CPU (the harness's smoke test).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from pathlib import Path

from lora_data.rows import source_sha256

from benchmarks.gpu import report, rows, scenarios, scenarios_multi, sides
from benchmarks.gpu.runner import Session

SCENARIOS = {**scenarios.SCENARIOS, **scenarios_multi.SCENARIOS}


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n\n")[0])
    ap.add_argument("scenarios", nargs="+", choices=sorted(SCENARIOS), metavar="SCENARIO",
                    help="one or more of: " + ", ".join(SCENARIOS))
    ap.add_argument("--out", default=str(rows.RESULTS), help="results file the rows are appended to")
    ap.add_argument("--data", default=".gpu", help="prepared inputs (python -m benchmarks.gpu prepare DATA)")
    ap.add_argument("--work", default="/tmp/lora_bench", help="models, per-process results, logs, compile caches")
    ap.add_argument("--budget-s", type=float, default=560, help="deadline for the whole invocation")
    ap.add_argument("--steps", type=int, default=8, help="timed steps of each run, after --warmup steps")
    ap.add_argument("--warmup", type=int, default=3, help="steps left out of tokens/s (compilation, autotuning)")
    ap.add_argument("--parity-steps", type=int, default=100)
    ap.add_argument("--lanes", type=int, default=1, help="run independent processes side by side, one GPU each")
    ap.add_argument("--gpus", type=int, default=None, help="multi-GPU scenarios: N (default: every GPU)")
    ap.add_argument("--shape", choices=("qwen1.5b", "llama8b"), default=None,
                    help="frontier: only this shape's rows (default: both; one H200 runs each in under 9 minutes)")
    ap.add_argument("--only", default=None, metavar="RUN,RUN",
                    help="only these runs of the scenarios' processes (the run ids the processes are given, e.g. "
                         "auto_auto_mb2 or rowsfit16_gc_b16: an unknown one is an error listing them); the rest are "
                         "left out, not skipped, and write no row")
    ap.add_argument("--cpu", action="store_true", help="tiny shape on the CPU, peft backend (a smoke test)")
    a = ap.parse_args(argv)
    a.argv = argv
    return a


def run(argv: list[str]) -> list[dict]:
    """Plan every scenario, run the processes they need, append their rows; returns the rows."""
    a = parse_args(argv)
    if a.cpu:
        if any(m.parent.name != "shards_tiny_2048" for m in Path(a.data).glob("shards_*/manifest.json")):
            a.data = str(Path(a.data) / "cpu")  # beside the GPU inputs: their records.jsonl stays as it is
        if not (Path(a.data) / "shards_tiny_2048" / "manifest.json").exists():
            prepare(Path(a.data), (("tiny", 2048),), n_records=60, parity_set=False)
    check_feed(Path(a.data))
    s = Session(a, a.scenarios)
    for name in a.scenarios:
        SCENARIOS[name][0](s)
    unknown = s.unknown_only()
    if unknown:
        raise SystemExit(f"--only names no run of {', '.join(a.scenarios)}: {', '.join(unknown)} (its runs: "
                         f"{', '.join(sorted(s.offered))})")
    lanes = min(a.lanes, scenarios_multi.visible_gpus(s))
    if lanes > 1:
        _run_lanes(s, lanes)
    s.execute(sides.ORDER)
    out = []
    for name in a.scenarios:
        try:
            out += SCENARIOS[name][1](s)
        except Exception as e:  # one scenario's bad rows must not lose the others'
            out.append(s.row(name, name, None, name, "ours", error=f"rows: {type(e).__name__}: {e}"))
    out = [r for r in out if not r.pop("left_out", False)]
    rows.append(out, a.out)
    print(report.table(out))
    return out


def _run_lanes(s: Session, lanes: int) -> None:
    """Spread the groups of single-GPU processes over `lanes` GPUs (CUDA_VISIBLE_DEVICES), the longest group first to
    the least busy lane; the processes of a group run in turn. The Qwen model is built before."""
    import os

    for key in ("build_qwen1.5b", "build_tiny"):
        if key in s.wanted:
            s.run(key)
    groups = [[k for k in g if k in s.wanted] for g in sides.GROUPS]
    cost = {tuple(g): sum(s.sides[k].est_s + s.sides[k].per_run_s * len(s.wanted[k]) for k in g) for g in groups if g}
    plan: list[list[str]] = [[] for _ in range(lanes)]
    load = [0.0] * lanes
    for g, c in sorted(cost.items(), key=lambda x: -x[1]):
        i = load.index(min(load))
        plan[i] += list(g)
        load[i] += c

    def lane(i: int, keys: list[str]) -> None:
        for k in keys:
            s.gpu_of[k] = str(i)
            s.run(k)

    os.environ.pop("CUDA_VISIBLE_DEVICES", None)
    threads = [threading.Thread(target=lane, args=(i, keys)) for i, keys in enumerate(plan) if keys]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "report":
        report.main(argv[1:])
    elif argv and argv[0] == "table":
        print(report.table(rows.read(argv[1] if len(argv) > 1 else rows.RESULTS)))
    elif argv and argv[0] == "prepare":
        prepare(Path(argv[1] if len(argv) > 1 else ".gpu"))
    else:
        run(argv)


def check_feed(data: Path) -> None:
    """Ours reads the shards in DATA, the peers read the records file in DATA each shard set was prepared from
    (records.jsonl; records_prompts.jsonl for the prompts scenario): the same token stream only while that file is
    the one named in the shard set's manifest, with its sha256. Refuses to run otherwise."""
    digests: dict[str, str] = {}
    for manifest in sorted(data.glob("shards_*/manifest.json")):
        for source in json.loads(manifest.read_text()).get("sources") or []:
            records = data / Path(str(source.get("path", ""))).name
            if records.suffix != ".jsonl" or not records.is_file():
                continue
            if records.name not in digests:
                digests[records.name] = source_sha256(records)  # as prepare wrote it into the manifests
            digest, theirs = digests[records.name], source.get("sha256")
            if theirs and digest != theirs:
                raise SystemExit(f"{manifest.parent} was prepared from another {records} (sha256 {theirs[:12]}…, "
                                 f"now {digest[:12]}…): the peers would read other records than ours. On the "
                                 f"CPU machine, run `python -m benchmarks.gpu prepare {data}` again (it rebuilds the "
                                 f"shards), or delete {manifest.parent} if no scenario needs it")


def prepare(out: Path, shapes=(("qwen1.5b", 2048), ("llama8b", 8192)), n_records: int = 900,
            parity_set: bool = True) -> None:
    """Everything the device cannot build (it has no polars): tokenizers, records, shards, the parity set."""
    from benchmarks.gpu import make_data, make_shards, parity

    make_data.main(str(out), n_records)
    make_shards.main(str(out), shapes)
    make_shards.prompt_heavy(str(out), [shape for shape, seq_len in shapes if seq_len == 2048])  # prompts scenario
    if not parity_set:
        return
    (out / "parity").mkdir(parents=True, exist_ok=True)
    records_path, model_dir = parity.build(out / "parity")
    parity.prepare(records_path, model_dir, out / "parity")


if __name__ == "__main__":
    main()
