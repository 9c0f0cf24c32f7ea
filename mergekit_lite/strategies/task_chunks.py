"""TIES and DARE over chunks of the inputs (chunks.py): the whole-tensor statistics in passes, then one
element-wise pass that prunes, votes and writes. No float32 copy of a whole tensor is ever made.

- DARE (random sparsifier): each chunk draws from its own stream (``sparsifiers.random_keep``). With
  ``rescale``, a first pass stores each model's keep mask (one byte per entry) and sums its L1 row norms
  before and after the drop (``sparsifiers.l1_rows``, exact in any chunking).
- TIES (magnitude sparsifier, without ``rescale``): the k-th largest |delta| by a radix select spread over
  chunks: a histogram of the top 16 bits of each |delta| (integer counts, summed in any order), then the
  entries of the one bucket holding rank k, with their positions; equal magnitudes straddling the cut are
  kept by position, as ``sparsifiers.rank_window`` does on the whole tensor.

Both keep exactly the entries the whole-tensor path keeps and then do the same float32 operations on each
entry, so the bits are those of ``generalized_task_arithmetic`` (and, for TIES, mergekit's).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from ..chunks import Chunks
from ..strategy import TensorContext
from . import sparsifiers
from .consensus import vote, weighted_sum

CHUNK = sparsifiers.DRAW_CHUNK   # DARE's streams are per chunk of this many entries
BUCKETS = 1 << 15                # top 16 bits of a non-negative float32


@dataclass(frozen=True)
class Cut:
    """TIES' trim of one task vector: keep |delta| >= value, except the equal ones at ``dropped``."""

    value: torch.Tensor          # () float32
    dropped: torch.Tensor        # (m,) int64 flat positions, ascending


def chunkable(sparsifier: Optional[str], rescale: bool) -> bool:
    """DARE always; TIES without rescale (its L1 norms are mergekit's single float32 sums, whole-tensor)."""
    return sparsifier == "random" or (sparsifier == "magnitude" and not rescale)


def task_chunks(src: Chunks, ctx: TensorContext, *, consensus: Optional[str], sparsifier: str,
                weight: Sequence[float], normalize: bool, rescale: bool, density: Sequence[float],
                int8_mask: bool = False, **params: float) -> None:
    """The task arithmetic family with the random or magnitude sparsifier, in passes over chunks."""
    lam = params["lambda"]
    weights = [torch.tensor(w, device=src.device) for w in weight]    # float32 scalars
    pruned = [i for i in range(src.count) if density[i] < 1 and src.numel > 0]
    if sparsifier == "random":
        prune = _random_drop(src, ctx, pruned, density, rescale)
    else:
        prune = _magnitude_trim(src, pruned, density)

    def combine(start: int, end: int) -> None:
        base = src.base(start, end)
        deltas = [prune(i, start, src.input(i, start, end) - base) for i in range(src.count)]
        if consensus is not None:
            src.emit(start, vote(deltas, weights, base, normalize, lam))
        else:
            src.emit(start, weighted_sum(deltas, weights, base, normalize, lam))

    src.map(combine, CHUNK)


Prune = Callable[[int, int, torch.Tensor], torch.Tensor]   # (model, chunk start, delta) -> pruned delta


def _random_drop(src: Chunks, ctx: TensorContext, pruned: list[int], density: Sequence[float],
                 rescale: bool) -> Prune:
    masks = {i: torch.empty(src.numel, dtype=torch.uint8, device=src.device) for i in pruned} if rescale else {}

    def draw(i: int, start: int, end: int) -> torch.Tensor:
        return sparsifiers.random_keep(ctx, i, density[i], start, end).to(src.device)

    def norms(start: int, end: int) -> list[tuple[list[float], list[float]]]:
        base, sums = src.base(start, end), []
        for i in pruned:
            delta = src.input(i, start, end) - base
            masks[i][start:end] = draw(i, start, end)
            before = sparsifiers.l1_rows(delta)
            sums.append((before, sparsifiers.l1_rows(delta.mul_(masks[i][start:end]))))
        return sums

    scales: dict[int, float] = {}
    if rescale and pruned:
        parts = src.map(norms, CHUNK)
        for j, i in enumerate(pruned):
            before = math.fsum(x for part in parts for x in part[j][0])
            after = math.fsum(x for part in parts for x in part[j][1])
            if before >= sparsifiers.RESCALE_EPS and after >= sparsifiers.RESCALE_EPS:
                scales[i] = before / after

    def prune(i: int, start: int, delta: torch.Tensor) -> torch.Tensor:
        if i not in pruned:
            return delta
        end = start + delta.numel()
        delta.mul_(masks[i][start:end] if rescale else draw(i, start, end))
        return delta.mul_(scales[i]) if i in scales else delta

    return prune


def _magnitude_trim(src: Chunks, pruned: list[int], density: Sequence[float]) -> Prune:
    n = src.numel
    ks = {i: max(1, int(density[i] * n)) for i in pruned if density[i] > 0}
    cuts = _cuts(src, [i for i in ks if ks[i] < n], ks)

    def prune(i: int, start: int, delta: torch.Tensor) -> torch.Tensor:
        if i not in pruned or (i in ks and i not in cuts):
            return delta
        if i not in ks:
            return delta.zero_()                      # density 0, as sparsifiers.magnitude
        cut = cuts[i]
        keep = delta.abs().ge_(cut.value)             # 1.0 / 0.0: delta * keep is exact, as delta * bool
        lo, hi = (int(x) for x in torch.searchsorted(cut.dropped, torch.tensor([start, start + delta.numel()])))
        keep[cut.dropped[lo:hi] - start] = 0
        return delta.mul_(keep)

    return prune


def _cuts(src: Chunks, models: list[int], ks: dict[int, int]) -> dict[int, Cut]:
    """Each model's k-th largest |delta| and the equal entries beyond rank k: a radix select in two passes."""
    if not models:
        return {}
    n = src.numel
    counts = {i: torch.zeros(BUCKETS, dtype=torch.int64) for i in models}
    lock = threading.Lock()

    def magnitudes(i: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        magnitude = (src.input(i, start, end) - src.base(start, end)).abs_().cpu()
        return magnitude, magnitude.view(torch.int16)[sparsifiers.HIGH_HALF::2]   # (m,) value, bucket

    def histogram(start: int, end: int) -> None:
        for i in models:
            found = torch.bincount(magnitudes(i, start, end)[1], minlength=BUCKETS)
            with lock:                                 # integer counts: any order gives the same totals
                counts[i] += found

    src.map(histogram, CHUNK)
    # The k-th largest is the (n - k + 1)-th smallest: its bucket, and its rank inside the bucket.
    targets = {}
    for i in models:
        below = counts[i].cumsum_(0)                                          # entries in buckets <= b
        rank = n - ks[i] + 1
        bucket = int(torch.searchsorted(below, rank))
        targets[i] = (bucket, rank - (int(below[bucket - 1]) if bucket else 0), n - int(below[bucket]))

    def gather(start: int, end: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        found = []
        for i in models:
            magnitude, bucket = magnitudes(i, start, end)
            inside = (bucket == targets[i][0]).nonzero().view(-1)             # ascending
            found.append((magnitude[inside], inside + start))
        return found

    parts = src.map(gather, CHUNK)
    cuts = {}
    for j, i in enumerate(models):
        values = torch.cat([part[j][0] for part in parts])
        positions = torch.cat([part[j][1] for part in parts])
        _, rank, above = targets[i]
        value = torch.kthvalue(values, rank).values
        greater = above + int((values > value).sum())                        # ranked before every equal entry
        equal = positions[values == value]
        cuts[i] = Cut(value.to(src.device), equal[max(ks[i] - greater, 0):])
    return cuts
