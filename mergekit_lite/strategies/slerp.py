"""SLERP: spherical interpolation between the base and one other model (Shoemake 1985; mergekit's slerp)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..strategy import Param, Strategy, TensorContext

COLINEAR = 0.9995       # |cos| above this: plain linear interpolation (the arc is too flat to matter)
NORM_EPS = 1e-8         # a vector with a smaller norm is not normalized
CHUNK = 1 << 20         # elements per pass: bounds float32 scratch whatever the tensor's size


def slerp(inputs: Sequence[torch.Tensor], base: Optional[torch.Tensor], ctx: TensorContext, *,
          t: float) -> torch.Tensor:
    """sin((1-t) theta)/sin(theta) * base + sin(t theta)/sin(theta) * other, theta the angle between the
    flattened tensors; (1-t) base + t other when they are nearly colinear. t=0 gives the base.

    The coefficients are computed as mergekit does, in float32 over 1M-element chunks (the norm of the
    chunk norms, the sum of the chunk dot products of the normalized vectors), so the result has its bits.
    """
    assert base is not None
    a, b = base.reshape(1, -1), inputs[0].reshape(1, -1)                 # (1, n)
    t32 = torch.tensor([[t]], dtype=base.dtype, device=base.device)     # (1, 1), rounded like mergekit's t
    n = a.shape[1]
    if n == 0:
        return base.clone()
    chunks = [(start, min(start + CHUNK, n)) for start in range(0, n, CHUNK)]
    norm_a = _norm_of_chunks(a, chunks)
    norm_b = _norm_of_chunks(b, chunks)
    dot = torch.stack([(a[:, s:e] / norm_a * (b[:, s:e] / norm_b)).sum(dim=1, keepdim=True)
                       for s, e in chunks]).sum(dim=0).clamp(-1, 1)     # (1, 1) cos(theta)
    if bool(dot.abs() > COLINEAR):
        coef_a, coef_b = 1 - t32, t32
    else:
        theta = torch.acos(dot)
        sin_theta = torch.sin(theta)
        coef_a = torch.sin((1 - t32) * theta) / sin_theta
        coef_b = torch.sin(t32 * theta) / sin_theta
    result = torch.empty_like(a)
    for s, e in chunks:
        torch.add(coef_a * a[:, s:e], coef_b * b[:, s:e], out=result[:, s:e])
    return result.view(base.shape)


def _norm_of_chunks(x: torch.Tensor, chunks: list[tuple[int, int]]) -> torch.Tensor:
    """The L2 norm as the norm of the per-chunk norms; 1 when it is too small to divide by. (1, 1)"""
    parts = torch.stack([torch.linalg.vector_norm(x[:, s:e], dim=1, keepdim=True) for s, e in chunks])
    norm = torch.linalg.vector_norm(parts, dim=0)
    return torch.where(norm > NORM_EPS, norm, 1)


STRATEGY = Strategy(
    name="slerp",
    fn=slerp,
    title="SLERP",
    summary="Spherical interpolation between the base and one other model; t=0 is the base, t=1 the other.",
    paper="https://en.wikipedia.org/wiki/Slerp",
    base="required",
    min_inputs=1,
    max_inputs=1,
    params=(
        Param("t", float, "interpolation position: 0 is the base model, 1 the other model"),
    ),
)
