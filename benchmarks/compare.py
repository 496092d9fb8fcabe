"""The regression gate: compare a pytest-benchmark JSON against a kept baseline; fail on a median slowdown or a
peak-memory increase beyond the thresholds.

    python -m benchmarks.compare BASELINE.json NEW.json [--max-slowdown 10%] [--max-memory-increase 5%]

Cases are matched by full name. Time is each case's median round, per real token where both sides record
`real_tokens_per_step` in extra_info (a training step whose memory plan picked another micro batch does other work a
round: the plan's change is noted, the gate compares the time a token, and a GiB peak against the case's
`budget_gib` where it records one); memory is every `peak_*` figure of its extra_info (`peak_alloc_gib` on a GPU,
`peak_rss_mib` on the CPU). A case needs at least --min-rounds rounds on both sides, so
one noisy round cannot pass or fail the gate. A baseline case missing from NEW is listed, not failed (`-k` runs a
part). Exit status 0 when every compared case is within bounds, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Check:
    case: str
    figure: str  # "median s" or the extra_info key
    base: float
    new: float
    limit: float  # allowed relative increase
    ok: bool

    @property
    def change(self) -> float:
        return self.new / self.base - 1 if self.base else 0.0


TOKENS = "real_tokens_per_step"
PLAN_KEYS = ("micro_batch_size", "gradient_checkpointing", "offloaded_layers")  # benchmarks/test_train.py's plan


def fraction(text: str) -> float:
    """'10%' → 0.1, '0.1' → 0.1.

    >>> fraction("10%"), fraction("0.05")
    (0.1, 0.05)
    """
    text = text.strip()
    return float(text[:-1]) / 100 if text.endswith("%") else float(text)


def cases(report: dict) -> dict[str, dict]:
    return {b["fullname"]: b for b in report.get("benchmarks", [])}


def compare(base: dict, new: dict, *, max_slowdown: float, max_memory_increase: float,
            min_rounds: int = 5) -> tuple[list[Check], list[str]]:
    """Checks of every case in both reports, and notes (missing cases, too few rounds: the latter fail)."""
    checks: list[Check] = []
    notes: list[str] = []
    old, cur = cases(base), cases(new)
    for name in sorted(old.keys() - cur.keys()):
        notes.append(f"{name}: in the baseline, not in this run (not compared)")
    for name in sorted(cur.keys() - old.keys()):
        notes.append(f"{name}: in this run, not in the baseline (not compared until a baseline records it)")
    for name in sorted(old.keys() & cur.keys()):
        a, b = old[name], cur[name]
        rounds = (a["stats"]["rounds"], b["stats"]["rounds"])
        if min(rounds) < min_rounds:
            checks.append(Check(name, f"rounds (baseline {rounds[0]}, new {rounds[1]}) < {min_rounds}", 0, 0, 0, False))
            continue
        med_a, med_b = a["stats"]["median"], b["stats"]["median"]
        info_a, info_b = a.get("extra_info") or {}, b.get("extra_info") or {}
        figure, plan = "median s", []
        tokens = (info_a.get(TOKENS), info_b.get(TOKENS))
        if all(isinstance(t, int | float) and t > 0 for t in tokens):
            med_a, med_b, figure = med_a / tokens[0] * 1e3, med_b / tokens[1] * 1e3, "median s per 1k real tokens"
            plan = [f"{k} {info_a[k]} → {info_b[k]}" for k in PLAN_KEYS if k in info_a and info_a[k] != info_b.get(k)]
            if plan:
                notes.append(f"{name}: the plan changed ({', '.join(plan)}): time compared per real token, "
                             "peak memory against the budget")
        checks.append(Check(name, figure, med_a, med_b, max_slowdown, med_b <= med_a * (1 + max_slowdown)))
        budget = info_b.get("budget_gib")
        for key in sorted(k for k in info_a if k.startswith("peak_") and isinstance(info_a[k], int | float)):
            if not isinstance(info_b.get(key), int | float):
                checks.append(Check(name, f"{key} missing from the new run", info_a[key], 0, 0, False))
            elif plan and key.endswith("_gib") and isinstance(budget, int | float):  # another plan of the same budget
                checks.append(Check(name, f"{key} against budget_gib", budget, info_b[key], 0.0, info_b[key] <= budget))
            else:
                ok = info_b[key] <= info_a[key] * (1 + max_memory_increase)
                checks.append(Check(name, key, info_a[key], info_b[key], max_memory_increase, ok))
    return checks, notes


def render(checks: list[Check], notes: list[str]) -> str:
    lines = [f"{'ok ' if c.ok else 'FAIL'} {c.case} {c.figure}: {c.base:.4g} → {c.new:.4g} "
             f"({c.change:+.1%}, limit +{c.limit:.0%})" if c.base else f"FAIL {c.case} {c.figure}" for c in checks]
    return "\n".join(lines + [f"note {n}" for n in notes])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.compare", description=__doc__.split("\n\n")[0])
    ap.add_argument("baseline")
    ap.add_argument("new")
    ap.add_argument("--max-slowdown", type=fraction, default=0.10, help="allowed median increase (default 10%%)")
    ap.add_argument("--max-memory-increase", type=fraction, default=0.05, help="allowed peak increase (default 5%%)")
    ap.add_argument("--min-rounds", type=int, default=5)
    a = ap.parse_args(argv)
    base, new = (json.loads(Path(p).read_text()) for p in (a.baseline, a.new))
    checks, notes = compare(base, new, max_slowdown=a.max_slowdown, max_memory_increase=a.max_memory_increase,
                            min_rounds=a.min_rounds)
    print(render(checks, notes))
    if not checks:
        print("FAIL: no case of the baseline ran")
        return 1
    failed = [c for c in checks if not c.ok]
    print(f"{len(checks) - len(failed)} of {len(checks)} checks within bounds")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
