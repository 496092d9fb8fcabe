"""The peft backend's fast paths against its plain transformers path, on a CUDA GPU: liger-kernel, and the compiled
path (compiled layers, packed flash varlen attention, chunked loss, bf16 LoRA matmuls). The same LoRA weights and the
same packed batch give the same loss and the same LoRA gradients within bf16 tolerance. Skips (saying why) without
CUDA, and the liger cases without the liger-kernel package."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
import torch
from lora_runtime import LoraSftConfig
from lora_runtime.backends.peft import PeftBackend
from lora_runtime.batching import fixed_plan
from lora_runtime.collate import collate_packed

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _batch(vocab: int) -> dict:
    """Two packed rows of 128 tokens (samples of 50+40+38 and 70+30, pad tail), loss on every real token."""
    rng = np.random.default_rng(0)
    rows = []
    for lens in ([50, 40, 38], [70, 30]):
        ids = np.zeros(128, dtype=np.int64)
        ids[: sum(lens)] = rng.integers(3, vocab, sum(lens))
        mask = np.zeros(128, dtype=np.uint8)
        mask[: sum(lens)] = 1
        rows.append({"input_ids": ids, "loss_mask": mask, "seq_lens": np.array(lens)})
    batch = collate_packed(rows)
    batch.pop("num_tokens")
    return {name: t if name == "packed_seq_lengths" else t.cuda() for name, t in batch.items()}


def _loss_and_grads(model_dir, tmp_path, kernels: str, targets, offloaded: int = 0, seen: list | None = None,
                    cuda_graphs: bool | str = False, steps: int = 1, accumulation: int = 1,
                    selective: str = "off") -> tuple[float, dict]:
    """The loss and LoRA gradients of the last of `steps` steps, each after an SGD update (so a replayed graph must
    read the updated weights) and each of `accumulation` passes over the batch, their gradients summed."""
    config = LoraSftConfig(str(model_dir), "d", str(tmp_path / kernels), backend="peft", kernels=kernels,
                           target_modules=targets, micro_batch_size=2, gradient_checkpointing=False,
                           activation_offload=offloaded > 0, cuda_graphs=cuda_graphs, selective_recompute=selective)
    plan = fixed_plan(config, 1, offloaded_layers=offloaded)
    backend = PeftBackend()
    model, _ = backend.load(config, plan)
    model = backend.add_lora(model, config, plan)
    generator = torch.Generator().manual_seed(1)
    for name, p in sorted(model.named_parameters()):  # B = 0 at init would leave A without gradient
        if "lora_B" in name:
            p.data.copy_(torch.randn(p.shape, generator=generator) * 0.02)
    model.train()
    batch = _batch(model.config.vocab_size)
    n = int((batch["labels"] != -100).sum())
    trained = [p for p in model.parameters() if p.requires_grad]
    for step in range(steps):
        if step:
            with torch.no_grad():
                for p in trained:
                    p -= 0.5 * p.grad
                    p.grad = None
        for _ in range(accumulation):
            with torch.autocast("cuda", dtype=torch.bfloat16):  # as the trainer runs it (bf16 mixed precision)
                # a divisor other than the targets' count (gradient accumulation's): a loss ignoring it would differ
                out = model(**batch, num_items_in_batch=torch.tensor(n + 7, device="cuda"))
            out.loss.backward()
    grads = {name: p.grad.float().clone() for name, p in model.named_parameters() if p.requires_grad}
    if seen is not None:
        seen.append(getattr(model, "activation_offload", None))
    return float(out.loss), grads


def _assert_close(plain: dict, fused: dict) -> None:
    assert fused.keys() == plain.keys() and plain
    for name, g in plain.items():
        cos = torch.nn.functional.cosine_similarity(g.flatten(), fused[name].flatten(), dim=0)
        assert cos > 0.99 and (fused[name].norm() / g.norm() - 1).abs() < 0.05, (name, float(cos))


LM_HEAD_TARGETS = ("q_proj", "v_proj", "gate_proj", "lm_head")
PATHS = {  # kernels → (what its log says, what it says only without a LoRA on lm_head)
    "compile": (("kernels: compiled path", "decoder layers compiled"), "chunked loss"),  # lm_head: transformers' loss
    "liger": (("kernels: liger rope, rms_norm, swiglu",), "fused_linear_cross_entropy"),
}


@pytest.mark.parametrize("kernels", [
    "compile", pytest.param("liger", marks=pytest.mark.skipif(
        importlib.util.find_spec("liger_kernel") is None, reason="needs liger-kernel"))])
@pytest.mark.parametrize("model_fixture", ["tiny_qwen2_dir", "tiny_llama_dir"])
@pytest.mark.parametrize("targets", [None, LM_HEAD_TARGETS])
def test_loss_and_lora_gradients_match_the_plain_path(request, tmp_path, capsys, kernels, model_fixture, targets):
    """After an `import unsloth` in the process (the unsloth backend's tests), the models Unsloth patched compute the
    loss from lm_head's base weight: a LoRA on lm_head is refused there (it would get no gradient), and the comparison
    runs in a process of its own."""
    import subprocess

    model_dir = request.getfixturevalue(model_fixture)
    if targets is not None and "unsloth" in sys.modules:
        from lora_runtime import ConfigError

        with pytest.raises(ConfigError, match="puts a LoRA on lm_head, but Unsloth is imported in this process"):
            _loss_and_grads(model_dir, tmp_path, "none", targets)
        fresh = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", request.node.nodeid],
                               cwd=request.config.rootpath, capture_output=True, text=True, timeout=900)
        assert fresh.returncode == 0 and " passed" in fresh.stdout, fresh.stdout[-5000:]
        return
    plain_loss, plain = _loss_and_grads(model_dir, tmp_path, "none", targets)
    loss, fused = _loss_and_grads(model_dir, tmp_path, kernels, targets)
    log = capsys.readouterr().out
    always, only_without_head_adapter = PATHS[kernels]
    assert all(words in log for words in always)
    assert (only_without_head_adapter in log) == (targets is None)
    assert loss == pytest.approx(plain_loss, rel=1e-2)
    _assert_close(plain, fused)


@pytest.mark.parametrize("selective", ["off", "pointwise", "most"])
@pytest.mark.parametrize("model_fixture", ["tiny_qwen2_dir", "tiny_llama_dir"])
def test_cuda_graphs_replay_the_compiled_layers_with_the_same_numbers(request, tmp_path, capsys, model_fixture,
                                                                      selective):
    """cuda_graphs=True (no layer checkpointed; a selective_recompute level's recomputation inside the graphs): four
    steps, each after an update of the LoRA weights, so the graphs are recorded and then replayed on the updated
    weights, each of two passes whose gradients add up (the second pass's replay must not overwrite the first's);
    loss and gradients equal the compiled path without graphs."""
    from torch._dynamo.utils import counters

    model_dir = request.getfixturevalue(model_fixture)
    plain_loss, plain = _loss_and_grads(model_dir, tmp_path, "compile", None, cuda_graphs=False, steps=4,
                                        accumulation=2, selective=selective)
    torch._dynamo.reset()
    counters.clear()
    loss, graphed = _loss_and_grads(model_dir, tmp_path, "compile", None, cuda_graphs=True, steps=4, accumulation=2,
                                    selective=selective)
    log = capsys.readouterr().out
    assert "each replaying CUDA graphs" in log and "CUDA graphs off (cuda_graphs=False)" in log
    # recorded, not skipped by Inductor (the log line says what was asked for)
    assert counters["inductor"]["cudagraph_skips"] == 0 and counters["inductor"]["cudagraph_recorded_non_static_inputs"]
    assert selective == "off" or "recomputed in their backward" in log
    assert ("LoRA A into the GEMM of" in log) == (selective == "off")  # down's A folded without a level
    assert loss == pytest.approx(plain_loss, rel=1e-3)
    _assert_close(plain, graphed)


@pytest.mark.parametrize("kernels", ["compile", "none"])
# of 4 layers: 2; 1 and 3 (both held into backward, `offload.IN_FLIGHT`); 0, 2 and 3 (0 copied back)
@pytest.mark.parametrize("offloaded", [1, 2, 3])
def test_offloaded_layers_give_the_same_loss_and_gradients(four_layer_llama, tmp_path, monkeypatch, kernels, offloaded):
    """activation_offload on CUDA: the layers' saved tensors go to pinned host memory on a side stream and come back
    for backward; the copies are exact, so loss and LoRA gradients equal the run without (same kernels; the
    tolerance is FlashAttention's backward, which accumulates in a varying order)."""
    from lora_runtime import offload

    monkeypatch.setattr(offload, "MIN_BYTES", 0)  # the tiny model's tensors are all small
    copied_back: list = []
    copy_in = offload.ActivationOffload._copy_in

    def recording(self, state, slots):
        copied_back.append(self.indices[self.layers.index(state)])
        return copy_in(self, state, slots)

    monkeypatch.setattr(offload.ActivationOffload, "_copy_in", recording)
    plain_loss, plain = _loss_and_grads(four_layer_llama, tmp_path, kernels, None)
    seen: list = []
    loss, grads = _loss_and_grads(four_layer_llama, tmp_path, kernels, None, offloaded=offloaded, seen=seen)
    assert seen[0].indices == offload.spread(0, offloaded, 4) and seen[0].bytes_per_step > 0
    assert copied_back == seen[0].indices[:-offload.IN_FLIGHT]  # the last IN_FLIGHT offloaded layers keep theirs
    assert all(state.fetched == {} for state in seen[0].layers)  # every copy came back and was used
    assert loss == pytest.approx(plain_loss, rel=1e-3)
    _assert_close(plain, grads)


@pytest.mark.parametrize(("level", "offloaded"), [("pointwise", 0), ("most", 0), ("most", 3)])
def test_selective_recompute_gives_the_same_loss_and_gradients(four_layer_llama, tmp_path, monkeypatch, capsys, level,
                                                               offloaded):
    """selective_recompute on the GPU (Inductor partitions each compiled layer at the level's activation memory
    budget and recomputes the rest inside its backward), alone and with offloaded layers: loss and LoRA gradients
    equal the compiled path keeping everything."""
    from lora_runtime import compiled, offload

    monkeypatch.setattr(offload, "MIN_BYTES", 0)
    plain_loss, plain = _loss_and_grads(four_layer_llama, tmp_path, "compile", None)
    loss, grads = _loss_and_grads(four_layer_llama, tmp_path, "compile", None, offloaded=offloaded, selective=level)
    assert f"{compiled.LEVEL_WORDS[level]} in their backward" in capsys.readouterr().out
    assert loss == pytest.approx(plain_loss, rel=1e-3)
    _assert_close(plain, grads)


def test_offload_lowers_the_peak_by_the_layers_it_takes_off_the_gpu():
    """Eight blocks of [8192, 1024] activations, six offloaded: the forward's peak keeps about two of those six
    (`offload.IN_FLIGHT`), however far the host runs ahead, and the gradients stay exact."""
    from lora_runtime import offload

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up, self.down = torch.nn.Linear(1024, 2048), torch.nn.Linear(2048, 1024)

        def forward(self, x):
            return x + self.down(torch.nn.functional.gelu(self.up(x)))

    def run(offloaded: int) -> tuple[int, dict]:
        torch.manual_seed(0)
        stack = torch.nn.Sequential(*(Block() for _ in range(8))).cuda()
        if offloaded:
            offload.ActivationOffload(list(stack[:offloaded]), stack.parameters(), "cuda")
        x = torch.randn(8192, 1024, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        stack(x).square().mean().backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base, {n: p.grad for n, p in stack.named_parameters()}

    keep_peak, keep = run(0)
    off_peak, grads = run(6)
    per_block = keep_peak / 8  # about one block's saved tensors (and a little working memory)
    assert off_peak < keep_peak - 3 * per_block, (keep_peak, off_peak)
    for name, g in keep.items():
        torch.testing.assert_close(grads[name], g, atol=0, rtol=0, msg=name)


@pytest.mark.parametrize("vocab", [151_936, 1_000])  # Qwen2.5's vocabulary (37 blocks, a ragged last one); one block
def test_the_loss_kernel_equals_the_aten_steps_on_the_gpu(monkeypatch, vocab):
    """The chunked loss through its Triton kernel against the same loss through the aten steps, bf16 as the compiled
    path runs it: 3 chunks with a ragged last one, ignored targets, gradient accumulation's divisor."""
    from lora_runtime import chunked_loss

    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(2, 1200, 256, device="cuda", generator=g).bfloat16()
    weight = (torch.randn(vocab, 256, device="cuda", generator=g) / 16).bfloat16()
    labels = torch.randint(0, vocab, (2, 1200), device="cuda", generator=g)
    labels[:, :300] = chunked_loss.IGNORE_INDEX
    results = []
    for fused in (True, False):
        monkeypatch.setattr(chunked_loss, "kernel_usable", lambda device, fused=fused: fused)
        h = hidden.clone().requires_grad_(True)
        loss = chunked_loss.causal_lm_loss(h, weight, labels, torch.tensor(1700.0, device="cuda"), chunk=1024)
        loss.backward()
        results.append((loss.detach().float(), h.grad.float()))
    (loss, grad), (want_loss, want_grad) = results
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, want_grad, rtol=2e-2, atol=1e-6)  # bf16 gradients of the logits, summed
    assert grad[:, :299].abs().max() == 0 and grad[:, 299:].abs().max() > 0


def test_picking_the_rows_with_a_target_on_the_gpu_asks_nothing_of_the_host():
    """With the number of targets given (as the trainer counts it on the host), the loss makes logits for those rows
    alone (nonzero_static of that size, gathered and scattered back in bf16) without a device-to-host sync: the same
    loss and gradient as every row making logits, under CUDA's sync check."""
    from lora_runtime import chunked_loss

    g = torch.Generator(device="cuda").manual_seed(1)
    hidden = torch.randn(2, 1200, 256, device="cuda", generator=g).bfloat16()
    weight = (torch.randn(151_936, 256, device="cuda", generator=g) / 16).bfloat16()
    labels = torch.randint(0, 151_936, (2, 1200), device="cuda", generator=g)
    labels[:, :700] = chunked_loss.IGNORE_INDEX  # a prompt: 1,000 targets (labels 700-1199 of each row) of 2,400 rows
    results = []
    assert int((labels[:, 1:] != chunked_loss.IGNORE_INDEX).sum()) == 1000
    for n_targets in (None, 1000):
        h = hidden.clone().requires_grad_(True)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            loss = chunked_loss.causal_lm_loss(h, weight, labels, chunk=1024, n_targets=n_targets)
            loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        results.append((loss.detach().float(), h.grad.float()))
    (loss, grad), (want_loss, want_grad) = results[1], results[0]
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, want_grad, rtol=2e-2, atol=1e-6)
    assert grad[:, :699].abs().max() == 0 and grad[:, 699:].abs().max() > 0
