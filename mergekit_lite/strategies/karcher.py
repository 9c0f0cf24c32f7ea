"""Karcher mean: the equal-weight Riemannian (Fréchet) mean of the models' directions on the hypersphere,
scaled by their mean norm (Karcher 1977; mergekit's karcher, which cites arXiv 2603.04972).

Each step needs norms and dot products of the whole flattened tensors, which torch (and BLAS, for the dot
product) round in orders of their own: so the running mean, the tangent and one model's unit vector at a
time are whole float32 vectors (``chunks.collect``), the reductions are mergekit's torch calls on them, in its
order (one model at a time, a 0-dim float32 coefficient per term), and the element-wise updates run in chunks.
The float32 result has mergekit's bits; memory holds the raw inputs, the output and three float32 vectors of
the tensor's size, whatever the number of models (mergekit: two per model, plus the mean and the tangent).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..strategy import Param, Strategy, TensorContext
from .chunks import Chunks, collect, whole

BLOCK = 1 << 18   # elements per piece of element-wise work


def karcher_chunks(src: Chunks, ctx: TensorContext, *, max_iter: int, tol: float) -> None:
    """(sum_i |x_i| / N) * m, where m is the Karcher mean of the unit vectors u_i = x_i / |x_i| (flattened,
    every model weighted 1/N; a base_model is one more input).

    Models with |x_i| <= tol are left out of the direction (not of the norm). m starts at the normalized
    weighted average of the u_i (the first u_i when that is shorter than tol), then up to ``max_iter``
    times: T = sum_i a_i (theta_i / sin theta_i)(u_i - cos theta_i m), skipping models within tol of m;
    stop when |T| < tol, else m <- cos|T| m + sin|T| T/|T|, renormalized.
    """
    n = src.count
    if n == 1 or src.numel == 0:
        src.map(lambda lo, hi: src.emit(lo, src.input(0, lo, hi)), BLOCK)
        return
    alpha = 1.0 / n
    unit: Optional[torch.Tensor] = None                    # (numel,), refilled for one model at a time
    norms = []
    for i in range(n):
        unit = collect(src, lambda lo, hi, i=i: src.input(i, lo, hi), BLOCK, out=unit)
        norms.append(torch.linalg.vector_norm(unit))        # 0-dim each
    kept = [(i, norm) for i, norm in enumerate(norms) if norm.item() > tol]   # the models that have a direction
    if not kept:
        # zeros (NaN where an input is not finite), summed from 0 as mergekit's sum()
        src.map(lambda lo, hi: src.emit(lo, sum(src.input(i, lo, hi) * 0 for i in range(n))), BLOCK)
        return

    def units(j: int, out: Optional[torch.Tensor]) -> torch.Tensor:
        i, norm = kept[j]                                   # u_i = x_i / |x_i|, made again when needed
        return collect(src, lambda lo, hi: src.input(i, lo, hi) / norm, BLOCK, out=out)

    shares = _shares(alpha, len(kept))
    mean = _start(src, kept, shares, tol)
    tangent = torch.empty_like(mean)
    for _ in range(max_iter):
        tangent.zero_()
        for j, share in enumerate(shares):
            unit = units(j, unit)
            cos = torch.clamp(torch.dot(mean, unit), -1.0, 1.0)
            theta = torch.arccos(cos)
            if theta.item() < tol:                 # already at m: no pull
                continue
            coef = share * (theta / torch.sin(theta))
            src.map(lambda lo, hi: tangent[lo:hi].add_(coef * (unit[lo:hi] - cos * mean[lo:hi])), BLOCK)
        length = torch.linalg.vector_norm(tangent)
        if length.item() < tol:
            break
        cos_length, sin_length = torch.cos(length), torch.sin(length)
        src.map(lambda lo, hi: mean[lo:hi].copy_(cos_length * mean[lo:hi] + sin_length * (tangent[lo:hi] / length)),
                BLOCK)
        mean_norm = torch.linalg.vector_norm(mean)
        if mean_norm.item() > tol:
            mean.div_(mean_norm)
    unit = tangent = None                          # the output pass needs only the mean
    scale = sum(alpha * norm for norm in norms)    # every model's norm, valid or not
    src.map(lambda lo, hi: src.emit(lo, scale * mean[lo:hi]), BLOCK)


def _shares(alpha: float, count: int) -> list[float]:
    """The weights of the models with a direction, renormalized to sum to 1 (Python floats, as mergekit)."""
    total = sum([alpha] * count)
    return [alpha / total] * count


def _start(src: Chunks, kept: list[tuple[int, torch.Tensor]], shares: list[float], tol: float) -> torch.Tensor:
    """The normalized weighted average of the unit vectors; the first of them when it is shorter than tol."""

    def average(lo: int, hi: int) -> torch.Tensor:
        mean = torch.zeros(hi - lo, dtype=src.dtype, device=src.device)
        for share, (i, norm) in zip(shares, kept):
            mean += share * (src.input(i, lo, hi) / norm)
        return mean

    mean = collect(src, average, BLOCK)
    norm = torch.linalg.vector_norm(mean)
    if norm.item() < tol:
        first, first_norm = kept[0]
        return collect(src, lambda lo, hi: src.input(first, lo, hi) / first_norm, BLOCK, out=mean)
    return mean.div_(norm)


STRATEGY = Strategy(
    name="karcher",
    fn=whole(karcher_chunks),
    chunked=karcher_chunks,
    title="Karcher mean",
    summary="Equal-weight Riemannian mean of the models' directions on the hypersphere, scaled by their "
            "mean norm; iterative. A base_model is one more input.",
    paper="https://arxiv.org/abs/2603.04972",
    base="input",
    details="Bit for bit as mergekit run on one torch thread: its dot products (BLAS) round differently on\n"
            "more threads for long tensors (~2e-7 relative).",
    min_inputs=1,
    params=(
        Param("max_iter", int, "most iterations of the mean's update", default=10, min=0),
        Param("tol", float, "stop when the update is shorter than this; smaller norms and angles count as zero",
              default=1e-5, min=0),
    ),
)
