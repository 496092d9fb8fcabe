"""LoRA's B product folded into the frozen projection's GEMM, for the projections that widen (gate and up):

    y = x W^T + s (x A^T) B^T = [x, s x A^T] @ [W, B]^T

one GEMM over K = in + r writes y once. PEFT's forward writes the base output and the LoRA output (each tokens ×
out) and a pointwise kernel reads both back to add them; for an MLP's gate and up (out = 4-6 × in) those two extra
passes over tokens × intermediate are most of the memory traffic of the SwiGLU kernels. The backward is its own:
grad [x, s x A^T] = grad_y @ [W, B] (one GEMM), grad B = grad_y^T @ (s x A^T); no gradient of W is formed and x is
not kept (LoRA A keeps it for its own gradient). The concatenated input costs a copy of x (in wide), which is why a
projection qualifies only where out ≥ `MIN_WIDENING` × in.

Plain PyTorch: `apply` swaps the forward of qualifying PEFT `lora.Linear` modules; a module with dropout, a LoRA
variant (DoRA), several active adapters, or merged/disabled adapters runs PEFT's own forward.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F

MIN_WIDENING = 2.0  # out_features / in_features at which the copy of x costs less than the two passes saved


class _ConcatLinear(torch.autograd.Function):
    """y = [x, xa] @ [W, B]^T with W frozen: gradients for x, xa and B only."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, xa: torch.Tensor, weight: torch.Tensor,
                lora_b: torch.Tensor) -> torch.Tensor:
        dtype = weight.dtype
        ctx.save_for_backward(xa, weight, lora_b)
        ctx.in_features = x.shape[-1]
        return F.linear(torch.cat([x.to(dtype), xa.to(dtype)], -1), torch.cat([weight, lora_b.to(dtype)], 1))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, torch.Tensor]:
        xa, weight, lora_b = ctx.saved_tensors
        dtype = weight.dtype
        grad = grad.to(dtype)
        grad_in = grad @ torch.cat([weight, lora_b.to(dtype)], 1)
        grad_x, grad_xa = grad_in.split([ctx.in_features, grad_in.shape[-1] - ctx.in_features], -1)
        grad_b = grad.reshape(-1, grad.shape[-1]).t() @ xa.reshape(-1, xa.shape[-1]).to(dtype)
        return grad_x, grad_xa.to(xa.dtype), None, grad_b.to(lora_b.dtype)


def concat_linear(x: torch.Tensor, xa: torch.Tensor, weight: torch.Tensor, lora_b: torch.Tensor) -> torch.Tensor:
    """[x, xa] @ [weight, lora_b]^T, in `weight`'s dtype, without a gradient for `weight`."""
    with torch.autocast(x.device.type, enabled=False):
        return _ConcatLinear.apply(x, xa, weight, lora_b)


def _forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    adapters = [a for a in self.active_adapters if a in self.lora_A]
    if (args or kwargs or self.disable_adapters or self.merged or len(adapters) != 1 or adapters[0] in self.lora_variant
            or not isinstance(self.lora_dropout[adapters[0]], torch.nn.Identity)
            or getattr(self.base_layer, "bias", None) is not None):
        return type(self).forward(self, x, *args, **kwargs)
    name = adapters[0]
    xa = self.lora_A[name](x) * self.scaling[name]  # under autocast: bf16 on the fp32 adapter
    return concat_linear(x, xa, self.base_layer.weight, self.lora_B[name].weight)


def qualifies(module: Any, min_widening: float = MIN_WIDENING) -> bool:
    base = getattr(module, "base_layer", None)
    weight = getattr(base, "weight", None)
    return (hasattr(module, "lora_A") and isinstance(base, torch.nn.Linear) and weight is not None
            and weight.dtype in (torch.bfloat16, torch.float16, torch.float32)
            and weight.shape[0] >= min_widening * weight.shape[1])


def apply(model: Any, min_widening: float = MIN_WIDENING) -> list[str]:
    """Folds LoRA B into the base GEMM of every qualifying projection of `model` (its instance forward); returns
    their names."""
    names = []
    for name, module in model.named_modules():
        if qualifies(module, min_widening):
            module.forward = types.MethodType(_forward, module)
            names.append(name)
    return names
