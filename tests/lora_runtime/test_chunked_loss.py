"""The chunked, sync-free causal-LM loss equals transformers' own, value and gradient, in fp32 on the CPU: through the
aten steps and through the Triton kernel a CUDA GPU runs (here in Triton's interpreter)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lora_runtime import chunked_loss
from transformers.loss.loss_utils import ForCausalLMLoss

VOCAB, HIDDEN = 97, 16


INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # the Triton kernel's run of this file (the last test)


@pytest.fixture
def path():
    """Which way a chunk's loss and gradient are computed: aten (a CPU's), or, in the run under Triton's interpreter,
    the Triton kernel a CUDA GPU runs."""
    assert chunked_loss.kernel_usable(torch.device("cpu")) == INTERPRETED
    return "triton" if INTERPRETED else "aten"


def _inputs(seed: int = 0, rows: int = 2, n: int = 37):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, n, HIDDEN, generator=g, dtype=torch.float64).float().requires_grad_(True)
    weight = torch.randn(VOCAB, HIDDEN, generator=g)
    labels = torch.randint(0, VOCAB, (rows, n), generator=g)
    labels[torch.rand(rows, n, generator=g) < 0.3] = chunked_loss.IGNORE_INDEX  # prompts, sample starts, padding
    return hidden, weight, labels


def _reference(hidden, weight, labels, num_items=None):
    h = hidden.detach().clone().requires_grad_(True)
    loss = ForCausalLMLoss(h @ weight.t(), labels, VOCAB, num_items_in_batch=num_items)
    loss.backward()
    return loss.detach(), h.grad


@pytest.mark.parametrize("chunk", [5, 16, 1000])  # several chunks with a ragged last one; one chunk
@pytest.mark.parametrize("num_items", [None, 23])  # mean over targets; gradient accumulation's sum ÷ N
@pytest.mark.parametrize("counted", [False, True])  # the number of targets known: only their rows make logits
def test_loss_and_gradient_equal_transformers(path, chunk, num_items, counted):
    hidden, weight, labels = _inputs()
    labels[:, :12] = chunked_loss.IGNORE_INDEX  # a prompt: well under PICK_SHARE of the rows have a target
    want_loss, want_grad = _reference(hidden, weight, labels, num_items)
    n_targets = int((labels[:, 1:] != chunked_loss.IGNORE_INDEX).sum()) if counted else None
    assert (n_targets or 0) <= chunked_loss.PICK_SHARE * labels.numel()
    loss = chunked_loss.causal_lm_loss(hidden, weight, labels, num_items, chunk=chunk, n_targets=n_targets)
    (loss * 3).backward()  # an upstream gradient other than 1 is carried through
    torch.testing.assert_close(loss.detach(), want_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(hidden.grad, 3 * want_grad, rtol=1e-5, atol=1e-6)


def test_ignored_targets_get_no_gradient_and_an_all_ignored_batch_is_zero(path):
    hidden, weight, labels = _inputs()
    labels[:, :20] = chunked_loss.IGNORE_INDEX
    chunked_loss.causal_lm_loss(hidden, weight, labels, chunk=8).backward()
    assert hidden.grad[:, :19].abs().max() == 0  # position t predicts label t+1: t < 19 all ignored
    assert hidden.grad[:, 19:].abs().max() > 0
    hidden.grad = None
    labels[:] = chunked_loss.IGNORE_INDEX
    loss = chunked_loss.causal_lm_loss(hidden, weight, labels, chunk=8)
    loss.backward()
    assert loss.item() == 0 and hidden.grad.abs().max() == 0


def test_given_the_target_count_only_rows_with_a_target_make_logits(path):
    """The output layer's matmuls scale with the targets: half the rows ignored, about half the FLOPs. Where more
    than PICK_SHARE of the rows have a target, every row makes logits."""
    from torch.utils.flop_counter import FlopCounterMode

    hidden, weight, labels = _inputs(rows=2, n=40)
    labels[:, :20] = chunked_loss.IGNORE_INDEX  # at most 19 targets a row: position 19 predicts label 20, ... 38 → 39
    count = int((labels != chunked_loss.IGNORE_INDEX).sum())
    assert 20 < count <= 40
    flops = []
    for n_targets in (None, count):
        with FlopCounterMode(display=False) as counter:
            chunked_loss.causal_lm_loss(hidden, weight, labels, chunk=8, n_targets=n_targets).backward()
        flops.append(counter.get_total_flops())
    assert flops[1] == pytest.approx(flops[0] * count / 80, rel=0.01), flops
    with pytest.raises(RuntimeError, match="the count of targets given is not the labels'"):
        chunked_loss.causal_lm_loss(hidden, weight, labels, chunk=8, n_targets=count - 1)
    labels[:, :] = 3
    with FlopCounterMode(display=False) as counter:
        chunked_loss.causal_lm_loss(hidden, weight, labels, chunk=8, n_targets=78).backward()
    assert counter.get_total_flops() == flops[0]


def test_the_trainer_counts_the_targets_for_a_model_with_this_loss(tiny_qwen2_dir):
    """PackedTrainer._prepare_inputs counts a batch's targets on the host (CPU labels) where the model computes its
    loss here: the same loss and gradients as without the count. A model without it, or labels whose rows do not
    each start with an ignored label (flattening would move their targets), get no count."""
    from types import SimpleNamespace

    from lora_runtime.collate import collate_packed
    from lora_runtime.trainer import PackedTrainer
    from transformers import AutoModelForCausalLM

    g = torch.Generator().manual_seed(3)
    rows = [{"input_ids": torch.randint(5, 200, (32,), generator=g).numpy(),
             "loss_mask": (torch.arange(32) % 3 != 0).long().numpy(), "seq_lens": [12, 15]} for _ in range(2)]
    batch = collate_packed(rows)
    batch.pop("num_tokens")
    trainer = object.__new__(PackedTrainer)
    trainer.args, trainer.is_deepspeed_enabled = SimpleNamespace(device=torch.device("cpu")), False
    results = []
    for fused in (False, True):
        trainer.model = AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir, dtype=torch.float32).train()
        if fused:
            chunked_loss.apply(trainer.model)
        inputs = trainer._prepare_inputs(batch)
        counted = inputs.get(chunked_loss.TARGETS_KWARG)
        assert counted == (int((batch["labels"] != chunked_loss.IGNORE_INDEX).sum()) if fused else None)
        assert 0 < (counted or 1) <= chunked_loss.PICK_SHARE * batch["labels"].numel()
        loss = trainer.model(**inputs).loss
        loss.backward()
        grads = {n: p.grad for n, p in trainer.model.named_parameters() if n != "lm_head.weight"}
        results.append((loss.detach(), grads))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-4, atol=1e-6, msg=name)
    unaligned = dict(batch, labels=batch["labels"].clone())
    unaligned["labels"][1, 0] = 7
    assert chunked_loss.TARGETS_KWARG not in trainer._prepare_inputs(unaligned)


def test_a_label_outside_the_vocabulary_is_an_error(path):
    """As aten's gather: the kernel would read past its row and return a wrong loss without a word."""
    hidden, weight, labels = _inputs()
    labels[1, 5] = VOCAB
    with pytest.raises(RuntimeError, match="outside the output layer's vocabulary"):
        chunked_loss.causal_lm_loss(hidden, weight, labels, chunk=8)


def test_a_model_trains_on_it_and_evaluates_with_logits(tiny_qwen2_dir):
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir, dtype=torch.float32).train()
    fused = AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir, dtype=torch.float32).train()
    assert chunked_loss.applicable(fused) == (True, "")
    chunked_loss.apply(fused)
    ids = torch.randint(5, 200, (2, 24), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :6] = chunked_loss.IGNORE_INDEX
    want, got = plain(input_ids=ids, labels=labels), fused(input_ids=ids, labels=labels)
    assert got.logits is None
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
    want.loss.backward()
    got.loss.backward()
    for (name, a), b in zip(plain.named_parameters(), fused.parameters(), strict=True):
        if name != "lm_head.weight":  # frozen under LoRA: the fused loss gives it no gradient
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)
    fused.eval()
    with torch.no_grad():
        evaluated = fused(input_ids=ids, labels=labels)
        skipped = fused(input_ids=ids, labels=labels, skip_logits=True)
    assert evaluated.logits is not None and skipped.logits is None
    torch.testing.assert_close(skipped.loss, evaluated.loss, rtol=1e-5, atol=1e-6)


def test_the_triton_kernel_passes_these_tests_in_its_interpreter():
    """This file again under TRITON_INTERPRET=1 (it must be set before Triton is imported: a process of its own):
    the loss tests above through the kernel, and the kernel's own test below."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "not interpreter",
                          str(Path(__file__))], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    summary = run.stdout.strip().splitlines()[-1]
    assert re.match(r"19 passed, 1 deselected in ", summary), f"every test of the file, none skipped: {summary}"


if INTERPRETED:
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_kernel_alone_in_place_over_several_blocks(dtype):
        """A vocabulary of several blocks with a ragged last one, rows of large logits (the online max must hold):
        per-row losses and the in-place gradient equal logsumexp − target and softmax − one-hot."""
        g = torch.Generator().manual_seed(2)
        logits = (torch.randn(6, 1000, generator=g) * 30).to(dtype)
        targets = torch.randint(0, 1000, (6,), generator=g)
        targets[3] = chunked_loss.IGNORE_INDEX
        ref = logits.float()
        keep = targets != chunked_loss.IGNORE_INDEX
        safe = targets.clamp_min(0)
        want = torch.where(keep, torch.logsumexp(ref, -1) - ref[torch.arange(6), safe], 0.0)
        want_grad = torch.softmax(ref, -1)
        want_grad[torch.arange(6), safe] -= 1
        want_grad[~keep] = 0
        loss = chunked_loss.softmax_loss_(logits, targets, grad=True, block=128)
        torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-4)
        tol = 1e-5 if dtype == torch.float32 else 4e-3  # bf16 holds the gradient to 2^-8 of its magnitude (≤ 1)
        torch.testing.assert_close(logits.float(), want_grad, rtol=0, atol=tol)
        assert logits[3].abs().max() == 0
