"""Causal-LM cross-entropy straight from the last hidden states, chunk by chunk, without a device-to-host sync.

transformers builds the [tokens, vocab] logits, an fp32 copy and its gradient: about 10 bytes × vocab a token, 6 GiB
for 4k tokens of a 152k vocabulary. liger's fused kernel avoids that but asks the GPU for the number of targets
(`.item()`) in every forward, which stalls the host once a step: with compiled layers and 2 rows of 2048 a pass,
21.7k tokens/s against 31.5k with this loss (one H200, benchmarks/RESULTS.md, `compiled-parts`: both on a feed whose
loss turned NaN, which reads high alike). Here each chunk of `chunk_tokens` rows makes its logits, their loss and, at
once, the gradient of the loss with respect to its hidden states (the output layer is frozen under LoRA), so only one
chunk's logits exist at a time and backward is a multiply. The divisor stays a tensor on the device throughout.

On a CUDA GPU one Triton kernel (`_softmax_grad_kernel`) turns a chunk's bf16 logits into each row's loss and, in
place, the gradient: two reads and one write of the bf16 logits, where the same steps in aten (an fp32 copy,
logsumexp, subtract, exp, scatter, mask, cast back) make about nine passes over fp32 logits. With it the compiled
path's whole-card default on one H100 (Qwen2.5-1.5B shape, 16 rows of 2048 a step) ran about 1.18× as fast as
before it, in two runs of the same scenario (benchmarks/RESULTS.md, `frontier`, 2026-12-05; a ratio of readings each
about 8/7 high), and 1.50× the Unsloth hand loop measured in the same run (56.2k tokens/s). Elsewhere (a CPU) the
aten steps run.

Given the number of targets in the batch (`TARGETS_KWARG`, counted by the trainer on the host from the CPU labels),
where at most `PICK_SHARE` of the rows have one, only those rows make logits: they are picked out on the GPU without
a sync (`torch.nonzero_static` of that size), and the others (prompts, sample starts, padding) get a zero gradient.
The output layer's two matmuls, about 15% of a Qwen2.5-1.5B step's FLOPs, then scale with the targets rather than
the tokens: where half the tokens have a target, the compiled path's whole-card default on one H100 ran 66.9k-67.1k
tokens/s against 63.7k with every row making logits, peaks equal (benchmarks/RESULTS.md, `prompts`). The picked
rows' hidden states are copied, beside their gradient: at that share at most half a [tokens, hidden] bf16 tensor
more than the whole gradient without picking (50 MB for 16 rows of 2048 and hidden 1536, within the batch plan's
OVERHEAD_BYTES), and less below half. Above it the saving is small and the copy larger, so every row makes logits,
as without a count: on the usual records (93% of the tokens with a target) picking at any share ran 63.8k against
63.7k on one H100 (`prompts`, its usual-records rows).

Loss and gradient equal transformers' `ForCausalLMLoss` (`test_chunked_loss.py`: fp32 rounding apart): labels shifted by
one, IGNORE_INDEX skipped, mean over the targets or, with `num_items_in_batch`, their sum divided by it.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

IGNORE_INDEX = -100
# the model call's keyword for the number of targets of its labels (those not IGNORE_INDEX), which `apply`'s forward
# takes out; `counts_targets(model)` says whether a model takes it (`target_count` counts)
TARGETS_KWARG = "num_loss_targets"
APPLIED = "_lora_runtime_chunked_loss"  # set on a model `apply` gave this loss
PICK_SHARE = 0.75  # with the count given, at most this share of rows with a target: only those rows make logits
CHUNK_BYTES = 1 << 30  # transient logits of one chunk: fp32 [chunk, vocab] plus its bf16 matmul output
# bytes a logit of a chunk holds at the peak: the aten steps keep the bf16 matmul output, its fp32 copy and a bf16
# gradient (8); the kernel works in place on the bf16 matmul output (2)
TRANSIENT_BYTES = {False: 8.0, True: 2.0}


def chunk_tokens(vocab_size: int) -> int:
    """Rows a chunk, a power of two whose logits (6 bytes × vocab a row) stay within CHUNK_BYTES.

    >>> chunk_tokens(151_936), chunk_tokens(32_000)
    (1024, 4096)
    """
    rows = max(1, CHUNK_BYTES // (6 * vocab_size))
    return max(128, min(8192, 1 << (rows.bit_length() - 1)))


@functools.cache
def _triton_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def kernel_usable(device: Any) -> bool:
    """Whether chunks on `device` go through the Triton kernel: a CUDA device with Triton installed (or Triton's
    interpreter asked for with TRITON_INTERPRET=1, the way the tests run it on a CPU). Asked on every loss call:
    the package lookup is made once."""
    import os

    if not _triton_installed():
        return False
    return getattr(device, "type", device) == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _softmax_grad() -> Any:
    """The Triton kernel, built on first use: one program a row of logits [rows, vocab] (bf16 or fp32, contiguous
    rows). Pass one: an online max and sum of exponentials → logsumexp; the row's loss (logsumexp − target logit, 0
    for an ignored target) to `loss`. Pass two, with GRAD: the row becomes softmax − one-hot (zeros for an ignored
    target), in the logits' dtype, computed in fp32."""
    import triton
    import triton.language as tl

    @triton.jit
    def _softmax_grad_kernel(logits, stride, targets, loss, vocab, IGNORE: tl.constexpr, GRAD: tl.constexpr,
                             BLOCK: tl.constexpr):
        row = logits + tl.program_id(0).to(tl.int64) * stride
        y = tl.load(targets + tl.program_id(0))
        keep = y != IGNORE
        safe = tl.where(keep, y, 0)
        m = tl.full((), float("-inf"), tl.float32)
        total = tl.full((), 0.0, tl.float32)
        for start in range(0, vocab, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(row + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
            top = tl.maximum(m, tl.max(x, 0))
            total = total * tl.exp(m - top) + tl.sum(tl.exp(x - top), 0)
            m = top
        lse = m + tl.log(total)
        target = tl.load(row + safe).to(tl.float32)
        tl.store(loss + tl.program_id(0), tl.where(keep, lse - target, 0.0))
        if GRAD:
            for start in range(0, vocab, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                x = tl.load(row + cols, mask=cols < vocab, other=0.0).to(tl.float32)
                p = tl.exp(x - lse) - tl.where(cols == safe, 1.0, 0.0)
                p = tl.where(keep, p, 0.0)
                tl.store(row + cols, p.to(row.dtype.element_ty), mask=cols < vocab)

    return _softmax_grad_kernel


def softmax_loss_(logits: Any, targets: Any, grad: bool, block: int = 4096) -> Any:
    """Each row's loss (fp32 [rows]) from `logits` [rows, vocab]; with `grad`, `logits` becomes d loss_sum / d logits
    in place (the Triton kernel)."""
    import torch

    if logits.stride(1) != 1 or not targets.is_contiguous():
        raise ValueError("softmax_loss_ needs rows of adjacent logits and contiguous targets")
    loss = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    if logits.shape[0]:
        block = min(block, 1 << (logits.shape[1] - 1).bit_length())
        launch = _softmax_grad()[(logits.shape[0],)]
        # Triton launches on the current device: make it the logits' own
        with torch.cuda.device(logits.device) if logits.is_cuda else contextlib.nullcontext():
            launch(logits, logits.stride(0), targets, loss, logits.shape[1], IGNORE=IGNORE_INDEX, GRAD=grad,
                   BLOCK=block, num_warps=8)
    return loss


def _function() -> Any:
    import torch

    class ChunkedLinearCrossEntropy(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, hidden: Any, weight: Any, targets: Any, divisor: Any, chunk: int,
                    count: int | None) -> Any:
            ctx.rows, picked, wants_grad = hidden.shape[0], None, hidden.requires_grad
            if count is not None and count <= PICK_SHARE * hidden.shape[0]:  # only rows with a target make logits
                picked = torch.nonzero_static(targets != IGNORE_INDEX, size=count).squeeze(1)
                hidden, targets = hidden.index_select(0, picked), targets.index_select(0, picked)
            grad = torch.empty_like(hidden) if wants_grad else None
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            loss_of = _kernel_chunk if kernel_usable(hidden.device) else _aten_chunk
            for start in range(0, hidden.shape[0], chunk):
                rows = slice(start, start + chunk)  # a chunk's logits die with its call: one chunk's at a time
                total += loss_of(hidden[rows], targets[rows], weight, None if grad is None else grad[rows])
            ctx.save_for_backward(grad, divisor, picked)
            return total / divisor

        @staticmethod
        def backward(ctx: Any, grad_out: Any) -> Any:
            grad, divisor, picked = ctx.saved_tensors
            scale = grad_out.float() / divisor  # in fp32: a bf16 scale would be off by up to 0.4% for a whole step
            grad = (grad.float() * scale).to(grad.dtype)
            if picked is not None:  # the rows without a target get none
                grad = grad.new_zeros((ctx.rows, grad.shape[1])).index_copy_(0, picked, grad)
            return grad, None, None, None, None, None

    def _kernel_chunk(h: Any, y: Any, weight: Any, out: Any) -> Any:
        """A chunk's summed loss through the Triton kernel, on the matmul's own output; with `out`, d loss_sum / d h
        into it."""
        logits = h @ weight.t()
        total = softmax_loss_(logits, y, out is not None).sum()
        if out is not None:
            _into(out, logits, weight)
        return total

    def _aten_chunk(h: Any, y: Any, weight: Any, out: Any) -> Any:
        """The same through aten's steps, in fp32."""
        logits = (h @ weight.t()).float()
        lse = torch.logsumexp(logits, dim=-1)
        keep = y != IGNORE_INDEX
        safe = torch.where(keep, y, 0).unsqueeze(1)
        total = torch.where(keep, lse - logits.gather(1, safe).squeeze(1), 0.0).sum()
        if out is not None:  # d loss_sum / d logits = softmax − one-hot, on kept rows only
            probs = logits.sub_(lse.unsqueeze(1)).exp_()
            probs.scatter_add_(1, safe, torch.full_like(safe, -1, dtype=probs.dtype))
            probs.mul_(keep.unsqueeze(1))
            _into(out, probs.to(weight.dtype), weight)
        return total

    def _into(out: Any, d_logits: Any, weight: Any) -> None:
        """out = d_logits @ weight, without a temporary where the dtypes agree (under autocast they may not)."""
        if d_logits.dtype == weight.dtype == out.dtype:
            torch.mm(d_logits, weight, out=out)
        else:
            out.copy_(d_logits.to(weight.dtype) @ weight)

    return ChunkedLinearCrossEntropy


_FN: Any = None


def causal_lm_loss(hidden: Any, weight: Any, labels: Any, num_items_in_batch: Any = None,
                   chunk: int | None = None, n_targets: int | None = None) -> Any:
    """transformers' ForCausalLMLoss(hidden @ weight.T, labels) without the logits: hidden [..., n, H], labels
    [..., n]. `weight` (the output layer's) gets no gradient. `n_targets`, where known on the host, is the number of
    labels (after the shift by one) that are not IGNORE_INDEX (`target_count`): where they are at most PICK_SHARE of
    the rows, only their rows make logits."""
    import torch

    global _FN
    if _FN is None:
        _FN = _function()
    targets = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].reshape(-1)
    hidden = hidden.reshape(-1, hidden.shape[-1])
    if num_items_in_batch is None:
        divisor = (targets != IGNORE_INDEX).sum().clamp_min(1).float()
    else:
        divisor = torch.as_tensor(num_items_in_batch, device=hidden.device, dtype=torch.float32)
    # a target outside the vocabulary (tokens added to a tokenizer, embeddings not resized) stops the run as aten's
    # gather would, without waiting for the device (the kernel would read past its row)
    targets = targets.to(hidden.device)
    torch._assert_async(((targets >= 0) & (targets < weight.shape[0]) | (targets == IGNORE_INDEX)).all(),
                        "a label is outside the output layer's vocabulary")
    if n_targets is not None:  # a wrong count would pick the wrong rows
        torch._assert_async((targets != IGNORE_INDEX).sum() == n_targets,
                            "the count of targets given is not the labels'")
    return _FN.apply(hidden, weight.detach(), targets, divisor, chunk or chunk_tokens(weight.shape[0]),
                     n_targets)


def target_count(labels: Any) -> int | None:
    """The number of targets `causal_lm_loss` finds in CPU `labels` [rows, n], or None where that depends on whether
    the rows are flattened into one (a row whose first label is not IGNORE_INDEX: a flattened batch's shift makes it
    the previous row's last target). lora_runtime.collate ignores every sample's first label.

    >>> import torch
    >>> target_count(torch.tensor([[-100, 5, 6, -100], [-100, -100, 7, 8]])), target_count(torch.tensor([[1, 2]]))
    (4, None)
    """
    if labels is None or labels.device.type != "cpu" or labels.dim() != 2 or bool((labels[:, 0] != IGNORE_INDEX).any()):
        return None
    return int((labels != IGNORE_INDEX).sum())


def counts_targets(model: Any) -> bool:
    """Whether `model` (a PeftModel or the model under it) computes its loss here and takes TARGETS_KWARG."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return bool(getattr(base, APPLIED, False))


MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")  # logits = lm_head(hidden), no softcap or scale in between


def applicable(model: Any) -> tuple[bool, str]:
    """(usable, why not) for this transformers causal LM, before LoRA wraps it."""
    import torch

    model_type = getattr(model.config, "model_type", None)
    if model_type not in MODEL_TYPES:
        return False, f"model type {model_type!r} is not one whose logits are lm_head(hidden) alone"
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear or head.bias is not None or not hasattr(model, "model"):
        return False, "the output layer is not a plain bias-free Linear"
    return True, ""


def apply(model: Any) -> None:
    """Give `model` (a transformers causal LM, before LoRA wraps it) a forward that computes a training loss with
    `causal_lm_loss` (no logits returned); evaluation gets it too with `skip_logits=True`. Everything else, and a
    LoRA-wrapped output layer, goes through the model's own forward."""
    import types

    import torch
    from transformers.modeling_outputs import CausalLMOutputWithPast

    own = type(model).forward

    def forward(self: Any, *args: Any, labels: Any = None, skip_logits: bool | None = None, **kwargs: Any) -> Any:
        head = self.get_output_embeddings()
        fused = self.training if skip_logits is None else skip_logits
        count = kwargs.pop(TARGETS_KWARG, None)
        if args or labels is None or not fused or type(head) is not torch.nn.Linear:
            return own(self, *args, labels=labels, **kwargs)
        num_items = kwargs.pop("num_items_in_batch", None)
        kwargs.pop("logits_to_keep", None)
        out = self.model(**kwargs)
        loss = causal_lm_loss(out.last_hidden_state, head.weight, labels, num_items, n_targets=count)
        return CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=out.past_key_values)

    model.forward = types.MethodType(forward, model)
    setattr(model, APPLIED, True)
