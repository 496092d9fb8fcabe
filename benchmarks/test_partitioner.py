"""The partitioner behaviour selective_recompute="pointwise" rests on (benchmarks/partitioner.py), on the tiny
shape: at lora_runtime.compiled.POINTWISE_BUDGET a compiled layer keeps at least what the memory plan subtracts
less, and its backward recomputes no matmul."""

from types import SimpleNamespace

from lora_runtime.batching import pointwise_bytes_per_token
from lora_runtime.compiled import POINTWISE_BUDGET

from benchmarks import partitioner
from benchmarks.gpu.common import SHAPES


def test_the_pointwise_budget_keeps_less_without_recomputing_a_matmul():
    shape = SHAPES["tiny"]
    full, lean = partitioner.kept(shape, 1.0), partitioner.kept(shape, POINTWISE_BUDGET)
    assert lean["backward_matmuls"] == full["backward_matmuls"], (full, lean)
    assert full["bytes_per_token"] - lean["bytes_per_token"] >= pointwise_bytes_per_token(SimpleNamespace(**shape))
