"""Measure the two ceilings once on the card (METHOD.md): a large bf16 matmul and a device-to-device copy.

    python benchmarks/gpu/ceilings.py [OUT.json]
"""

import json
import sys


def main() -> None:
    import torch
    from triton.testing import do_bench

    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    ms = do_bench(lambda: a @ b, warmup=200, rep=1000, return_mode="median")
    x = torch.empty(2 * 1024**3, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms_copy = do_bench(lambda: y.copy_(x), warmup=100, rep=500, return_mode="median")
    out = {"bf16_matmul_tflops": 2 * n**3 / ms / 1e9, "copy_tb_s": 2 * x.numel() / ms_copy / 1e9,
           "card": torch.cuda.get_device_name(0), "torch": torch.__version__}
    print("CEILINGS", json.dumps(out))
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            f.write(json.dumps(out))


if __name__ == "__main__":
    main()
