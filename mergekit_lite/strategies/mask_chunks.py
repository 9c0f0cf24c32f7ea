"""Breadcrumbs' and DELLA's pruning over chunks (task_chunks.py): each model's keep mask from its whole |delta|,
one model at a time, then the same element-wise pass as TIES and DARE.

Both rank every entry of a task vector against the others (breadcrumbs by magnitude over the whole tensor,
DELLA within each row), so each needs one model's whole |delta|. On whole float32 tensors the family held
every input, the running sum, the delta, its magnitudes and the masks at once: 2.0-2.8 GiB for a 1B merge
against a bound of 1.50. Here memory holds the raw inputs, the output, one float32 vector of magnitudes (filled
again for each model) and a byte per entry per pruned model.

The masks, norms and draws are those of ``sparsifiers.magnitude_outliers`` and ``sparsifiers.della_magprune``
on the same values (DELLA draws model after model from the tensor's one generator, as the whole-tensor path
does), and the combination is the same float32 operations in the same order, so the bits are those of
``task_arithmetic.generalized_task_arithmetic``.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch

from ..strategy import TensorContext
from . import sparsifiers
from .chunks import Chunks, collect

CHUNK = sparsifiers.DRAW_CHUNK

# (chunk start, end) -> (model, block start, delta) -> pruned delta
Prune = Callable[[int, int], Callable[[int, int, torch.Tensor], torch.Tensor]]


def mask_prune(src: Chunks, ctx: TensorContext, pruned: list[int], sparsifier: str, rescale: bool,
               density: Sequence[float], gamma: Sequence[float], epsilon: Sequence[float]) -> Prune:
    """The pruning of breadcrumbs (``magnitude_outliers``) or DELLA (``della_magprune``) of the ``pruned``
    models (density below 1), mask by mask, in model order."""
    generator = ctx.generator(src.device) if sparsifier == "della_magprune" else None
    # the whole path's L1 norms (sparsifiers.l1_norm for DELLA, torch_l1) on magnitudes, which need no abs():
    # the same values, so the same sums, without a float32 temporary of the tensor's size
    norm = (lambda v: math.fsum(sparsifiers.row_sums(v))) if sparsifier == "della_magprune" else torch.sum
    masks: dict[int, Optional[torch.Tensor]] = {}   # None: every entry dropped
    scales: dict[int, float] = {}
    magnitudes: Optional[torch.Tensor] = None
    for i in pruned:
        if density[i] <= 0 and sparsifier == "della_magprune":
            masks[i] = None                          # della_magprune zeroes it without a draw
            continue
        magnitudes = collect(src, lambda lo, hi, i=i: (src.input(i, lo, hi) - src.base(lo, hi)).abs_(), CHUNK,
                             out=magnitudes)
        shaped = magnitudes.view(src.shape)
        if generator is not None:
            keep = sparsifiers.della_keep(shaped, density[i], epsilon[i], generator, spread=src.spread).view(-1)
        else:
            keep = sparsifiers.outliers_keep(magnitudes, density[i], gamma[i], src.spread)
        masks[i] = keep.view(torch.uint8)              # 1 / 0: delta * mask is exact, as delta * bool
        if rescale:
            before = norm(shaped)
            for part in sparsifiers.slices(src.numel):      # a float32 tensor times a uint8 one: torch
                magnitudes[part].mul_(masks[i][part])           # converts the uint8 one whole, so in slices
            after = norm(shaped)                               # |delta * keep|, as the whole path's norm
            if before >= sparsifiers.RESCALE_EPS and after >= sparsifiers.RESCALE_EPS:
                scales[i] = before / after
    del magnitudes

    def prune(i: int, lo: int, delta: torch.Tensor) -> torch.Tensor:
        if i not in masks:
            return delta
        mask = masks[i]
        if mask is None:
            return delta.zero_()
        delta.mul_(mask[lo:lo + delta.numel()])
        return delta.mul_(scales[i]) if i in scales else delta

    return lambda start, end: prune
