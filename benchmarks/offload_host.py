"""What activation offload costs the host, measured on a CPU: the Python of lora_runtime.offload (pack, unpack and
their bookkeeping) a saved tensor, over 28 small compiled blocks (aot_eager) with and without it, and how many
tensors one compiled decoder layer of a shape saves at or above `offload.MIN_BYTES` in a pass of `--tokens`
(read from the partitioner's saved tensors, benchmarks/partitioner.py). The CUDA calls a tensor adds on a GPU (a
stream wait, an async copy each way, events a layer) are not in these figures.

    python -m benchmarks.offload_host [--shape qwen1.5b] [--tokens 8192] [--out benchmarks/results.jsonl]
"""

from __future__ import annotations

import argparse
import time

BLOCKS = 28
STEPS = 200


def python_cost(compiled: bool = True) -> dict:
    """Seconds a step of BLOCKS blocks with and without every block offloaded (all tensors, min_bytes=0), and the
    tensors offloaded a step."""
    import torch
    from lora_runtime import offload

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Linear(16, 32), torch.nn.Linear(32, 16)

        def forward(self, x):
            return x + self.b(torch.nn.functional.silu(self.a(x)))

    def step_s(offloading: bool) -> tuple[float, int]:
        torch.manual_seed(0)
        stack = torch.nn.Sequential(*(Block() for _ in range(BLOCKS)))
        if compiled:
            for block in stack:
                block.compile(backend="aot_eager")
        off = offload.ActivationOffload(list(stack), stack.parameters(), "cpu", min_bytes=0) if offloading else None
        x = torch.randn(8, 16)
        for _ in range(5):
            stack(x).sum().backward()
        t = time.perf_counter()
        for _ in range(STEPS):
            stack(x).sum().backward()
        return (time.perf_counter() - t) / STEPS, sum(s.used for s in off.layers) if off else 0

    plain, _ = step_s(False)
    with_offload, tensors = step_s(True)
    return {"plain_s": plain, "offload_s": with_offload, "tensors": tensors,
            "per_tensor_s": (with_offload - plain) / max(tensors, 1)}


def main(argv: list[str] | None = None) -> None:
    from lora_runtime.offload import MIN_BYTES

    from benchmarks import partitioner
    from benchmarks.gpu.common import SHAPES

    ap = argparse.ArgumentParser(prog="python -m benchmarks.offload_host", description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen1.5b")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--out", help="also append the row to this results file (scenario `offload-host`)")
    a = ap.parse_args(argv)
    cost = python_cost()
    sizes = partitioner.kept(SHAPES[a.shape], 1.0)["tensor_bytes_per_token"]
    offloaded = [b for b in sizes if b * a.tokens >= MIN_BYTES]
    per_layer_s = len(offloaded) * cost["per_tensor_s"]
    note = (f"{cost['per_tensor_s'] * 1e6:.1f} µs of Python a saved tensor ({cost['plain_s'] * 1e3:.2f} → "
            f"{cost['offload_s'] * 1e3:.2f} ms a step of {BLOCKS} compiled blocks, {cost['tensors']} tensors); a "
            f"{a.shape} layer saves {len(sizes)} tensors, {len(offloaded)} of them at least {MIN_BYTES >> 20} MiB at "
            f"{a.tokens:,} tokens: {per_layer_s * 1e3:.2f} ms of Python a layer and step, CUDA calls not included")
    print(note)
    if a.out:
        import sys

        from benchmarks.gpu import common, rows

        payload = {"date": rows.now(), "card": "cpu", "versions": common.versions(), "shape": a.shape, **cost,
                   "layer_tensors": len(sizes), "layer_tensors_offloaded": len(offloaded)}
        rows.append([rows.make_row(
            "offload-host", "activation offload's Python a saved tensor, and a compiled layer's tensors", "ours",
            payload, command="python -m benchmarks.offload_host " + " ".join(sys.argv[1:]),
            feed=f"{BLOCKS} blocks of width 16 (aot_eager); the layer's tensors at {a.tokens:,} tokens",
            config={"tokens": a.tokens, "min_bytes": MIN_BYTES}, note=note)], a.out)


if __name__ == "__main__":
    main()
