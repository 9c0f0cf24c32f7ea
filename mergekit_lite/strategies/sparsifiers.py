"""Sparsifiers: which entries of a task vector survive, for TIES, DARE, breadcrumbs and DELLA.

Each takes one task vector ``delta`` (float32, owned by the caller, which lets us zero it in place) and
returns it with the dropped entries set to zero and, when ``rescale``, the survivors scaled so the L1 norm
equals the unpruned one (mergekit's ``rescale``: a tensor-level norm match, not DARE's element-wise 1/p).

Magnitude methods keep entries by rank of |delta|. Ranks are found with k-th value selection
(``torch.kthvalue``, linear time), never by sorting the tensor. Equal magnitudes are ranked by position,
as a stable sort would; mergekit's (unstable) argsort breaks such ties in an order of its own, so the two
can keep different members of a group of equal magnitudes straddling the cut (same count, same |value|).

Random methods draw from the ``torch.Generator`` they are given (one per tensor, seeded from the run seed
and the tensor name), never from the global RNG, so output bytes do not depend on threads or shard sizes.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

RESCALE_EPS = 1e-7   # below this L1 norm (before or after pruning) mergekit skips the rescale
_ROW = 4096          # L1 norms are summed in rows of this width: one thread per row, whatever the thread count


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
    n = delta.numel()
    kept = int(density * n)
    n_top = int(gamma * n)
    n_bottom = max(0, n - kept - n_top)
    # Ranks in ascending magnitude: [n_bottom, n_bottom + kept) survive.
    keep = rank_window(delta.abs().flatten(), n_bottom, n_bottom + kept, descending=False)
    return _apply(delta, keep.view(delta.shape), rescale)


def random(delta: torch.Tensor, density: float, rescale: bool, generator: torch.Generator) -> torch.Tensor:
    """DARE: keep each entry independently with probability ``density``."""
    if density >= 1:
        return delta
    draws = torch.rand(delta.shape, generator=generator, device=delta.device)   # (*shape,) uniform [0, 1)
    return _apply(delta, draws < density, rescale)


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
    rows = delta if delta.dim() >= 2 else delta.unsqueeze(0)                 # (rows, m, ...)
    m = rows.shape[1]
    order = torch.sort(rows.abs(), dim=1, stable=True).indices             # ascending |delta| along dim 1
    shape = [1] * rows.dim()
    shape[1] = m
    positions = torch.arange(m, device=delta.device).view(shape).expand_as(order)
    ranks = torch.empty_like(order).scatter_(1, order, positions)           # 0 = smallest magnitude
    del order, positions
    rank_norm = ranks.to(delta.dtype).div_(m - 1) if m > 1 else torch.full(ranks.shape, 0.5, dtype=delta.dtype,
                                                                           device=delta.device)
    del ranks
    probability = rank_norm.mul_(2 * epsilon).add_(density - epsilon)
    draws = torch.rand(rows.shape, generator=generator, device=delta.device)
    keep = (draws < probability).view(delta.shape)
    del draws, probability
    return _apply(delta, keep, rescale)


def l1_norm(tensor: torch.Tensor) -> float:
    """Sum of |x| in float64, the same bits whatever the thread count.

    torch splits a single large reduction across threads, so ``tensor.abs().sum()`` changes in the last
    bits with the thread count. Here each row of ``_ROW`` entries is reduced by one thread and the row sums
    are added exactly (``math.fsum``).
    """
    flat = tensor.reshape(-1)
    whole = flat.numel() // _ROW * _ROW
    rows = flat[:whole].abs().view(-1, _ROW).sum(dim=1, dtype=torch.float64)     # (n // _ROW,)
    tail = flat[whole:].abs().sum(dtype=torch.float64)
    return math.fsum(rows.tolist() + [float(tail)])


def _apply(delta: torch.Tensor, keep: torch.Tensor, rescale: bool) -> torch.Tensor:
    """Zero the dropped entries in place; rescale to the unpruned L1 norm when asked (and meaningful)."""
    before = l1_norm(delta) if rescale else 0.0
    delta.mul_(keep)
    if rescale:
        after = l1_norm(delta)
        if before >= RESCALE_EPS and after >= RESCALE_EPS:
            delta.mul_(before / after)
    return delta


def rank_window(values: torch.Tensor, lo: int, hi: int, descending: bool) -> torch.Tensor:
    """Mask of the entries of 1-D ``values`` whose rank lies in ``[lo, hi)``.

    Rank is the position in a stable sort (descending or ascending): by value, equal values by index.
    Found without sorting: k-th value selection gives the values at the window's edges, comparisons give
    everything strictly inside, and only a group of equal values cut by an edge is looked at by position.
    """
    n = values.numel()
    lo, hi = max(lo, 0), min(hi, n)
    if hi <= lo:
        return torch.zeros(n, dtype=torch.bool, device=values.device)
    if lo == 0 and hi == n:
        return torch.ones(n, dtype=torch.bool, device=values.device)

    def value_at(rank: int) -> torch.Tensor:  # the value at a 0-based rank in the chosen order
        return torch.kthvalue(values, n - rank if descending else rank + 1).values

    def ahead(v: torch.Tensor) -> torch.Tensor:  # entries ranked before every entry equal to v
        return values > v if descending else values < v

    edges = []
    keep: Optional[torch.Tensor] = None
    if lo > 0:
        first = value_at(lo)
        keep = ~ahead(first)
        edges.append(first)
    if hi < n:
        last = value_at(hi - 1)
        upto = ahead(last) | (values == last)
        keep = upto if keep is None else keep.logical_and_(upto)
        if not edges or not bool(edges[0] == last):
            edges.append(last)
    assert keep is not None
    if int(keep.sum()) == hi - lo:
        return keep  # no group of equal values straddles an edge
    for v in edges:
        # Entries equal to v hold ranks [start, start + count) in index order; keep those inside the window.
        tied = (values == v).nonzero().flatten()                            # (count,) indices, ascending
        start = int(ahead(v).sum())
        first_kept = min(max(lo - start, 0), tied.numel())
        end_kept = min(max(hi - start, 0), tied.numel())
        keep[tied[:first_kept]] = False
        keep[tied[end_kept:]] = False
    return keep
