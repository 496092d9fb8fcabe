"""LoRA's B product folded into the frozen projection's GEMM, for the projections that widen (gate and up):

    y = x W^T + s (x A^T) B^T = [x, s x A^T] @ [W, B]^T

one GEMM over K = in + r writes y once. PEFT's forward writes the base output and the LoRA output (each tokens ×
out) and a pointwise kernel reads both back to add them; for an MLP's gate and up (out = 4-6 × in) those two extra
passes over tokens × intermediate are most of the memory traffic of the SwiGLU kernels. LoRA A runs inside the same
autograd Function, whose backward is its own: no gradient of W is formed, and a layer keeps for backward what it
keeps under PEFT's forward (x, which LoRA A's gradient needs anyway). The joined input costs a copy of x (in wide),
which is why a projection qualifies only where out ≥ `MIN_WIDENING` × in.

Plain PyTorch: `apply` swaps the forward of qualifying PEFT `lora.Linear` modules (`qualifies`: not those with LoRA
dropout, nor over a wrapped or hooked base layer). At a call, a LoRA variant (DoRA), a LoRA bias, a trainable base
bias, several active adapters, merged or disabled adapters, or, without autocast, an adapter of another dtype than
its input (PEFT casts the input to it) runs PEFT's own forward.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F

# out_features / in_features from which a projection is folded: the copy of x costs less than the passes saved. On one
# H100 (Qwen2.5-1.5B shape, 16 rows of 2048, without the Trainer; benchmarks/RESULTS.md, compiled-parts) folding gate
# and up ran 64.0k tokens/s against 60.0k unfolded, folding all 7 projections 62.0k
MIN_WIDENING = 2.0


class _FoldedLora(torch.autograd.Function):
    """y = [x, s x A^T] @ [W, B]^T + bias in `dtype` with W and bias frozen: gradients for x, A and B. It keeps x
    and the weights alone (x A^T is recomputed in backward, a GEMM of rank r): a kept x A^T would be, under
    Inductor, a view of the joined input, and would keep that whole copy of x until backward. The backward runs
    grad @ W and grad @ B apart, not one GEMM over the joined weight, which one compiled graph would share with the
    forward's and keep too."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
        ctx.save_for_backward(x, weight, lora_a, lora_b)
        ctx.scale, ctx.dtype, ctx.x_dtype = scale, dtype, x.dtype
        x = x.to(dtype)
        xa = F.linear(x, lora_a.to(dtype)) * scale
        return F.linear(torch.cat([x, xa], -1), torch.cat([weight.to(dtype), lora_b.to(dtype)], 1),
                        None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        x, weight, lora_a, lora_b = ctx.saved_tensors
        dtype, scale = ctx.dtype, ctx.scale
        grad, x, a = grad.to(dtype), x.to(dtype), lora_a.to(dtype)
        rows = grad.reshape(-1, grad.shape[-1])
        flat_x = x.reshape(-1, x.shape[-1])
        grad_xa = (grad @ lora_b.to(dtype)) * scale  # the gradient of x A^T
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad @ weight.to(dtype) + grad_xa @ a).to(ctx.x_dtype)
        if ctx.needs_input_grad[3]:
            grad_a = (grad_xa.reshape(-1, grad_xa.shape[-1]).t() @ flat_x).to(lora_a.dtype)
        if ctx.needs_input_grad[4]:
            grad_b = (rows.t() @ (F.linear(flat_x, a) * scale)).to(lora_b.dtype)
        return grad_x, None, None, grad_a, grad_b, None, None


def folded_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                  lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """x W^T + bias + scale (x A^T) B^T as one GEMM over [x, scale x A^T], without gradients for `weight` or
    `bias`: in autocast's dtype where it is on (as F.linear would run), else in `weight`'s."""
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    with torch.autocast(device, enabled=False):
        return _FoldedLora.apply(x, weight, bias, lora_a, lora_b, scale, dtype)


def _forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    adapters = [a for a in self.active_adapters if a in self.lora_A]
    name = adapters[0] if len(adapters) == 1 else None
    bias = self.base_layer.bias
    device = x.device.type
    if (args or kwargs or self.disable_adapters or self.merged or name is None or name in self.lora_variant
            or not isinstance(self.lora_dropout[name], torch.nn.Identity)
            or self.lora_B[name].bias is not None or (bias is not None and bias.requires_grad)
            or not (torch.is_autocast_enabled(device) or self.lora_A[name].weight.dtype == x.dtype)):
        # (without autocast, PEFT runs LoRA in the adapter's dtype where it differs from the input's)
        return type(self).forward(self, x, *args, **kwargs)
    return folded_linear(x, self.base_layer.weight, bias, self.lora_A[name].weight, self.lora_B[name].weight,
                         self.scaling[name])


def qualifies(module: Any, min_widening: float = MIN_WIDENING) -> bool:
    """A PEFT LoRA `Linear` without dropout over a plain `nn.Linear` (not a quantized, otherwise wrapped or hooked
    one: the folded forward reads its weight and skips its forward) whose output is at least `min_widening` × its
    input."""
    from peft.tuners.lora.layer import Linear

    if type(module) is not Linear or type(module.base_layer) is not torch.nn.Linear:
        return False
    base = module.base_layer
    if base._forward_hooks or base._forward_pre_hooks or hasattr(base, "_hf_hook"):
        return False
    if not all(isinstance(d, torch.nn.Identity) for d in module.lora_dropout.values()):
        return False  # PEFT's forward applies the dropout to LoRA's input alone
    weight = base.weight
    return (type(weight) is torch.nn.Parameter and weight.dtype.is_floating_point
            and weight.shape[0] >= min_widening * weight.shape[1])


def apply(model: Any, min_widening: float = MIN_WIDENING) -> list[str]:
    """Folds LoRA B into the base GEMM of every qualifying projection of `model` (its instance forward); returns
    their names."""
    names = []
    for name, module in model.named_modules():
        if qualifies(module, min_widening) and "forward" not in module.__dict__:  # not over another instance forward
            module.forward = types.MethodType(_forward, module)
            names.append(name)
    return names
