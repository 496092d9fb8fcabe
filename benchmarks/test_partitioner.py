"""The partitioner behaviour selective_recompute's levels rest on (benchmarks/partitioner.py), at
lora_runtime.compiled.LEVEL_BUDGETS: under "pointwise" a compiled layer of the tiny shape keeps at least what the
memory plan subtracts less, and its backward recomputes no matmul; under "most" one of the Qwen2.5-1.5B shape keeps
no more than the plan counts (its input and attention's output, plus LoRA's rank-sized products), and its backward
recomputes projections."""

from types import SimpleNamespace

from lora_runtime.batching import most_bytes_per_token, pointwise_bytes_per_token
from lora_runtime.compiled import LEVEL_BUDGETS

from benchmarks import partitioner
from benchmarks.gpu.common import SHAPES


def test_the_pointwise_budget_keeps_less_without_recomputing_a_matmul():
    shape = SHAPES["tiny"]
    full, lean = partitioner.kept(shape, 1.0), partitioner.kept(shape, LEVEL_BUDGETS["pointwise"])
    assert lean["backward_matmuls"] == full["backward_matmuls"], (full, lean)
    assert full["bytes_per_token"] - lean["bytes_per_token"] >= pointwise_bytes_per_token(SimpleNamespace(**shape))


def test_the_most_budget_keeps_the_input_and_attention_output_and_recomputes_projections():
    """On the Qwen2.5-1.5B shape (on the tiny one the rank-16 products weigh as much as a hidden state, and the
    partitioner recomputes attention's output too)."""
    shape = SHAPES["qwen1.5b"]
    full, most = partitioner.kept(shape, 1.0), partitioner.kept(shape, LEVEL_BUDGETS["most"])
    rank_sized = 7 * partitioner.RANK * 2  # LoRA's x @ A of the 7 projections, bf16
    hidden = 2 * shape["hidden_size"]
    # what the partitioner keeps: the plan's count less the folded gate/up's input (fused_lora keeps it, out of reach)
    kept = most_bytes_per_token(SimpleNamespace(**shape)) - hidden
    assert 2 * hidden <= most["bytes_per_token"] <= kept + rank_sized, most
    assert most["backward_matmuls"] > full["backward_matmuls"], (full, most)
