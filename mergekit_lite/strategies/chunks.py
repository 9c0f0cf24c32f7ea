"""One tensor's inputs, read in float32 chunks: how a whole-tensor strategy runs without whole float32 copies.

SLERP needs two norms and a dot product of whole tensors before it can write one element; DARE's rescale
needs each task vector's L1 norm before and after the random drop. Given whole float32 tensors, such a
method holds (inputs + result) x 4 bytes per element, and one thread does all the work. Written against
``Chunks``, the same method makes a few passes over chunks of the raw (bf16) inputs instead: each pass is
spread over the merging threads, each chunk is converted to float32 while in cache, and memory holds the
raw inputs and the output, whatever the tensor's size. A per-chunk reduction (a chunk's norm, its L1 row
sums) combined in chunk order gives the same bits on any number of threads.

Methods whose statistics torch must reduce in one call to give their bits (mergekit's float32 norms, sums,
dot products: Multi-SLERP, Karcher, SCE's means) fill one whole float32 vector at a time for it
(``collect``) and do everything else in chunks: memory holds the raw inputs, the output and one to three
such vectors, whatever the number of models.

Per-chunk results that a pass keeps (a chunk's norm, its sums, its counts) are tiny tensors made while the
chunk's float32 copies are alive, and glibc takes them from the holes those copies leave: each kept result
pins a hole of a chunk's size, so a pass over a 1B embedding grew the heap by 300-400 MB (SLERP's peak RSS
1.08 GiB against 0.69 when chunks were not in the heap). ``map`` copies such results into pages of their own
(``_Parking``), outside the heap, before the next chunk is read.

A strategy written this way has one body: ``whole`` runs it on whole float32 tensors (the reference the
engine uses off the CPU, and validation's recomputation), so the two paths cannot drift apart.
"""

from __future__ import annotations

import mmap
import threading
from typing import Any, Callable, Optional, Sequence, TypeVar

import torch

from ..dtypes import compute_dtype

Result = TypeVar("Result")
# fn over items, results in order: the engine runs it on its merging threads
Spread = Callable[[Callable[[Any], Any], Sequence[Any]], list]
Convert = Callable[[torch.Tensor], torch.Tensor]
PARKED = 1 << 20        # per-chunk results up to this size are copied out of the heap (larger ones are no pins)
NUMBERS = (int, float)


def in_order(fn: Callable[[Any], Result], items: Sequence[Any]) -> list[Result]:
    return [fn(item) for item in items]


class Chunks:
    """The flat inputs (and base) of one output tensor, handed out as float32 chunks, and the output.

    Chunks are read-only (on the whole-tensor path they are views of the inputs); ``emit`` takes each
    chunk's merged float32 values. Different threads emit disjoint ranges, so no lock is needed.
    """

    def __init__(self, inputs: Sequence[torch.Tensor], base: Optional[torch.Tensor],
                 emit: Callable[[int, torch.Tensor], None], convert: Optional[Convert] = None,
                 spread: Spread = in_order):
        self.shape = tuple((base if base is not None else inputs[0]).shape) if inputs else ()   # unflattened
        self._inputs = [t.reshape(-1) for t in inputs]          # (numel,) each, stored dtype
        self._base = base.reshape(-1) if base is not None else None
        self._convert = convert
        self._spread = spread
        self.emit = emit
        self.count = len(self._inputs)
        self.numel = self._inputs[0].numel() if self._inputs else 0
        self.device = self._inputs[0].device if self._inputs else torch.device("cpu")
        # the dtype chunks come in (float32, or float64 for float64 inputs): scalars are made in it, as the
        # whole-tensor functions make them in their inputs' dtype
        self.dtype = compute_dtype((self._base if self._base is not None else self._inputs[-1]).dtype)

    def input(self, i: int, start: int, end: int) -> torch.Tensor:
        """Input ``i``'s elements [start, end) in float32. (end - start,)"""
        return self._read(self._inputs[i], start, end)

    @property
    def base_present(self) -> bool:
        return self._base is not None

    def base(self, start: int, end: int) -> torch.Tensor:
        assert self._base is not None
        return self._read(self._base, start, end)

    def _read(self, flat: torch.Tensor, start: int, end: int) -> torch.Tensor:
        chunk = flat[start:end]
        return chunk if self._convert is None else self._convert(chunk)

    def spread(self, fn: Callable[[Any], Result], items: Sequence[Any]) -> list[Result]:
        """``fn`` over ``items`` on the merging threads, the results in order: work that is not over chunks of
        the inputs (DELLA ranks blocks of rows of a vector it collected)."""
        return self._spread(fn, items)

    def map(self, fn: Callable[[int, int], Result], step: int) -> list[Result]:
        """``fn(start, end)`` for every chunk of ``step`` elements (the last may be shorter), on the merging
        threads; the results in chunk order."""
        ranges = [(start, min(start + step, self.numel)) for start in range(0, self.numel, step)]
        if len(ranges) < 2 or self.device.type != "cpu":
            return self._spread(lambda r: fn(*r), ranges)
        parking = _Parking()
        return self._spread(lambda r: parking.keep(fn(*r)), ranges)


class _Parking:
    """Small CPU tensors (in a result, a tuple or a list) copied into anonymous memory maps: the same values,
    dtype and shape, in memory that is not glibc's heap and goes back to the kernel when the last is freed.
    Views are returned as they are."""

    def __init__(self) -> None:
        self._pages: Optional[torch.Tensor] = None
        self._used = 0
        self._lock = threading.Lock()   # chunks finish on several threads

    def keep(self, result: Any) -> Any:
        if isinstance(result, torch.Tensor):
            return self._copy(result)
        if isinstance(result, (tuple, list)):
            if result and isinstance(result[0], NUMBERS) and isinstance(result[-1], NUMBERS):
                return result   # plain numbers (DARE's row sums, a thousand a chunk): no tensor to move
            return type(result)(self.keep(item) for item in result)
        return result

    def _copy(self, tensor: torch.Tensor) -> torch.Tensor:
        nbytes = tensor.numel() * tensor.element_size()
        if tensor.device.type != "cpu" or not 0 < nbytes <= PARKED or tensor.requires_grad or tensor._is_view():
            return tensor   # a view (``out[lo:hi].add_(...)``) is memory the caller holds anyway: no pin, no copy
        size = -(-nbytes // 64) * 64   # every slot aligned for any dtype
        with self._lock:
            if self._pages is None or self._used + size > self._pages.numel():
                self._pages = torch.frombuffer(mmap.mmap(-1, max(PARKED, size)), dtype=torch.uint8)
                self._used = 0
            slot = self._pages[self._used:self._used + nbytes]
            self._used += size
        return slot.view(tensor.dtype).view(tensor.shape).copy_(tensor)


def collect(src: Chunks, fn: Callable[[int, int], torch.Tensor], step: int,
            out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One whole vector, (numel,) in the chunks' dtype, filled on the merging threads: ``fn(start, end)`` gives
    elements [start, end). For a reduction torch must see whole (a norm, a sum, a dot product): it
    rounds in an order of its own that no combination of per-chunk results reproduces, so this one vector,
    whatever the number of models, is the price of its bits. ``out``: a vector to fill again."""
    if out is None:
        out = torch.empty(src.numel, dtype=src.dtype, device=src.device)

    def fill(start: int, end: int) -> None:
        out[start:end] = fn(start, end)

    src.map(fill, step)
    return out


def as_rows(vector: torch.Tensor) -> torch.Tensor:
    """(numel,) -> (2, numel), both rows the vector (no copy): reduce over dim 1 and take row 0 to get the bits
    mergekit gets from reducing one model's row of its stacked (n_models, numel) tensor. torch reduces each row
    of a several-row reduction on one thread, but splits a 1-D one across its threads, which rounds
    differently; so a 1-D reduction would equal mergekit's only on one torch thread."""
    return vector.expand(2, -1)


def whole(body: Callable[..., None]) -> Callable[..., torch.Tensor]:
    """A strategy function on whole float32 tensors, from a body written against ``Chunks``."""

    def strategy(inputs: Sequence[torch.Tensor], base: Optional[torch.Tensor], ctx: Any, **params: Any) -> torch.Tensor:
        like = base if base is not None else inputs[0]
        result = torch.empty(like.numel(), dtype=like.dtype, device=like.device)

        def emit(start: int, values: torch.Tensor) -> None:
            result[start:start + values.numel()] = values

        body(Chunks(inputs, base, emit), ctx, **params)
        return result.view(like.shape)

    strategy.__name__ = strategy.__qualname__ = getattr(body, "__name__", "strategy")
    strategy.__doc__ = body.__doc__
    return strategy
