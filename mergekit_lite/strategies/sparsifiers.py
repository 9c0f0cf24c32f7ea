"""Sparsifiers: which entries of a task vector survive, for TIES, DARE, breadcrumbs and DELLA.

Each takes one task vector ``delta`` (float32, owned by the caller, which lets us zero it in place) and
returns it with the dropped entries set to zero and, when ``rescale``, the survivors scaled so the L1 norm
equals the unpruned one (mergekit's ``rescale``: a tensor-level norm match, not DARE's element-wise 1/p).

Magnitude methods keep entries by rank of |delta|. Ranks are found with k-th value selection (a radix
select, linear time), never by sorting the tensor. Equal magnitudes are ranked by position,
as a stable sort would; mergekit's (unstable) argsort breaks such ties in an order of its own, so the two
can keep different members of a group of equal magnitudes straddling the cut (same count, same |value|).

Random methods never draw from the global RNG: DARE from a stream per chunk of each task vector, DELLA from
the ``torch.Generator`` it is given (one per tensor), both seeded from the run seed and the tensor name, so
output bytes do not depend on threads or shard sizes.
"""

from __future__ import annotations

import functools
import math
import sys
from dataclasses import dataclass
from typing import Callable, Optional, Union

import numpy as np
import torch

from ..strategy import TensorContext
from .chunks import Spread, in_order

RESCALE_EPS = 1e-7   # below this L1 norm (before or after pruning) mergekit skips the rescale
_ROW = 1024          # L1 norms are summed in rows of this width: one thread per row, whatever the thread count
_RADIX_MIN = 1 << 15  # smaller tensors: torch.kthvalue (measured: as fast at 16K entries, faster below)
_SLICE = 1 << 22      # whole-tensor masks and counts are made this many entries at a time (4 MB temporaries)
DRAW_CHUNK = 1 << 20   # DARE's draws: one random stream per chunk of this many entries
_HIGH_HALF = 1 if sys.byteorder == "little" else 0   # which int16 of a float32 holds its top 16 bits


def magnitude(delta: torch.Tensor, density: float, rescale: bool) -> torch.Tensor:
    """TIES' trim: keep the ``max(1, int(density * n))`` entries of largest magnitude."""
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return delta.zero_()
    k = max(1, int(density * delta.numel()))
    keep = rank_window(delta.abs().flatten(), 0, k, descending=True)
    return _apply(delta, keep.view(delta.shape), rescale)


def magnitude_outliers(delta: torch.Tensor, density: float, gamma: float, rescale: bool) -> torch.Tensor:
    """Breadcrumbs: drop the ``gamma`` fraction of largest magnitudes (outliers) and then the smallest,
    keeping ``int(density * n)`` entries. When ``density + gamma > 1`` fewer outliers are dropped."""
    if density >= 1:
        return delta
    return _apply(delta, outliers_keep(delta.abs().flatten(), density, gamma).view(delta.shape), rescale)


def outliers_keep(magnitudes: torch.Tensor, density: float, gamma: float, spread: Optional[Spread] = None
                  ) -> torch.Tensor:
    """Breadcrumbs' keep mask (bool, 1-D) of a flat task vector's magnitudes, for ``density`` < 1; ``spread``
    as in ``rank_window``."""
    n = magnitudes.numel()
    kept = int(density * n)
    n_top = int(gamma * n)
    n_bottom = max(0, n - kept - n_top)
    # Ranks in ascending magnitude: [n_bottom, n_bottom + kept) survive.
    return rank_window(magnitudes, n_bottom, n_bottom + kept, descending=False, spread=spread)


def random(delta: torch.Tensor, density: float, rescale: bool, ctx: TensorContext, model: int) -> torch.Tensor:
    """DARE: keep each entry independently with probability ``density`` (model ``model``'s draws)."""
    if density >= 1:
        return delta
    keep = torch.empty(delta.numel(), dtype=torch.uint8)
    for start in range(0, keep.numel(), DRAW_CHUNK):
        end = min(start + DRAW_CHUNK, keep.numel())
        random_keep(ctx, model, density, start, end, out=keep[start:end])
    return _apply(delta, keep.view(delta.shape).to(delta.device), rescale, l1_norm)


def random_keep(ctx: TensorContext, model: int, density: float, start: int, end: int,
                out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """DARE's keep mask for entries [start, end) of one model's task vector: a uniform 32-bit draw per
    entry, kept when below ``density`` x 2^32. ``start`` is a multiple of DRAW_CHUNK and ``end`` at most
    the next one: the chunk's draws come from its own stream (``ctx.bits``), so chunks are drawn in any
    order, on any thread. (end - start,) uint8, 1 = kept (into ``out``, a CPU uint8 tensor, when given):
    float32 x uint8 multiplies at twice the speed of float32 x bool on the CPU (torch 2.13), and compares
    run 5x faster in NumPy.
    """
    assert start % DRAW_CHUNK == 0 and end - start <= DRAW_CHUNK
    n = end - start
    out = torch.empty(n, dtype=torch.uint8) if out is None else out
    threshold = round(density * 2**32)
    if threshold >= 2**32:
        return out.fill_(1)
    raw = ctx.bits(model, start // DRAW_CHUNK).random_raw((n + 1) // 2)   # (ceil(n/2),) uint64: two draws each
    draws = raw.view(np.uint32)[:n]             # the byte order of the machine (little-endian on x86 and ARM)
    np.less(draws, np.uint32(threshold), out=out.numpy().view(np.bool_))
    return out


def row_sums(values: torch.Tensor) -> list[float]:
    """Sums over rows of ``_ROW`` entries of the flattened ``values``, and over the tail: one thread per row.
    ``l1_norm``'s terms; a chunk that starts at a multiple of ``_ROW`` gives the same terms as the same
    entries in the whole tensor."""
    flat = values.reshape(-1)
    whole = flat.numel() // _ROW * _ROW
    rows = flat[:whole].view(-1, _ROW).sum(dim=1)              # (n // _ROW,) float32; vector_norm takes 2x
    tail = [float(flat[whole:].sum())] if whole < flat.numel() else []
    return rows.tolist() + tail


def della_magprune(delta: torch.Tensor, density: float, epsilon: float, rescale: bool,
                   generator: torch.Generator) -> torch.Tensor:
    """DELLA's MagPrune: along each row, the keep probability rises linearly with the magnitude rank,
    from ``density - epsilon`` (smallest) to ``density + epsilon`` (largest).

    Rows are along dim 1 (a 1-D tensor is one row), as in mergekit. A row of one entry sits in the middle
    of the band (probability ``density``); mergekit divides by zero there. The ranks need one sort per row:
    the probabilities depend on every entry's rank, not only on a cut.
    """
    if density >= 1:
        return delta
    if density <= 0:
        return delta.zero_()
    return _apply(delta, della_keep(delta.abs(), density, epsilon, generator), rescale, l1_norm)


def della_keep(magnitudes: torch.Tensor, density: float, epsilon: float, generator: torch.Generator,
               block: int = 1 << 18, spread: Optional[Spread] = None,
               wave: int = 8) -> torch.Tensor:
    """MagPrune's keep mask (bool, the shape of ``magnitudes``) for 0 < ``density`` < 1, one draw per entry
    from ``generator``. Worked out a block of rows (along dim 0) at a time, each a slice of whole rows: a sort
    per row holds 8-byte indices and 4-byte ranks, so the whole tensor at once held about 6x its float32 size
    (3 GiB for a 1B model's embedding). The draws are taken block after block, as one ``torch.rand`` of the
    whole shape would take them, so the mask is the same in any block size.

    ``spread(fn, items)`` (the merging threads): the ranks of ``wave`` blocks at a time are worked out in
    parallel, while one of the threads takes the next wave's draws (one wave after the other, each in block
    order, so the mask is the same on any number of threads); ranking is nearly all of DELLA's time. Blocks of
    256K entries rank fastest (a 1B embedding on one thread: 1.6 s, against 2.8 s in blocks of 1M and 4.5 s
    sorting rows of floats; 0.9 s on two threads)."""
    rows = magnitudes if magnitudes.dim() >= 2 else magnitudes.unsqueeze(0)       # (rows, m, ...)
    keep = torch.empty(rows.shape, dtype=torch.bool, device=magnitudes.device)
    per_row = max(1, rows[0].numel())
    step = max(1, block // per_row)
    starts = range(0, rows.shape[0], step)
    waves = [starts[first:first + wave] for first in range(0, len(starts), wave)]

    def drawn(group: range) -> list[torch.Tensor]:
        return [torch.rand(rows[lo:lo + step].shape, generator=generator, device=rows.device) for lo in group]

    draws = drawn(waves[0]) if waves else []
    for index, group in enumerate(waves):
        following = waves[index + 1] if index + 1 < len(waves) else None

        def task(k: int, group: range = group, draws: list = draws, following: Optional[range] = following):
            if k < 0:   # the next wave's draws, taken after this wave's, while this wave ranks
                return drawn(following)
            lo = group[k]
            torch.lt(draws[k], _band(rows[lo:lo + step], density, epsilon), out=keep[lo:lo + step])
            return None

        done = (spread or in_order)(task, [-1] * (following is not None) + list(range(len(group))))
        draws = done[0] if following is not None else []
    return keep.view(magnitudes.shape)


def _band(rows: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """Each entry's keep probability: ``density - epsilon`` + 2 ``epsilon`` x its rank along dim 1 / (m - 1)."""
    m = rows.shape[1]
    ranks = _row_ranks(rows)
    rank_norm = ranks.to(rows.dtype).div_(m - 1) if m > 1 else torch.full(ranks.shape, 0.5, dtype=rows.dtype,
                                                                         device=rows.device)
    return rank_norm.mul_(2 * epsilon).add_(density - epsilon)


def _row_ranks(rows: torch.Tensor) -> torch.Tensor:
    """Each entry's rank along dim 1 (int32; 0 = smallest; equal values by position, as a stable sort ranks them).

    Non-negative float32 values (no NaN) order as their bits do, as integers. So on the CPU one stable sort of
    (row, bits) over the whole block gives every row's order at once: torch sorts 1-D integers with a radix
    sort, 2x its stable sort of each row of floats (rows of 2048: 33 ms against 62 per 1M entries), and int32
    keys in half the time of int64 ones (``_packed_ranks``). Anything else (other dtypes, more dimensions, a sign
    bit or a NaN, a GPU) sorts each row."""
    m = rows.shape[1]
    if rows.device.type == "cpu" and rows.dtype == torch.float32 and rows.dim() == 2 and rows.numel():
        bits = rows.contiguous().view(torch.int32)
        lowest, highest = (int(x) for x in torch.aminmax(bits))
        if lowest >= 0 and highest <= 0x7F800000:   # +0 .. +inf
            return _packed_ranks(bits).view(rows.shape)
    order = torch.sort(rows, dim=1, stable=True).indices                  # ascending along dim 1
    shape = [1] * rows.dim()
    shape[1] = m
    positions = torch.arange(m, dtype=torch.int32, device=rows.device).view(shape).expand_as(order)
    return torch.empty_like(order, dtype=torch.int32).scatter_(1, order, positions)


def _ranks_of(order: torch.Tensor, m: int) -> torch.Tensor:
    """Flat ranks within rows of ``m`` from the flat order of a block sorted row by row."""
    return torch.empty(order.numel(), dtype=torch.int32).scatter_(0, order, _positions(order.numel() // m, m))


@functools.lru_cache(maxsize=8)
def _positions(n_rows: int, m: int) -> torch.Tensor:
    """0..m-1, n_rows times (int32; read only): made once per block shape, not once per block (a tenth of
    DELLA's ranking time)."""
    return torch.arange(m, dtype=torch.int32).repeat(n_rows)


def _packed_ranks(bits: torch.Tensor) -> torch.Tensor:
    """The flat stable ranks of a block's rows from one sort of int32 keys.

    A key is the row in its top bits and the value's 31 bits shifted right by as many (none for one row; the 128
    rows of 2048 in a 256K block take 7, leaving 24: the exponent and 16 mantissa bits). Values that differ only
    in the dropped bits share a key and keep their positions' order, which may not be their values' order.
    Among entries sharing a key, those whose dropped bits are all zero hold one and the same value, the
    smallest of them; so a sorted row can only decrease right after an entry with dropped bits set, and
    those few (about 8 in a 1B DELLA block) are each compared with the entry sorted next in their row. A row
    where one is larger is sorted again on its own, by its full bits (``_rerank``). Equal keys of equal values
    are in position order (the sort is stable), as the full sort puts them. A 1B DELLA block: 3.7 ms against
    5.1 with int64 keys; reading every sorted value back to check cost a quarter of the sort, and sorting
    the block again with int64 keys where a row was out of order (one block in sixteen) a sixth."""
    n_rows, m = bits.shape
    dropped = (n_rows - 1).bit_length()
    keys = bits >> dropped
    if dropped:
        keys.add_(torch.arange(n_rows, dtype=torch.int32).mul_(1 << (31 - dropped)).unsqueeze(1))
    order = torch.sort(keys.view(-1), stable=True).indices
    del keys
    ranks = _ranks_of(order, m)
    if dropped:
        flat = bits.view(-1)
        set_low = flat.bitwise_and((1 << dropped) - 1).nonzero().view(-1)   # entries with dropped bits set
        at = ranks[set_low].to(torch.int64)
        inner = at < m - 1                                                   # not last in its row
        set_low, at = set_low[inner], at[inner]
        row = set_low.div(m, rounding_mode="floor")
        after = order[row * m + at + 1]
        wrong = row[flat[after] < flat[set_low]]
        if wrong.numel():
            _rerank(bits, ranks.view(n_rows, m), torch.unique(wrong))
    return ranks


def _rerank(bits: torch.Tensor, ranks: torch.Tensor, rows: torch.Tensor) -> None:
    """Rank ``rows`` of the block again, each by a stable sort of its full bits (integers: ``_row_ranks`` sorts
    each row), into ``ranks``."""
    ranks[rows] = _row_ranks(bits[rows])


def l1_norm(tensor: torch.Tensor) -> float:
    """Sum of |x|, the same bits whatever the thread count.

    torch splits a single large reduction across threads, so ``tensor.abs().sum()`` changes in the last
    bits with the thread count. Here each row of ``_ROW`` entries is reduced by one thread and the row sums
    are added exactly (``math.fsum``), so the sum does not depend on how the rows were grouped either.
    """
    return math.fsum(row_sums(tensor.abs()))


def torch_l1(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of |x| as mergekit computes it (one float32 reduction; its last bits depend on the thread count)."""
    return tensor.abs().sum()


def _apply(delta: torch.Tensor, keep: torch.Tensor, rescale: bool, norm: Callable = torch_l1) -> torch.Tensor:
    """Zero the dropped entries in place; rescale to the unpruned L1 norm when asked
    (and when neither norm is ~0).

    Deterministic sparsifiers use mergekit's float32 sums, so TIES/breadcrumbs with ``rescale`` keep its
    bits; random ones use ``l1_norm``, so their output does not depend on the thread count either.
    """
    before = norm(delta) if rescale else 0.0
    delta.mul_(keep)   # x * 1 or x * 0, as mergekit's `tensor * mask` (a -0 where it has one); 2x masked_fill_'s speed
    if rescale:
        after = norm(delta)
        if before >= RESCALE_EPS and after >= RESCALE_EPS:
            delta.mul_(before / after)
    return delta


def rank_window(magnitudes: torch.Tensor, lo: int, hi: int, descending: bool,
                spread: Optional[Spread] = None) -> torch.Tensor:
    """Mask of the entries of 1-D, non-negative ``magnitudes`` whose rank lies in ``[lo, hi)``.

    Rank is the position in a stable sort (descending or ascending): by value, equal values by index.
    Found without sorting: k-th value selection gives the values at the window's edges, comparisons give
    everything strictly inside, and only a group of equal values cut by an edge is looked at by position.

    ``spread(fn, items)`` (the merging threads; default: one after the other here) runs each pass's slices:
    integer counts and positions in slice order, so the mask is the same on any number of threads. On one
    thread this was two thirds of a 1B breadcrumbs merge (bf16 deltas tie often, so the edge groups are
    looked at for nearly every tensor).
    """
    spread = spread or in_order
    n = magnitudes.numel()
    lo, hi = max(lo, 0), min(hi, n)
    if hi <= lo:
        return torch.zeros(n, dtype=torch.bool, device=magnitudes.device)
    if lo == 0 and hi == n:
        return torch.ones(n, dtype=torch.bool, device=magnitudes.device)

    def ahead(m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:  # entries ranked before every entry equal to v
        return m > v if descending else m < v

    def inside(m: torch.Tensor) -> torch.Tensor:  # from the first edge's group to the last edge's, inclusive
        keep = (m <= edges[0] if descending else m >= edges[0]) if lo > 0 else None
        if hi < n:
            last = m >= edges[-1] if descending else m <= edges[-1]
            keep = last if keep is None else keep.logical_and_(last)
        assert keep is not None
        return keep

    # The values at the window's first and last rank (0-based ranks -> 1-based ascending k).
    ranks = ([lo] if lo > 0 else []) + ([hi - 1] if hi < n else [])
    ks = [n - r if descending else r + 1 for r in ranks]
    found = _edges(magnitudes, ks, spread)
    edges = _values(found, magnitudes, ks)
    keep = torch.empty(n, dtype=torch.bool, device=magnitudes.device)

    def fill(part: slice) -> int:   # a slice at a time: whole-tensor temporaries were a byte per entry each
        keep[part] = inside(magnitudes[part])
        return int(torch.count_nonzero(keep[part]))

    if sum(spread(fill, slices(n))) == hi - lo:
        return keep  # no group of equal values straddles an edge
    for i in ([0] if len(edges) == 1 or bool(edges[0] == edges[1]) else range(len(edges))):
        # Entries equal to the edge hold ranks [start, start + count) in index order; keep those inside the window.
        if found is not None:   # the radix select saw them in the edge's bucket
            positions = found[i].equal
            start = n - found[i].below - positions.numel() if descending else found[i].below
        else:
            positions, start = _equal_and_ahead(magnitudes, edges[i], ahead, spread)
        first_kept = min(max(lo - start, 0), positions.numel())
        end_kept = min(max(hi - start, 0), positions.numel())
        keep[positions[:first_kept]] = False
        keep[positions[end_kept:]] = False
    return keep


def _equal_and_ahead(magnitudes: torch.Tensor, v: torch.Tensor, ahead: Callable, spread: Spread
                     ) -> tuple[torch.Tensor, int]:
    """The positions of the entries equal to ``v`` (ascending) and the count of those ranked ahead of them."""
    def group(part: slice) -> tuple[torch.Tensor, int]:
        chunk = magnitudes[part]
        return (chunk == v).nonzero().flatten().add_(part.start), int(torch.count_nonzero(ahead(chunk, v)))

    grouped = spread(group, slices(magnitudes.numel()))
    return torch.cat([p for p, _ in grouped]), sum(count for _, count in grouped)


def _where_in(values: Union[np.ndarray, torch.Tensor], wanted: list[int]) -> torch.Tensor:
    """The positions (ascending, int64) of the entries of ``values`` equal to one of ``wanted``: in NumPy for
    the CPU (1.5-2x torch's compare and nonzero there), in torch for a GPU tensor."""
    hit = values == wanted[0]
    for value in wanted[1:]:
        hit |= values == value
    return torch.from_numpy(np.flatnonzero(hit)) if isinstance(hit, np.ndarray) else hit.nonzero().flatten()


def slices(n: int) -> list[slice]:
    """[0, n) in slices of _SLICE entries (a multiple of _ROW): for work whose temporaries would be whole-sized."""
    return [slice(start, min(start + _SLICE, n)) for start in range(0, n, _SLICE)]


def kth_smallest(magnitudes: torch.Tensor, ks: list[int], spread: Optional[Spread] = None) -> list[torch.Tensor]:
    """The k-th smallest (1-based) of 1-D non-negative ``magnitudes``, for each k (``_edges``; other dtypes and
    small tensors: ``torch.kthvalue``). ``spread``: as in ``rank_window``."""
    return _values(_edges(magnitudes, ks, spread), magnitudes, ks)


def _values(found: Optional[list[_Edge]], magnitudes: torch.Tensor, ks: list[int]) -> list[torch.Tensor]:
    """The k-th smallest values: the radix select's, else (``found`` None) ``torch.kthvalue``'s."""
    return [e.value for e in found] if found is not None else [torch.kthvalue(magnitudes, k).values for k in ks]


@dataclass(frozen=True)
class _Edge:
    value: torch.Tensor     # the k-th smallest
    below: int              # entries smaller than it
    equal: torch.Tensor     # the positions of the entries equal to it, ascending (int64)


def _edges(magnitudes: torch.Tensor, ks: list[int], spread: Optional[Spread] = None) -> Optional[list[_Edge]]:
    """The k-th smallest (1-based) of 1-D non-negative float32 ``magnitudes`` for each k, by a radix select, with
    what ``rank_window`` needs around it; None for other dtypes and small tensors.

    Non-negative float32 values order like their bit patterns, so one histogram of the top 16 bits finds
    the bucket holding each k-th value, and ``torch.kthvalue`` finishes on that bucket's few entries.
    That is a few linear passes, 3-5x faster than ``torch.kthvalue`` on the whole tensor (which
    copies it and partitions repeatedly). The buckets' entries are taken with their positions in one pass for
    all ks, so the entries below and equal to each edge come from them: ``rank_window`` looked for the entries
    equal to an edge in two more passes per edge, a quarter of a 1B breadcrumbs merge.
    """
    spread = spread or in_order
    if magnitudes.dtype != torch.float32 or magnitudes.numel() < _RADIX_MIN or not magnitudes.is_contiguous():
        return None
    # The top 16 bits of each float32, read in place as the high int16 half (0..32767: the sign bit is 0).
    high = magnitudes.view(torch.int16)[_HIGH_HALF::2]                    # (n,) bucket of each entry
    parts = slices(high.numel())   # bincount copies a strided slice: one slice at a time, not the whole tensor
    below = sum(spread(lambda part: torch.bincount(high[part], minlength=1 << 15), parts)).cumsum_(0)   # <= b
    buckets = [int(torch.searchsorted(below, k)) for k in ks]             # first bucket reaching rank k
    wanted = sorted(set(buckets))

    def members(part: slice) -> tuple[torch.Tensor, torch.Tensor]:
        bucket = high[part]
        index = _where_in(bucket.numpy() if bucket.device.type == "cpu" else bucket, wanted)
        return index + part.start, magnitudes[part].index_select(0, index)

    taken = spread(members, parts)
    positions, values = torch.cat([p for p, _ in taken]), torch.cat([v for _, v in taken])
    value_buckets = values.view(torch.int16)[_HIGH_HALF::2]
    found = []
    for k, b in zip(ks, buckets):
        before = int(below[b - 1]) if b else 0
        mine = value_buckets == b
        held, where = values[mine], positions[mine]
        value = torch.kthvalue(held, k - before).values
        found.append(_Edge(value, before + int(torch.count_nonzero(held < value)), where[held == value]))
    return found
