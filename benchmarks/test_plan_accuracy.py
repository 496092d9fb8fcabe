"""The memory plan against the peaks the results file records: every `lora_sft` row measured by the current plan (its
config names the selective_recompute level it resolved) is planned again from its shape, backend, level, micro batch,
recomputed and offloaded layers, and the estimate must be within 15% of the peak torch measured
(`torch.cuda.max_memory_allocated`). A change to the footprint model that the recorded measurements do not back fails
here; a new measurement that the model misses fails here too."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from lora_runtime import chunked_loss
from lora_runtime.batching import GIB, compiled_footprint, unsloth_footprint

from benchmarks.gpu import rows
from benchmarks.gpu.common import SHAPES

TOLERANCE = 0.15


def _measured() -> list[dict]:
    return [r for r in rows.read() if r.get("role") == "ours" and r.get("peak_gib") and not r.get("error")
            and "resolved_selective_recompute" in (r.get("config") or {})
            and (r["config"].get("resolved_estimated_peak_gib") is not None) and r.get("shape") in SHAPES]


def _estimate(r: dict) -> float:
    cfg = r["config"]
    model = SimpleNamespace(**SHAPES[r["shape"]])
    if cfg["backend_used"] == "unsloth":
        footprint = unsloth_footprint(model, False)
    else:  # the compiled path with the chunked loss (lora_sft's defaults on CUDA for these shapes)
        footprint = compiled_footprint(model, fused_loss=True, level=cfg["resolved_selective_recompute"] or "off")
    recomputed = cfg["resolved_recomputed_layers"]
    if recomputed is None:
        recomputed = footprint.layers if cfg["resolved_gradient_checkpointing"] else 0
    tokens = cfg["resolved_micro_batch_size"] * r["seq_len"]
    return footprint.peak(tokens, recomputed, cfg.get("resolved_offloaded_layers") or 0) / GIB


MEASURED = _measured()


def test_the_results_file_has_rows_of_every_level_to_check():
    levels = {(r["config"]["backend_used"], r["config"]["resolved_selective_recompute"]) for r in MEASURED}
    assert {("unsloth", "off"), ("peft", "off"), ("peft", "pointwise"), ("peft", "most")} <= levels, levels


@pytest.mark.parametrize("row", MEASURED, ids=lambda r: f"{r['date'][:16]}-{r['card'].split()[1]}-{r['name']}")
def test_the_plan_estimates_the_measured_peak(row, monkeypatch):
    monkeypatch.setattr(chunked_loss, "_triton_installed", lambda: True)  # as on the card: the loss kernel's chunk
    estimate, peak = _estimate(row), row["peak_gib"]
    assert abs(estimate - peak) <= TOLERANCE * peak, (
        f"{row['name']} on the {row['card']} ({row['shape']}, plan {row['config']}): the plan now estimates "
        f"{estimate:.2f} GiB, the peak measured {peak:.2f} GiB")
