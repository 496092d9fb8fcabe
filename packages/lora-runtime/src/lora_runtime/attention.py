"""Padding-free packed attention for the transformers + PEFT backend on CUDA, without the flash-attn package.

A packed micro-batch is flattened to one row (`backends.base.flatten_hook`) and its sample boundaries, known on the
host from the collator's `packed_seq_lengths`, become `cu_seq_lens_q` (cumulative offsets, int32 on the GPU) and
`max_length_q`. The attention function registered here under `ATTENTION` runs aten's FlashAttention-2 varlen kernel
over them (GQA native): each sample attends only to itself, no [n, n] mask is built, and the GPU is never asked for
the boundaries (no device-to-host sync in a forward).

transformers calls a registered attention function with query/key/value [1, heads, tokens, head_dim]; the mask
machinery skips names it does not know, so nothing is derived from `position_ids` here.
"""

from __future__ import annotations

from typing import Any

ATTENTION = "lora_packed_varlen"  # no "flash" in it: transformers would look for the flash-attn package


def available() -> tuple[bool, str]:
    """(usable, why not) for aten's flash varlen kernel on this host."""
    import torch

    if not torch.cuda.is_available():
        return False, "no CUDA"
    if not hasattr(torch.ops.aten, "_flash_attention_forward"):
        return False, f"torch {torch.__version__} has no aten flash varlen kernel"
    if not torch.backends.cuda.is_flash_attention_available():
        return False, "this torch build has no FlashAttention kernels"
    try:
        major, _ = torch.cuda.get_device_capability()
    except (RuntimeError, AssertionError) as e:  # a driver that cannot be reached
        return False, f"the GPU cannot be queried ({e})"
    if major < 8:
        return False, "FlashAttention-2 needs compute capability 8.0 or newer"
    return True, ""


def _flash_fn() -> Any:
    import torch

    class FlashVarlen(torch.autograd.Function):
        """Causal FlashAttention-2 over packed samples: q [tokens, heads, dim], k/v [tokens, kv_heads, dim]."""

        @staticmethod
        def forward(ctx: Any, q: Any, k: Any, v: Any, cu: Any, max_len: int, scale: float | None) -> Any:
            out, lse, seed, offset, _ = torch.ops.aten._flash_attention_forward(
                q, k, v, cu, cu, max_len, max_len, 0.0, True, False, scale=scale)
            ctx.save_for_backward(q, k, v, cu, out, lse, seed, offset)
            ctx.max_len, ctx.scale = max_len, scale
            return out

        @staticmethod
        def backward(ctx: Any, grad: Any) -> Any:
            q, k, v, cu, out, lse, seed, offset = ctx.saved_tensors
            dq, dk, dv = torch.ops.aten._flash_attention_backward(
                grad.contiguous(), q, k, v, out, lse, cu, cu, ctx.max_len, ctx.max_len, 0.0, True, seed, offset,
                scale=ctx.scale)
            return dq, dk, dv, None, None, None

    return FlashVarlen


_FLASH: Any = None


def varlen_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, scaling: float | None = None,
                     dropout: float = 0.0, sliding_window: int | None = None, **kwargs: Any) -> tuple[Any, None]:
    """transformers' attention interface: [1, heads, tokens, dim] in, [1, tokens, heads, dim] out. Full causal
    attention within each sample: a sliding window shorter than the longest sample is refused, not ignored."""
    cu = kwargs.get("cu_seq_lens_q")
    if sliding_window is not None and sliding_window < int(kwargs.get("max_length_q") or 0):
        raise RuntimeError(f"{ATTENTION} runs full attention; this layer attends within a window of {sliding_window} "
                           "tokens: train it with kernels='none'")
    if cu is None or query.shape[0] != 1:
        raise RuntimeError(f"{ATTENTION} needs one flattened row and cu_seq_lens_q (the packed-batch hook makes "
                           f"them); got a batch of {query.shape[0]} row(s)")
    if dropout:
        raise RuntimeError(f"{ATTENTION} runs without attention dropout")
    q, k, v = (t.transpose(1, 2)[0] for t in (query, key, value))
    out = _FLASH.apply(q, k, v, cu, int(kwargs["max_length_q"]), scaling)
    return out.unsqueeze(0), None


def register() -> str:
    """Make `ATTENTION` a name transformers' models accept as `config._attn_implementation`."""
    from transformers import AttentionInterface

    global _FLASH
    if _FLASH is None:  # made here, outside the compiled layers (a class statement would break their graph)
        _FLASH = _flash_fn()
    AttentionInterface.register(ATTENTION, varlen_attention)
    return ATTENTION


def boundaries(seq_lengths: Any, device: Any, max_len: int | None = None, samples: int | None = None,
               ) -> dict[str, Any]:
    """`packed_seq_lengths` (int32, CPU) → the keyword arguments `varlen_attention` reads, copied without a sync.
    `max_len` bounds the longest sample (default: the longest given); `samples` pads the boundaries with empty
    samples at the end to that many (a fixed shape for CUDA graphs; FlashAttention skips an empty sample).

    >>> import torch
    >>> b = boundaries(torch.tensor([3, 4, 1], dtype=torch.int32), "cpu")
    >>> b["cu_seq_lens_q"].tolist(), b["max_length_q"]
    ([0, 3, 7, 8], 4)
    >>> boundaries(torch.tensor([3, 4, 1], dtype=torch.int32), "cpu", samples=5)["cu_seq_lens_q"].tolist()
    [0, 3, 7, 8, 8, 8]
    """
    import torch

    lengths = torch.as_tensor(seq_lengths, dtype=torch.int32, device="cpu")
    if samples is not None and samples < len(lengths):
        raise ValueError(f"{len(lengths)} samples do not fit {samples} boundary slots")
    cu = torch.zeros((samples or len(lengths)) + 1, dtype=torch.int32)
    torch.cumsum(lengths, 0, out=cu[1:len(lengths) + 1])
    cu[len(lengths) + 1:] = cu[len(lengths)]
    if torch.device(device).type == "cuda":
        cu = cu.pin_memory().to(device, non_blocking=True)
    return {"cu_seq_lens_q": cu, "max_length_q": int(lengths.max()) if max_len is None else int(max_len)}
