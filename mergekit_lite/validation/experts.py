"""A layer's stacked experts read one expert at a time, when the whole stack would exceed the memory bound.

transformers 5 holds a mixture of experts' weights as one parameter per layer (``mlp.experts.gate_up_proj``,
experts x 2 intermediate x hidden). In float32, two Mixtral 8x7B's layers hold 5.6 GB of experts, more than the
bound of a merge of two such models (about 2.4 GB), so the forward check could not stream them (streamed.py)
and was NOT CHECKED. But transformers' own expert loop (its ``eager`` experts implementation) only ever takes
one expert's slice, ``gate_up_proj[expert]``, multiplies by it and drops it. So such a parameter is given to
the model as ``LazyExperts``: a tensor of the stack's shape with no memory (``meta``), on which indexing one
expert reads that expert's stored tensors into a float32 slice (``Fused.by_expert`` says where each goes). The
model is transformers' own, run by its own code; memory holds one expert's slice of one parameter at a time.

Anything else a model does with the whole stack (another experts implementation, a model whose expert loop is
written otherwise) raises ``ExpertsUnsupported``, and the forward check is NOT CHECKED, as it was before.
"""

from __future__ import annotations

import math
import mmap
import sys
import threading
import weakref
from typing import Callable, Optional

import torch

from .renames import Fused
from .stream import Staging, fill_weight


class ExpertsUnsupported(RuntimeError):
    """The model used a stack of experts read one at a time otherwise than one expert at a time."""


# what a model may ask of the stack itself: its metadata, never its values
_METADATA = frozenset(getter for getter in (
    torch.Tensor.shape.__get__, torch.Tensor.dtype.__get__, torch.Tensor.device.__get__, torch.Tensor.ndim.__get__,
    torch.Tensor.is_meta.__get__, torch.Tensor.requires_grad.__get__, torch.Tensor.is_cuda.__get__,
    torch.Tensor.size, torch.Tensor.dim, torch.Tensor.numel, torch.Tensor.element_size,
    torch.Tensor.is_floating_point, torch.Tensor.__repr__, torch.Tensor.__format__))


class LazyExperts(torch.Tensor):
    """A stacked experts parameter with no memory: ``stack[expert]`` reads that expert's slice (``read``)."""

    read: Callable[[int], torch.Tensor]

    @staticmethod
    def __new__(cls, shape: tuple[int, ...], dtype: torch.dtype, read: Callable[[int], torch.Tensor]):
        stack = torch.Tensor._make_subclass(cls, torch.empty(shape, dtype=dtype, device="meta"), False)
        stack.read = read
        return stack

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.Tensor.__getitem__ and isinstance(args[0], LazyExperts):
            stack, index = args[0], args[1]
            if isinstance(index, torch.Tensor) and index.dim() == 0 and not index.is_floating_point():
                index = int(index)
            experts = stack.shape[0]
            if isinstance(index, int) and -experts <= index < experts:
                return stack.read(index % experts)
        elif func in _METADATA:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **(kwargs or {}))
        raise ExpertsUnsupported(f"the model uses its stacked experts otherwise than one expert at a time "
                                 f"({getattr(func, '__name__', func)}), so they cannot be read one by one, and "
                                 f"whole they exceed the merge's memory bound")


def lazy_stacks(model: torch.nn.Module, names: dict, limit: Optional[int], held: int) -> Optional[dict[int, list]]:
    """{id(parameter): its ``Fused.by_expert`` slices} for the stacked parameters of modules whose stack exceeds
    ``limit`` bytes in float32 (``held`` copies: 2 when the next layer is read ahead) but whose largest expert
    slice does not; {} when every module fits whole; None when some module can be held neither whole nor one
    expert at a time (an expert above ``limit``, a stack whose stored tensors span experts, other parameters)."""
    lazy: dict[int, list] = {}
    if limit is None:
        return lazy
    for module in model.modules():
        params = [p for p in module._parameters.values() if p is not None and id(p) in names]
        fused = [p for p in params if isinstance(names[id(p)], Fused)]
        if not fused or 4 * held * sum(p.numel() for p in params) <= limit:
            continue
        slices = {id(p): names[id(p)].by_expert(tuple(p.shape)) for p in fused}
        if any(s is None for s in slices.values()) or len(fused) < len(params):
            return None
        if 4 * sum(p.numel() // p.shape[0] for p in fused) > limit:   # one expert's slice of each (SlicePool)
            return None
        lazy.update(slices)
    return lazy


def read_by_expert(model: torch.nn.Module, lazy: dict[int, list], checkpoint, device: torch.device, tally,
                   dtype: torch.dtype, streaming, cleared: list[Callable[[], None]]) -> None:
    """The ``lazy`` parameters of ``model`` (``lazy_stacks``) become ``LazyExperts`` read from ``checkpoint`` in
    ``dtype``, on the thread that runs the model; transformers is asked for its ``eager`` experts implementation,
    its loop over experts. ``tally`` (finite.FiniteTally) counts NaN and Inf in each stored tensor read;
    ``streaming`` (streamed.Streaming) counts each slice's bytes while it lives; ``cleared``: the callbacks run
    where the layers' recycled memory is given back (streamed.Recycled.also: before the weights outside the
    layers are read, and after a pass), where the slices' map is given back too."""
    staging = Staging()   # this thread's own: the reader thread has the model's
    count = tally.add if tally is not None else (lambda *block: None)

    def fill(name: str, place: torch.Tensor) -> None:
        fill_weight(checkpoint, name, place, staging, count)

    pool = SlicePool() if device.type == "cpu" else None   # torch's CUDA allocator keeps device memory itself
    for module in model.modules():
        for key, param in list(module._parameters.items()):
            if param is not None and id(param) in lazy:
                read = expert_reader(lazy[id(param)], tuple(param.shape), fill, device, dtype, streaming, pool)
                module._parameters[key] = LazyExperts(tuple(param.shape), dtype, read)
    if pool is not None:
        cleared.append(pool.clear)
    try:
        model.set_experts_implementation("eager")
    except Exception:   # noqa: BLE001 - no experts interface: the model loops as it does (else ExpertsUnsupported)
        pass


def expert_reader(slices: list, shape: tuple[int, ...], fill: Callable[[str, torch.Tensor], None],
                  device: torch.device, dtype: torch.dtype, streaming=None,
                  pool: Optional["SlicePool"] = None) -> Callable[[int], torch.Tensor]:
    """``LazyExperts.read`` for one parameter: expert ``index``'s slice, each stored tensor read into its place
    (``fill(stored name, view)``), in ``dtype`` on ``device`` (in ``pool``'s memory on the CPU); counted in
    ``streaming`` until it is freed."""
    nbytes = math.prod(shape[1:]) * dtype.itemsize

    def read(index: int) -> torch.Tensor:
        weight = (pool.take(nbytes).view(dtype).view(shape[1:]) if pool is not None
                  else torch.empty(shape[1:], dtype=dtype, device=device))
        for name, place in slices[index]:
            fill(name, weight.as_strided(place.shape, place.stride(), place.storage_offset()))
        if streaming is not None:
            streaming.add(nbytes)
            weakref.finalize(weight, _release, streaming, nbytes)
        return weight
    return read


def _release(streaming, nbytes: int) -> None:
    streaming.live -= nbytes


class SlicePool:
    """One expert slice's memory, reused for the next slice once no tensor uses it.

    A fresh slice of 32 MiB or more is mapped from the kernel and unmapped when freed, so every slice cost a page
    fault and the kernel's zeroing per 4 KiB: on the 1.5B Mixtral of scripts/bench_forward.py, 4.2-4.5 s of system
    time in a 7.3 s check. A slice is handed to transformers' code, so its memory is reused only when nothing
    holds it any more: a slice is made by ``torch.frombuffer`` over an anonymous map, and every tensor sharing
    that memory (the slice, any view of it, in Python or inside torch) keeps its storage's one buffer export, a
    reference to the map; the map is free when its reference count is back to the pool's own.

    Memory: one map of the largest slice asked for (a slice of another size takes its first bytes), which the
    layer holds anyway while that slice is in use; ``clear`` gives it back before the weights outside the layers
    (embedding, final norm, ``lm_head``) are read, so it never sits beside them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()         # clear() may come from the reader thread
        self._map: Optional[mmap.mmap] = mmap.mmap(-1, 1)
        self._unused = self._references()     # as counted below, for a map that no tensor holds
        self._map = None
        self.reused = 0                        # slices given the memory of an earlier one

    def take(self, nbytes: int) -> torch.Tensor:
        """A (nbytes,) uint8 CPU tensor, contents undefined: the pool's map when it is free and large enough."""
        with self._lock:
            if self._map is None or len(self._map) < nbytes or self._references() > self._unused:
                self._map = mmap.mmap(-1, max(nbytes, len(self._map) if self._map is not None else 0))
            else:
                self.reused += 1
            return torch.frombuffer(self._map, dtype=torch.uint8)[:nbytes]

    def clear(self) -> None:
        """Forget the map: unmapped now when free, else when its last tensor goes."""
        with self._lock:
            self._map = None

    def _references(self) -> int:
        return sys.getrefcount(self._map)
