"""Merge a call's result JSON files into one and print the short table the device reply carries.

    python -m benchmarks.gpu.report RESULTS_DIR [MERGED_JSON]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def load(res_dir: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(Path(res_dir).glob("*.json"))]


def table(rows: list[dict]) -> str:
    ref = {r["name"]: r.get("tokens_per_s") for r in rows}
    th = ref.get("th")
    out = ["| run | tok/s | x TH | peak alloc GiB | warm-up s | tok/step | MFU(6N) | note |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        tps = r.get("tokens_per_s")
        ratio = f"{tps / th:.2f}" if tps and th else ""
        mfu = r.get("mfu_6N", r.get("mfu_matmul"))
        iso = r.get("isolation") or {}
        note = (r.get("error") or "")[:90]
        if iso:
            note = f"iso gap {iso.get('packed_gap', 0):.1e} vs {iso.get('contaminated_gap', 0):.1e} " + note
        if r.get("scaling_efficiency"):
            note += f" scaling eff {r['scaling_efficiency']:.2f} ({r.get('tokens_per_s_per_gpu', 0):,.0f}/GPU)"
        if r.get("note"):
            note += " " + r["note"][:80]
        if r.get("varlen_patch"):
            note += " " + r["varlen_patch"][:20]
        out.append(
            f"| {r['name']} | {tps or 0:,.0f} | {ratio} | {r.get('peak_alloc_gib') or r.get('peak_memory_gib_rank0') or 0:.1f} | "
            f"{r.get('warmup_s') or 0:.1f} | {r.get('tokens_per_step') or 0:,.0f} | {mfu or 0:.2f} | {note} |"
        )
    return "\n".join(out)


def main() -> None:
    rows = load(sys.argv[1])
    if len(sys.argv) > 2:
        Path(sys.argv[2]).write_text(json.dumps(rows, indent=1))
    print(table(rows))


if __name__ == "__main__":
    main()
