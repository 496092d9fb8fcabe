"""Activation offload (`activation_offload=True`, the peft backend): chosen decoder layers keep the tensors they save
for backward in pinned host memory instead of on the GPU, a step between keeping a layer's activations and
recomputing them. A recomputed layer runs its forward twice; an offloaded one costs no GPU work, only the host link,
which copies while the GPU computes other layers.

How, on CUDA (`ActivationOffload`):
- forward: an offloaded layer runs under `torch.autograd.graph.saved_tensors_hooks`, which also sees what compiled
  layers save (AOTAutograd's runtime calls the hooks). Each saved tensor of `MIN_BYTES` or more that is not a
  parameter (a frozen weight stays where it is), nor another input of the layer (the rotary tables every layer
  reads), and that fills its memory alone (a slice would free nothing) is copied, strides kept (a compiled backward reads them as it saved
  them), into a pinned host buffer on a side stream once the compute stream has made it. The same tensor saved twice
  in a layer is copied once. The buffers are reused every step.
- the offloaded layers are spread evenly over the layers that are not recomputed (`spread`): a layer's copy takes
  longer than its own forward, so each copy overlaps the layers kept between two offloaded ones.
- the device memory goes back to the allocator `IN_FLIGHT` offloaded layers later: the compute stream first waits
  for that layer's copies (an event, never the host), so the freed blocks, reused in stream order, are only
  overwritten once copied. Memory stays bounded by the layers in flight whatever the host's lead; where the link is
  slower than the forward, the GPU waits for it (the memory plan's cost model counts that time).
- backward: the last `IN_FLIGHT` offloaded layers still hold their device tensors when it begins, and use them (no
  copy back). When an offloaded layer's backward begins (its first unpack), the previous offloaded layer starts
  coming back, on the side stream, into memory taken on the compute stream, so it has the backward of the layers
  between them to arrive. Unpacking makes the compute stream wait for the copies. A tensor is dropped here once every
  handle to it is unpacked.
On a CPU the copies are clones (no stream, no pinning): the same bookkeeping and the same gradients, which is what
the CPU tests check (`test_offload.py`: gradients equal to a run without offload, exactly in fp32).

Only one forward may run before its backward (a second forward through the same layers would overwrite the host
buffers): the trainer's steps do that; otherwise unpacking raises instead of returning another step's values.
"""

from __future__ import annotations

import contextlib
import functools
from collections import deque
from typing import Any

MIN_BYTES = 1 << 20  # smaller saved tensors stay on the device: sample boundaries, RNG state, a small pass's stats
IN_FLIGHT = 2  # offloaded layers whose device tensors may be alive at once, in forward and into backward (counted)
MEASURE_BYTES = 256 << 20  # `host_link_bandwidth`'s copy


class _Layer:
    """One offloaded layer's buffers and the state of its current step."""

    def __init__(self) -> None:
        self.slots: list[Any] = []  # pinned host buffers, in save order, reused every step
        self.generation = 0  # forwards run through this layer (a handle of an older one is stale)
        self.used = 0  # slots filled by the current forward
        self.handles: list[int] = []  # handles per slot not yet unpacked (the same tensor saved twice: two)
        self.ids: dict[int, tuple[int, Any]] = {}  # id(tensor) → (slot, tensor), while the layer's forward runs
        self.on_device: list[Any] = []  # the forward's device tensors until their copy is done
        self.copied: Any = None  # event after the layer's copies to the host
        self.started = False  # its backward has begun
        self.fetched: dict[int, Any] | None = None  # slot → device tensor copied back (None: not asked yet)
        self.arrived: Any = None  # event after those copies


class _Handle:
    """What the autograd graph holds instead of an offloaded tensor."""

    __slots__ = ("generation", "layer", "slot")

    def __init__(self, layer: int, slot: int, generation: int) -> None:
        self.layer, self.slot, self.generation = layer, slot, generation


class ActivationOffload:
    """Offload the saved activations of `layers` (decoder layers in forward order, none of them recomputed) to host
    memory. `params`: the model's parameters (kept where they are); `device`: where the layers run."""

    def __init__(self, layers: list[Any], params: Any, device: Any, min_bytes: int | None = None) -> None:
        import torch

        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        if self.cuda and self.device.index is None:  # tensors say cuda:N; a bare "cuda" would match none of them
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.stream: Any = torch.cuda.Stream(self.device) if self.cuda else None  # the copies
        self.compute: Any = None  # the stream forward ran on
        self.min_bytes = MIN_BYTES if min_bytes is None else min_bytes
        self.params = {p.untyped_storage().data_ptr() for p in params}
        self.layers = [_Layer() for _ in layers]
        self.pending: deque[int] = deque()  # offloaded layers whose device tensors are still referenced
        self.bytes_per_step = 0  # bytes the last forward copied out (each way)
        self.kept_bytes = 0  # ...and left on the device: views that do not fill their memory (see `_dense`)
        self.said_kept = False
        self.inputs: set[int] = set()  # storages of the running layer's inputs other than its hidden states
        self.indices: list[int] = []  # the offloaded layers' places in the model (`attach`)
        for i, layer in enumerate(layers):
            if getattr(layer, "gradient_checkpointing", False):
                raise ValueError(f"decoder layer {i} recomputes its activations: it has nothing to offload")
            _wrap_call(layer, self._offloading(i))

    # ------------------------------------------------------------------------------------------------ forward
    def _offloading(self, i: int) -> Any:
        import torch

        pack = functools.partial(self._pack, i)

        def around(call: Any, *args: Any, **kwargs: Any) -> Any:
            if not torch.is_grad_enabled():
                return call(*args, **kwargs)
            self._begin(i)
            self.inputs = _storages([*args[1:], *(v for k, v in kwargs.items() if k != "hidden_states")])
            try:
                with torch.autograd.graph.saved_tensors_hooks(pack, self._unpack):
                    return call(*args, **kwargs)
            finally:
                self._end(i)
                self.inputs = set()

        return around

    def _begin(self, i: int) -> None:
        if i == 0:
            if self.kept_bytes and not self.said_kept:
                from lora_runtime.distributed import print0

                print0(f"activation offload: {self.kept_bytes / 2**20:,.0f} MiB a step of saved views that do not fill "
                       "their memory (slices of a fused projection, expanded tensors) stay on the GPU")
                self.said_kept = True
            self.bytes_per_step = self.kept_bytes = 0
            while self.pending:  # a forward whose backward never ran: nothing will claim its copies
                self._release(self.pending.popleft())
        if self.cuda:
            import torch

            self.compute = torch.cuda.current_stream(self.device)
        state = self.layers[i]
        if state.on_device:
            self._release(i)
        if state.arrived is not None:  # copies back that no backward waited for (one that stopped early)
            self.compute.wait_event(state.arrived)
        state.generation += 1
        state.used, state.handles, state.ids, state.fetched, state.arrived = 0, [], {}, None, None
        state.started = False
        while len(self.pending) >= IN_FLIGHT:
            self._release(self.pending.popleft())

    def _pack(self, i: int, tensor: Any) -> Any:
        if not self._offloads(tensor):
            return tensor
        state = self.layers[i]
        seen = state.ids.get(id(tensor))
        if seen is not None and seen[1] is tensor:
            slot = seen[0]
        else:  # held until the layer ends, so that its id is not another tensor's meanwhile
            slot = state.used
            state.ids[id(tensor)] = (slot, tensor)
            state.used += 1
            state.handles.append(0)
            self._copy_out(state, slot, tensor)
        state.handles[slot] += 1
        return _Handle(i, slot, state.generation)

    def _offloads(self, tensor: Any) -> bool:
        try:
            size = tensor.numel() * tensor.element_size()
            storage = tensor.untyped_storage()
            ptr = storage.data_ptr()
            if tensor.device != self.device or size < self.min_bytes or ptr in self.params or ptr in self.inputs:
                return False
        except (RuntimeError, NotImplementedError):  # a tensor without plain storage: left alone
            return False
        if not _dense(tensor) or storage.nbytes() != size:
            self.kept_bytes += size
            return False
        return True

    def _copy_out(self, state: _Layer, slot: int, tensor: Any) -> None:
        import torch

        if slot == len(state.slots):
            state.slots.append(None)
        host = state.slots[slot]
        if host is None or host.shape != tensor.shape or host.stride() != tensor.stride() or host.dtype != tensor.dtype:
            host = state.slots[slot] = torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype,
                                                           device="cpu", pin_memory=self.cuda)
        self.bytes_per_step += tensor.numel() * tensor.element_size()
        state.on_device.append(tensor)  # until the copy is done (on a CPU: until released, the same bookkeeping)
        if not self.cuda:
            host.copy_(tensor)
            return
        self.stream.wait_stream(self.compute)  # the tensor is made
        with torch.cuda.stream(self.stream):
            host.copy_(tensor, non_blocking=True)

    def _end(self, i: int) -> None:
        state = self.layers[i]
        state.ids = {}
        if state.on_device:
            if self.cuda:
                import torch

                state.copied = torch.cuda.Event()
                state.copied.record(self.stream)
            self.pending.append(i)

    def _release(self, i: int) -> None:
        """Hand layer i's device tensors back: the compute stream waits for their copies, so whatever reuses the
        memory (allocated on that stream) runs after them."""
        state = self.layers[i]
        if state.copied is not None:
            self.compute.wait_event(state.copied)
            state.copied = None
        state.on_device = []

    # ------------------------------------------------------------------------------------------------ backward
    def _fetch(self, i: int) -> None:
        """Start copying layer i's tensors back (the whole layer: its backward unpacks them together). At the first
        fetch of a backward, the layers still holding their device tensors (the last `IN_FLIGHT`) keep them instead."""
        state = self.layers[i]
        if state.fetched is not None or state.used == 0:
            return
        while self.pending:  # backward has begun: the forward's copies are all needed done
            j = self.pending.popleft()
            held = self.layers[j].on_device  # in save order: one a slot
            self._release(j)
            if len(held) == self.layers[j].used:
                self.layers[j].fetched = {s: held[s] for s in range(len(held)) if self.layers[j].handles[s] > 0}
        if state.fetched is not None:
            return
        wanted = [s for s in range(state.used) if state.handles[s] > 0]
        state.fetched = self._copy_in(state, wanted)
        if self.cuda:
            import torch

            state.arrived = torch.cuda.Event()
            state.arrived.record(self.stream)

    def _copy_in(self, state: _Layer, slots: list[int]) -> dict[int, Any]:
        import torch

        if not self.cuda:
            return {s: state.slots[s].clone() for s in slots}
        with torch.cuda.stream(self.compute):  # freed after use on the compute stream, in its order
            out = {s: torch.empty_strided(state.slots[s].shape, state.slots[s].stride(), dtype=state.slots[s].dtype,
                                          device=self.device) for s in slots}
        self.stream.wait_stream(self.compute)  # the blocks' earlier users are done
        with torch.cuda.stream(self.stream):
            for s, tensor in out.items():
                tensor.copy_(state.slots[s], non_blocking=True)
        return out

    def _unpack(self, packed: Any) -> Any:
        if not isinstance(packed, _Handle):
            return packed
        state = self.layers[packed.layer]
        if packed.generation != state.generation:
            raise RuntimeError(
                f"activation offload: decoder layer {packed.layer}'s saved activations were overwritten by a later "
                "forward before this backward; with activation_offload run each forward's backward before the "
                "next forward")
        if not state.started:  # this layer's backward begins: the previous offloaded layer starts coming back
            state.started = True
            self._fetch(packed.layer)
            if packed.layer > 0:
                self._fetch(packed.layer - 1)
        fetched: dict[int, Any] = state.fetched or {}
        tensor = fetched.get(packed.slot)
        if tensor is None:  # unpacked again after its last handle (backward with retain_graph): bring it back alone
            tensor = self._copy_in(state, [packed.slot])[packed.slot]
            if self.cuda:
                self.compute.wait_stream(self.stream)
            return tensor
        if self.cuda and state.arrived is not None:
            import torch

            torch.cuda.current_stream(self.device).wait_event(state.arrived)
        state.handles[packed.slot] -= 1
        if state.handles[packed.slot] <= 0:
            del fetched[packed.slot]
        return tensor


def _storages(values: Any) -> set[int]:
    """Storage addresses of the tensors among `values` (one level of tuples and lists: transformers passes the
    rotary tables as a pair)."""
    import torch

    out = set()
    for v in values:
        for t in v if isinstance(v, (tuple, list)) else (v,):
            if isinstance(t, torch.Tensor):
                with contextlib.suppress(RuntimeError, NotImplementedError):  # no plain storage: nothing to keep
                    out.add(t.untyped_storage().data_ptr())
    return out


def _dense(tensor: Any) -> bool:
    """Whether the tensor's elements fill its memory once each, in some order of its dimensions (a copy keeping its
    strides is then one block); an expanded or sliced view stays on the device.

    >>> import torch
    >>> _dense(torch.ones(3, 4).t()), _dense(torch.ones(3, 1).expand(3, 4)), _dense(torch.ones(4, 4)[:, :2])
    (True, False, False)
    """
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(tensor.stride(), tensor.shape, strict=True) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _wrap_call(layer: Any, around: Any) -> None:
    """Run `around(call, *args, **kwargs)` in place of the layer's call, outside its compiled graph where it has one
    (torch.nn.Module.compile keeps it in `_compiled_call_impl`), else around its forward."""
    name = "_compiled_call_impl" if getattr(layer, "_compiled_call_impl", None) is not None else "forward"
    inner = getattr(layer, name)
    setattr(layer, name, functools.partial(around, inner))


def spread(first: int, count: int, total: int) -> list[int]:
    """`count` layer indices spread evenly over first .. total - 1.

    >>> spread(0, 4, 28), spread(3, 2, 8), spread(2, 6, 8)
    ([3, 10, 17, 24], [4, 6], [2, 3, 4, 5, 6, 7])
    """
    room = total - first
    return [first + (2 * j + 1) * room // (2 * count) for j in range(count)]


def attach(model: Any, first: int, count: int) -> ActivationOffload | None:
    """Offload `count` of the model's decoder layers from `first` on (the plan's: after the recomputed ones), spread
    over them. Call after the layers are compiled. None when count is 0; else the offload, also kept as
    `model.activation_offload`."""
    from lora_runtime.backends.base import decoder_layers

    if count <= 0:
        return None
    layers = decoder_layers(model)
    if not 0 <= first <= first + count <= len(layers):
        raise ValueError(f"cannot offload {count} layers from layer {first} of a model with {len(layers)} decoder "
                         "layers")
    indices = spread(first, count, len(layers))
    chosen = [layers[i] for i in indices]
    device = next(p.device for p in chosen[0].parameters())
    offload = ActivationOffload(chosen, model.parameters(), device)
    offload.indices = indices
    model.activation_offload = offload
    return offload


@functools.lru_cache(maxsize=4)
def host_link_bandwidth(device_index: int = 0) -> float:
    """Bytes/s this GPU copies to and from pinned host memory, the slower direction, measured once a process on
    `MEASURE_BYTES` (the best of three copies each way)."""
    import time

    import torch

    device = torch.device("cuda", device_index)
    gpu = torch.empty(MEASURE_BYTES, dtype=torch.uint8, device=device)
    host = torch.empty(MEASURE_BYTES, dtype=torch.uint8, pin_memory=True)
    best = {"out": float("inf"), "in": float("inf")}
    for _ in range(3):
        for way, (dst, src) in (("out", (host, gpu)), ("in", (gpu, host))):
            torch.cuda.synchronize(device)
            t = time.perf_counter()
            dst.copy_(src, non_blocking=True)
            torch.cuda.synchronize(device)
            best[way] = min(best[way], time.perf_counter() - t)
    del gpu, host
    torch.cuda.empty_cache()  # the memory budget is read next
    return MEASURE_BYTES / max(best.values())


def host_memory_budget(local_processes: int = 1) -> float:
    """Bytes of pinned host memory this process may take: half the memory the kernel calls available, shared by the
    node's training processes."""
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        available = float(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        import os

        available = float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    return available / 2 / max(1, local_processes)
