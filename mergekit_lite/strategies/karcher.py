"""Karcher mean: the equal-weight Riemannian (Fréchet) mean of the models' directions on the hypersphere,
scaled by their mean norm (Karcher 1977; mergekit's karcher, which cites arXiv 2603.04972).

Whole tensors: each step needs dot products and norms of the whole flattened tensors. The operations are
mergekit's, in its order (one model at a time, a 0-dim float32 coefficient per term), so the float32 result
has the same bits.
"""

from __future__ import annotations

from itertools import chain
from typing import Iterator, Optional, Sequence

import torch

from ..strategy import Param, Strategy, TensorContext


def karcher(inputs: Sequence[torch.Tensor], base: Optional[torch.Tensor], ctx: TensorContext, *,
            max_iter: int, tol: float) -> torch.Tensor:
    """(sum_i |x_i| / N) * m, where m is the Karcher mean of the unit vectors u_i = x_i / |x_i| (flattened,
    every model weighted 1/N; a base_model is one more input).

    Models with |x_i| <= tol are left out of the direction (not of the norm). m starts at the normalized
    weighted average of the u_i (the first u_i when that is shorter than tol), then up to ``max_iter``
    times: T = sum_i a_i (theta_i / sin theta_i)(u_i - cos theta_i m), skipping models within tol of m;
    stop when |T| < tol, else m <- cos|T| m + sin|T| T/|T|, renormalized.
    """
    if len(inputs) == 1:
        return inputs[0].clone()
    alpha = 1.0 / len(inputs)
    norms = [torch.linalg.vector_norm(x) for x in inputs]                 # 0-dim each
    kept = [(x, n) for x, n in zip(inputs, norms) if n.item() > tol]    # the models that have a direction
    if not kept:
        return sum(x * 0 for x in inputs)          # zeros (NaN where an input is not finite)

    def units() -> Iterator[torch.Tensor]:
        # u_i = x_i / |x_i| made again when needed (the same bits) rather than N more tensors held
        return (x / n for x, n in kept)

    shares = _shares(alpha, len(kept))
    mean = _start(units(), shares, tol)
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for share, unit in zip(shares, units()):
            cos = torch.clamp(torch.dot(mean.flatten(), unit.flatten()), -1.0, 1.0)
            theta = torch.arccos(cos)
            if theta.item() < tol:                 # already at m: no pull
                continue
            tangent += share * (theta / torch.sin(theta)) * (unit - cos * mean)
        length = torch.linalg.vector_norm(tangent)
        if length.item() < tol:
            break
        mean = torch.cos(length) * mean + torch.sin(length) * (tangent / length)
        mean_norm = torch.linalg.vector_norm(mean)
        if mean_norm.item() > tol:
            mean = mean / mean_norm
    scale = sum(alpha * norm for norm in norms)    # every model's norm, valid or not
    return scale * mean


def _shares(alpha: float, count: int) -> list[float]:
    """The weights of the models with a direction, renormalized to sum to 1 (Python floats, as mergekit)."""
    total = sum([alpha] * count)
    return [alpha / total] * count


def _start(units: Iterator[torch.Tensor], shares: list[float], tol: float) -> torch.Tensor:
    """The normalized weighted average of the unit vectors; the first of them when it is shorter than tol."""
    first = next(units)
    mean = torch.zeros_like(first)
    for share, unit in zip(shares, chain([first], units)):
        mean += share * unit
    norm = torch.linalg.vector_norm(mean)
    return first if norm.item() < tol else mean / norm


STRATEGY = Strategy(
    name="karcher",
    fn=karcher,
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
