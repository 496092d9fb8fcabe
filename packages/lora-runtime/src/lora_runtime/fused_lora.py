"""LoRA's B product folded into the frozen projection's GEMM, for the projections that widen (gate and up):

    y = x W^T + s (x A^T) B^T = [x, s x A^T] @ [W, B]^T

one GEMM over K = in + r writes y once. PEFT's forward writes the base output and the LoRA output (each tokens ×
out) and a pointwise kernel reads both back to add them; for an MLP's gate and up (out = 4-6 × in) those two extra
passes over tokens × intermediate are most of the memory traffic of the SwiGLU kernels. LoRA A runs inside the same
autograd Function, whose backward is its own: no gradient of W is formed, and a layer keeps for backward what it
keeps under PEFT's forward (x, which LoRA A's gradient needs anyway). The joined input costs a copy of x (in wide),
which is why a projection qualifies only where out ≥ `MIN_WIDENING` × in. Its backward reads the output's gradient
once for both grad @ W and grad @ B (one GEMM over [B, W]).

With `fold_a`, LoRA's A product is folded the other way into the projections that narrow (in ≥ `MIN_WIDENING` ×
out: down, and k and v under grouped-query attention):

    [x W^T, s x A^T] = x @ [W, s A]^T,    y = x W^T + (s x A^T) B^T

one pass over the wide x where PEFT's forward reads it twice, and in backward one GEMM over [s A, W] writes x's
gradient once where PEFT writes two and adds them. Its input is then kept by the Function, out of the reach of
Inductor's partitioner: a `selective_recompute` level, which recomputes the MLP's pointwise work rather than keep
the wide SwiGLU product, would keep it anyway, so `lora_runtime.compiled` folds A only where no level is on. On one
H200 (Qwen2.5-1.5B shape, without the Trainer; benchmarks/RESULTS.md, compiled-parts) 16 rows of 2048 a pass ran
79.6k tokens/s with A folded against 77.2k without; 4 rows, where the host sets the pace, alike (on a feed whose loss
turned NaN from its second step, which reads high alike on both; `lora_runtime.compiled` says more). On a loss
that trains (lora_sft's labels), B and A folded ran 69.6k against 64.4k with neither on one H200, and 62.9k
against 61.2k with B alone (56.5k with neither) on one H100.

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
# H100 (Qwen2.5-1.5B shape, 16 rows of 2048, without the Trainer, lora_sft's labels: a loss that trains;
# benchmarks/RESULTS.md, compiled-parts) folding gate and up ran 61.2k tokens/s against 56.5k unfolded, folding all 7
# projections 59.4k, gate and up with A folded into k, v and down (`fold_a`) 62.9k
MIN_WIDENING = 2.0


class _FoldedLora(torch.autograd.Function):
    """y = [x, s x A^T] @ [W, B]^T + bias in `dtype` with W and bias frozen: gradients for x, A and B. It keeps x
    and the weights alone (x A^T is recomputed in backward, a GEMM of rank r): a kept x A^T would be, under
    Inductor, a view of the joined input, and would keep that whole copy of x until backward. The backward runs
    grad @ W and grad @ B as one GEMM over [B, W], the forward's joined weight in the other order: the same [W, B]
    one compiled graph would share with the forward's and keep."""

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
        # grad @ B and grad @ W in one pass over grad; [B, W], not the forward's [W, B], which a compiled graph
        # would share between forward and backward and keep
        both = grad @ torch.cat([lora_b.to(dtype), weight.to(dtype)], 1)
        rank = lora_b.shape[1]
        grad_xa = both[..., :rank] * scale  # the gradient of x A^T
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (both[..., rank:] + grad_xa @ a).to(ctx.x_dtype)
        if ctx.needs_input_grad[3]:
            grad_a = (grad_xa.reshape(-1, grad_xa.shape[-1]).t() @ flat_x).to(lora_a.dtype)
        if ctx.needs_input_grad[4]:
            grad_b = (rows.t() @ (F.linear(flat_x, a) * scale)).to(lora_b.dtype)
        return grad_x, None, None, grad_a, grad_b, None, None


class _FoldedLoraA(torch.autograd.Function):
    """[x W^T, s x A^T] = x @ [W, s A]^T, y = x W^T + (s x A^T) B^T + bias in `dtype`, W and bias frozen:
    gradients for x, A and B. It keeps x, the weights and s x A^T (a copy: tokens × r)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
        ctx.scale, ctx.dtype, ctx.x_dtype = scale, dtype, x.dtype
        out_features = weight.shape[0]
        both = F.linear(x.to(dtype), torch.cat([weight.to(dtype), (lora_a * scale).to(dtype)], 0))
        xa = both[..., out_features:].contiguous()  # its own storage: a view would keep `both` until backward
        ctx.save_for_backward(x, weight, lora_a, lora_b, xa)
        y = both[..., :out_features] + F.linear(xa, lora_b.to(dtype))
        return y if bias is None else y + bias.to(dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        x, weight, lora_a, lora_b, xa = ctx.saved_tensors
        dtype, scale = ctx.dtype, ctx.scale
        grad = grad.to(dtype)
        rows = grad.reshape(-1, grad.shape[-1])
        grad_xa = grad @ lora_b.to(dtype)  # the gradient of s x A^T
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            # [s A, W], not the forward's [W, s A], which a compiled graph would share between the two and keep
            joined = torch.cat([(lora_a * scale).to(dtype), weight.to(dtype)], 0)
            grad_x = (torch.cat([grad_xa, grad], -1) @ joined).to(ctx.x_dtype)
        if ctx.needs_input_grad[3]:
            flat_x = x.to(dtype).reshape(-1, x.shape[-1])
            grad_a = ((grad_xa.reshape(-1, grad_xa.shape[-1]).t() @ flat_x) * scale).to(lora_a.dtype)
        if ctx.needs_input_grad[4]:
            grad_b = (rows.t() @ xa.reshape(-1, xa.shape[-1])).to(lora_b.dtype)
        return grad_x, None, None, grad_a, grad_b, None, None


def _apply(function: Any, x: torch.Tensor, weight: torch.Tensor, *rest: Any) -> torch.Tensor:
    """`function` (a folded GEMM) in autocast's dtype where it is on (as F.linear would run), else in `weight`'s."""
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    with torch.autocast(device, enabled=False):
        return function.apply(x, weight, *rest, dtype)


def folded_a_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                    lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """x W^T + bias + scale (x A^T) B^T with x A^T from the base GEMM over [W, scale A], without gradients for
    `weight` or `bias` (`_apply`'s dtype)."""
    return _apply(_FoldedLoraA, x, weight, bias, lora_a, lora_b, scale)


def folded_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                  lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """x W^T + bias + scale (x A^T) B^T as one GEMM over [x, scale x A^T], without gradients for `weight` or
    `bias` (`_apply`'s dtype)."""
    return _apply(_FoldedLora, x, weight, bias, lora_a, lora_b, scale)


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
    fold = folded_a_linear if self.lora_fold == "a" else folded_linear
    return fold(x, self.base_layer.weight, bias, self.lora_A[name].weight, self.lora_B[name].weight,
                self.scaling[name])


def _plain(module: Any) -> bool:
    """A PEFT LoRA `Linear` without dropout over a plain `nn.Linear` (not a quantized, otherwise wrapped or hooked
    one: the folded forward reads its weight and skips its forward) of a floating-point weight."""
    from peft.tuners.lora.layer import Linear

    if type(module) is not Linear or type(module.base_layer) is not torch.nn.Linear:
        return False
    base = module.base_layer
    if base._forward_hooks or base._forward_pre_hooks or hasattr(base, "_hf_hook"):
        return False
    if not all(isinstance(d, torch.nn.Identity) for d in module.lora_dropout.values()):
        return False  # PEFT's forward applies the dropout to LoRA's input alone
    return type(base.weight) is torch.nn.Parameter and base.weight.dtype.is_floating_point


def qualifies(module: Any, min_widening: float = MIN_WIDENING) -> bool:
    """A plain LoRA linear (`_plain`) whose output is at least `min_widening` × its input: LoRA B can fold."""
    return _plain(module) and module.base_layer.weight.shape[0] >= min_widening * module.base_layer.weight.shape[1]


def qualifies_a(module: Any, min_widening: float = MIN_WIDENING) -> bool:
    """A plain LoRA linear (`_plain`) whose input is at least `min_widening` × its output: LoRA A can fold."""
    return _plain(module) and module.base_layer.weight.shape[1] >= min_widening * module.base_layer.weight.shape[0]


def apply(model: Any, min_widening: float = MIN_WIDENING, fold_a: bool = False) -> list[str]:
    """Folds LoRA B into the base GEMM of every qualifying projection of `model` (its instance forward) and, with
    `fold_a`, LoRA A into the base GEMM of every projection that narrows as much (`qualifies_a`); returns their
    names. Each folded module's `lora_fold` says which: "b" or "a"."""
    names = []
    for name, module in model.named_modules():
        if "forward" in module.__dict__:  # not over another instance forward
            continue
        fold = "b" if qualifies(module, min_widening) else "a" if fold_a and qualifies_a(module, min_widening) else None
        if fold:
            module.lora_fold = fold
            module.forward = types.MethodType(_forward, module)
            names.append(name)
    return names
