"""What a compiled decoder layer keeps for backward, by the partitioner's activation memory budget (CPU only):

    python -m benchmarks.partitioner [--shape qwen1.5b] [--budgets 1.0,0.7,0.5,0.3] [--out benchmarks/results.jsonl]

One decoder layer of the shape (RMSNorm, q/k/v/o with RoPE, grouped-query attention, SwiGLU MLP) with LoRA r=16 on
the 7 projections (frozen bf16 base, fp32 adapters under bf16 autocast) is compiled through AOTAutograd's min-cut
partitioner (what Inductor uses) at each `torch._functorch.config.activation_memory_budget`; attention is an opaque
op that keeps q, k, v, its output and the log-sum-exp, as FlashAttention-2 does. For each budget: the bytes a token
kept for backward (read through saved-tensor hooks) and the matmuls the backward graph runs (more than at 1.0: a
projection is recomputed). selective_recompute's levels (lora_runtime.compiled.LEVEL_BUDGETS) rest on it.
"""

import argparse

TOKENS, RANK = 512, 16


def _attention_op():
    """An opaque attention op with FlashAttention-2's saved tensors and a flop formula (the budget's solver counts
    flops); its backward returns zeros (only the partition is looked at)."""
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import register_flop_formula

    if hasattr(torch.ops, "lora_bench") and hasattr(torch.ops.lora_bench, "attn"):
        return torch.ops.lora_bench.attn

    @torch.library.custom_op("lora_bench::attn", mutates_args=())
    def attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rep = q.shape[1] // k.shape[1]
        qq, kk, vv = (x.transpose(0, 1).unsqueeze(0) for x in (q, k.repeat_interleave(rep, 1),
                                                                v.repeat_interleave(rep, 1)))
        out = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True)[0].transpose(0, 1).contiguous()
        return out, q.new_zeros(q.shape[1], q.shape[0], dtype=torch.float32)

    @attn.register_fake
    def _(q, k, v):
        return torch.empty_like(q), q.new_empty(q.shape[1], q.shape[0], dtype=torch.float32)

    @torch.library.custom_op("lora_bench::attn_backward", mutates_args=())
    def attn_backward(g: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                      lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)

    @attn_backward.register_fake
    def _(g, q, k, v, out, lse):
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    def setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs, *output)

    def backward(ctx, g, _lse):
        return attn_backward(g, *ctx.saved_tensors)

    attn.register_autograd(backward, setup_context=setup)
    register_flop_formula(torch.ops.lora_bench.attn)(lambda q, k, v, *a, **kw: 2 * q[0] ** 2 * q[1] * q[2])
    register_flop_formula(torch.ops.lora_bench.attn_backward)(lambda g, q, *a, **kw: 5 * q[0] ** 2 * q[1] * q[2])
    return torch.ops.lora_bench.attn


def _layer(shape: dict):
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    h, i = shape["hidden_size"], shape["intermediate_size"]
    heads, kv = shape["num_attention_heads"], shape["num_key_value_heads"]
    d = h // heads
    attn = _attention_op()

    class Lora(nn.Module):
        def __init__(self, n_in: int, n_out: int) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(n_out, n_in, dtype=torch.bfloat16) * 0.02, requires_grad=False)
            self.a = nn.Parameter(torch.randn(RANK, n_in) * 0.01)
            self.b = nn.Parameter(torch.randn(n_out, RANK) * 0.01)

        def forward(self, x):
            return F.linear(x, self.w) + 2.0 * F.linear(F.linear(x, self.a), self.b)

    class Norm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.ones(h, dtype=torch.bfloat16), requires_grad=False)

        def forward(self, x):
            xf = x.float()
            return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * self.w

    def rope(x, cos, sin):
        return x * cos + torch.cat((-x[..., d // 2:], x[..., : d // 2]), -1) * sin

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.n1, self.n2 = Norm(), Norm()
            self.q, self.k, self.v, self.o = Lora(h, heads * d), Lora(h, kv * d), Lora(h, kv * d), Lora(heads * d, h)
            self.gate, self.up, self.down = Lora(h, i), Lora(h, i), Lora(i, h)

        def forward(self, x, cos, sin):
            n = self.n1(x)
            q = rope(self.q(n).view(-1, heads, d), cos, sin).to(torch.bfloat16)
            k = rope(self.k(n).view(-1, kv, d), cos, sin).to(torch.bfloat16)
            a, _ = attn(q, k, self.v(n).view(-1, kv, d).to(torch.bfloat16))
            x = x + self.o(a.view(-1, heads * d))
            n = self.n2(x)
            return x + self.down(F.silu(self.gate(n)) * self.up(n))

    angles = torch.arange(TOKENS).float()[:, None, None] / (10000 ** (torch.arange(0, d, 2).float() / d))
    angles = torch.cat([angles, angles], -1)
    return Layer(), angles.cos().to(torch.bfloat16), angles.sin().to(torch.bfloat16)


def kept(shape: dict, budget: float) -> dict:  # (no `from __future__ import annotations`: custom_op reads them)
    """{"bytes_per_token", "tensors", "backward_matmuls", "tensor_bytes_per_token"} of one layer compiled at
    `budget`."""
    import torch
    import torch._functorch.config as functorch_config
    from functorch.compile import make_boxed_func
    from lora_runtime.compiled import grouped_query_flop_counts
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    grouped_query_flop_counts()
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer, cos, sin = _layer(shape)
    graphs = {}

    def keep(name):
        def compiler(gm, _inputs):
            graphs[name] = gm
            if name == "backward":  # its graph is what counts; running it (bf16 on a CPU) took minutes
                outputs = len(next(n for n in gm.graph.nodes if n.op == "output").args[0])
                return make_boxed_func(lambda *_args: [None] * outputs)
            return make_boxed_func(gm.forward)
        return compiler

    backend = aot_autograd(fw_compiler=keep("forward"), bw_compiler=keep("backward"),
                           partition_fn=min_cut_rematerialization_partition)
    x = torch.randn(TOKENS, shape["hidden_size"], dtype=torch.bfloat16, requires_grad=True)
    saved: list = []
    hooks = torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t)
    with functorch_config.patch(activation_memory_budget=budget), torch.autocast("cpu", dtype=torch.bfloat16), hooks:
        y = torch.compile(layer, backend=backend)(x, cos, sin)
    y.float().sum().backward()
    tables = {cos.data_ptr(), sin.data_ptr()}  # RoPE's, an input of every layer: not the layer's activations
    per_token = [t for t in saved if t.dim() and TOKENS in t.shape[:2] and t.data_ptr() not in tables]  # no weights
    matmuls = sum(1 for n in graphs["backward"].graph.nodes if n.op == "call_function" and "mm" in str(n.target))
    return {"bytes_per_token": sum(t.numel() * t.element_size() for t in per_token) / TOKENS,
            "tensors": len(per_token), "backward_matmuls": matmuls,
            "tensor_bytes_per_token": [t.numel() * t.element_size() / TOKENS for t in per_token]}


def main(argv: list[str] | None = None) -> None:
    from benchmarks.gpu.common import SHAPES

    ap = argparse.ArgumentParser(prog="python -m benchmarks.partitioner", description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen1.5b")
    ap.add_argument("--budgets", default="1.0,0.7,0.5,0.3")
    ap.add_argument("--out", help="also append one row a budget to this results file (scenario `partitioner`)")
    a = ap.parse_args(argv)
    print(f"| budget | kept B/token a layer | tensors | backward matmuls |  ({a.shape}, {TOKENS} tokens)")
    print("|---:|---:|---:|---:|")
    found = []
    for budget in map(float, a.budgets.split(",")):
        k = kept(SHAPES[a.shape], budget)
        found.append((budget, k))
        print(f"| {budget:g} | {k['bytes_per_token']:,.0f} | {k['tensors']} | {k['backward_matmuls']} |", flush=True)
    if a.out:
        _append(a, found)


def _append(a: argparse.Namespace, found: list) -> None:
    import sys

    from benchmarks.gpu import common, rows

    payload = {"date": rows.now(), "card": "cpu", "versions": common.versions(), "shape": a.shape}
    command = "python -m benchmarks.partitioner " + " ".join(sys.argv[1:])
    rows.append([rows.make_row(
        "partitioner", f"one compiled decoder layer, activation memory budget {budget:g}", "ours", payload,
        command=command, feed=f"{TOKENS} tokens, random weights", config={"activation_memory_budget": budget},
        note=f"kept {k['bytes_per_token']:,.0f} B a token in {k['tensors']} tensors; {k['backward_matmuls']} "
             "matmuls in backward") for budget, k in found], a.out)


if __name__ == "__main__":
    main()
