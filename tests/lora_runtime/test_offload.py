"""Activation offload (lora_runtime.offload) on a CPU, where its copies are clones: the LoRA gradients equal those of
a run without it exactly (fp32), on the peft backend's model with and without recomputed layers before the offloaded
ones, and on compiled layers (whose saved tensors AOTAutograd's runtime hands to the hooks); the bookkeeping (one
copy of a tensor saved twice, strides kept, layers brought back ahead of their backward, a second forward refused)
on a stack of small blocks."""

from __future__ import annotations

import pytest
import torch
from _grads import lora_grads
from lora_runtime import offload

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="bitwise equality is a CPU property (the GPU "
                                "side: test_kernels_gpu.py)")



@pytest.mark.parametrize(("recomputed", "offloaded"), [(0, 1), (0, 4), (1, 2), (2, 2)])
def test_offloaded_layers_give_the_same_gradients_exactly(four_layer_llama, monkeypatch, recomputed, offloaded):
    plain, _, none = lora_grads(four_layer_llama, gc=False, recomputed=None)
    assert none is None
    monkeypatch.setattr(offload, "MIN_BYTES", 0)  # the tiny model's tensors are all small
    grads, calls, used = lora_grads(four_layer_llama, gc=recomputed > 0, recomputed=recomputed or None,
                                    offloaded=offloaded)
    assert calls == [2] * recomputed + [1] * (4 - recomputed)  # offloaded layers run once
    assert len(used.layers) == offloaded and used.bytes_per_step > 0
    assert all(state.used > 0 for state in used.layers)  # every offloaded layer copied its tensors out
    assert all(state.fetched == {} for state in used.layers)  # ... and each came back, every handle unpacked
    assert plain.keys() == grads.keys() and len(plain) == 4 * 7 * 2
    for name, g in plain.items():
        torch.testing.assert_close(grads[name], g, atol=0, rtol=0, msg=name)


class Block(torch.nn.Module):
    """A residual MLP block whose backward saves a transposed tensor and the same tensor twice."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.up = torch.nn.Linear(width, 2 * width)
        self.down = torch.nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.silu(self.up(x))
        return x + self.down(h * h) + (x.t() @ x).sum() * 1e-3


def _stack(compiled: bool = False) -> torch.nn.Sequential:
    torch.manual_seed(0)
    stack = torch.nn.Sequential(*(Block(8) for _ in range(4)))
    if compiled:
        for block in stack:
            block.compile(backend="aot_eager")
    return stack


def _run(stack: torch.nn.Sequential, x: torch.Tensor) -> dict:
    stack(x).square().sum().backward()
    grads = {n: p.grad.clone() for n, p in stack.named_parameters()}
    stack.zero_grad(set_to_none=True)
    return grads


class Recording(offload.ActivationOffload):
    """Records when layers are copied back and unpacked, and how many offloaded layers hold device tensors."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.events: list[tuple[str, int]] = []
        self.alive: list[int] = []  # after each offloaded layer's forward: layers whose tensors are still held
        self.back: list[int] = []  # at each unpack: layers brought back and not yet used up

    def _end(self, i: int) -> None:
        super()._end(i)
        self.alive.append(sum(1 for state in self.layers if state.on_device))

    def _copy_in(self, state, slots):
        self.events.append(("copy_in", self.layers.index(state)))
        return super()._copy_in(state, slots)

    def _unpack(self, packed):
        if isinstance(packed, offload._Handle):
            self.events.append(("unpack", packed.layer))
        out = super()._unpack(packed)
        self.back.append(sum(1 for state in self.layers if state.fetched))
        return out


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_offload_keeps_gradients_and_brings_each_layer_back_ahead_of_its_backward(compiled):
    """The last `IN_FLIGHT` offloaded layers still hold their device tensors when backward begins and use them; the
    others are copied back from the host when the next offloaded layer's backward begins."""
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    plain = _run(_stack(compiled), x)
    stack = _stack(compiled)
    off = Recording(list(stack[:3]), stack.parameters(), "cpu", min_bytes=0)
    for _ in range(2):  # the second step reuses the host buffers
        grads = _run(stack, x)
        assert grads.keys() == plain.keys()
        for name, g in plain.items():
            torch.testing.assert_close(grads[name], g, atol=0, rtol=0, msg=name)
        assert [i for what, i in off.events if what == "copy_in"] == [0]  # layers 1 and 2 were never copied back
        assert off.events.index(("unpack", 1)) < off.events.index(("copy_in", 0)) < off.events.index(("unpack", 0))
        off.events.clear()
    assert all(state.fetched == {} for state in off.layers)
    # never more than IN_FLIGHT offloaded layers' tensors on the device, in forward or in backward
    assert off.alive == [1, 2, 2] * 2 and max(off.back) <= offload.IN_FLIGHT


def test_a_forward_without_backward_leaves_nothing_behind():
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    plain = _run(_stack(), x)
    stack = _stack()
    off = Recording(list(stack[:3]), stack.parameters(), "cpu", min_bytes=0)
    stack(x).sum()  # say an evaluation with gradients on: no backward
    assert len(off.pending) == 2
    grads = _run(stack, x)  # the next step releases what the first left
    assert off.alive[3:] == [1, 2, 2] and not off.pending
    for name, g in plain.items():
        torch.testing.assert_close(grads[name], g, atol=0, rtol=0, msg=name)


class Rotary(torch.nn.Module):
    """Reads a table every layer shares (like the rotary cos/sin) and saves a slice of its own activation."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.linspace(-1, 1, 64).view(8, 8))

    def forward(self, x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        y = (x * table).exp()  # saves the table (another input: stays) and y (whole: offloaded)
        return y[:8] @ self.w  # saves y[:8] for w's gradient: a slice, which would free nothing (stays, counted)


def test_other_inputs_of_the_layer_and_slices_stay_on_the_device():
    x, table = torch.randn(16, 8, requires_grad=True), torch.randn(16, 8)
    block = Rotary()
    block(x, table=table).square().sum().backward()
    plain = (x.grad.clone(), block.w.grad.clone())
    x.grad = block.w.grad = None
    off = offload.ActivationOffload([block], block.parameters(), "cpu", min_bytes=0)
    block(x, table=table).square().sum().backward()
    assert (off.layers[0].used, off.bytes_per_step, off.kept_bytes) == (1, 16 * 8 * 4, 8 * 8 * 4)
    torch.testing.assert_close((x.grad, block.w.grad), plain, atol=0, rtol=0)


def test_a_tensor_saved_twice_is_copied_once_with_its_strides():
    stack = _stack()
    off = offload.ActivationOffload([stack[0]], stack.parameters(), "cpu", min_bytes=0)
    x = torch.randn(16, 8, requires_grad=True)
    stack[0](x)
    state = off.layers[0]
    assert state.used == len(state.slots) and max(state.handles) >= 2  # h * h saves h twice: one slot, two handles
    assert sum(state.handles) > state.used
    layouts = {(tuple(s.shape), s.stride()) for s in state.slots}
    assert ((8, 16), (1, 8)) in layouts  # x.t() saved by the matmul: copied column-major, as saved



def test_parameters_and_views_that_do_not_fill_their_memory_stay_on_the_device(capsys):
    stack = _stack()
    off = offload.ActivationOffload([stack[0]], stack.parameters(), "cpu", min_bytes=0)
    weight = stack[0].up.weight
    activation = torch.randn(16, 8)
    assert not off._offloads(weight) and not off._offloads(weight.t())  # frozen weights and their views stay
    assert off._offloads(activation) and off._offloads(activation.t())
    assert off.kept_bytes == 0
    assert not off._offloads(activation[:, :4]) and not off._offloads(torch.ones(16, 1).expand(16, 8))
    assert off.kept_bytes == 16 * 4 * 4 + 16 * 8 * 4  # counted, and said once at the next step
    stack[0](torch.randn(16, 8, requires_grad=True))
    stack[0](torch.randn(16, 8, requires_grad=True))
    assert capsys.readouterr().out.count("of saved views that do not fill their memory") == 1


def test_parameters_small_tensors_and_no_grad_forwards_stay_put():
    stack = _stack()
    off = offload.ActivationOffload([stack[0]], stack.parameters(), "cpu", min_bytes=16 * 8 * 4)
    x = torch.randn(16, 8, requires_grad=True)
    with torch.no_grad():
        stack[0](x)
    assert off.layers[0].used == 0 and off.bytes_per_step == 0
    stack[0](x)
    state = off.layers[0]
    assert state.used > 0 and all(s.numel() * s.element_size() >= 16 * 8 * 4 for s in state.slots)
    assert off.bytes_per_step == sum(s.numel() * s.element_size() for s in state.slots)


def test_a_second_forward_before_the_backward_is_refused():
    stack = _stack()
    offload.ActivationOffload(list(stack[:2]), stack.parameters(), "cpu", min_bytes=0)
    x = torch.randn(16, 8)
    first = stack(x).sum()
    stack(x).sum().backward()  # overwrites the host buffers of the first forward
    with pytest.raises(RuntimeError, match="overwritten by a later forward"):
        first.backward()


def test_a_graph_kept_for_a_second_backward_gives_the_same_gradients():
    x = torch.randn(16, 8)
    stack = _stack()
    offload.ActivationOffload(list(stack[:2]), stack.parameters(), "cpu", min_bytes=0)
    loss = stack(x).square().sum()
    loss.backward(retain_graph=True)
    once = {n: p.grad.clone() for n, p in stack.named_parameters()}
    loss.backward()
    for name, p in stack.named_parameters():
        torch.testing.assert_close(p.grad, 2 * once[name], msg=name)


def test_recomputed_layers_and_out_of_range_layers_are_refused(four_layer_llama):
    stack = _stack()
    stack[1].gradient_checkpointing = True
    with pytest.raises(ValueError, match="decoder layer 1 recomputes"):
        offload.ActivationOffload(list(stack[:2]), stack.parameters(), "cpu")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(four_layer_llama)
    with pytest.raises(ValueError, match="cannot offload 2 layers from layer 3 of a model with 4 decoder layers"):
        offload.attach(model, 3, 2)
    assert offload.attach(model, 0, 0) is None
