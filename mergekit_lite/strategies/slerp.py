"""SLERP: spherical interpolation between the base and one other model (Shoemake 1985; mergekit's slerp)."""

from __future__ import annotations

import torch

from ..strategy import Param, Strategy, TensorContext
from .chunks import Chunks, whole

COLINEAR = 0.9995       # |cos| above this: plain linear interpolation (the arc is too flat to matter)
NORM_EPS = 1e-8         # a vector with a smaller norm is not normalized
CHUNK = 1 << 20         # elements per partial norm and dot product, as mergekit chunks them
BLOCK = 1 << 18         # element-wise work in blocks that stay in cache (3 x 1B: 64K 6.1 s, 256K 5.5 s, 512K 5.5 s)


def slerp_chunks(src: Chunks, ctx: TensorContext, *, t: float) -> None:
    """sin((1-t) theta)/sin(theta) * base + sin(t theta)/sin(theta) * other, theta the angle between the
    flattened tensors; (1-t) base + t other when they are nearly colinear. t=0 gives the base.

    Three passes over 1M-element chunks, as mergekit makes them: the norms (the norm of the chunk norms),
    the dot product of the normalized vectors (the sum of the chunk sums), then the output. The same
    float32 operations on the same chunks, so the result has mergekit's bits.
    """
    if src.numel == 0:
        return
    t32 = torch.tensor([[t]], dtype=src.dtype, device=src.device)        # (1, 1), rounded like mergekit's t

    def pair(start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:   # (1, m) each
        return src.base(start, end).view(1, -1), src.input(0, start, end).view(1, -1)

    def norms(start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(torch.linalg.vector_norm(x, dim=1, keepdim=True) for x in pair(start, end))

    parts = src.map(norms, CHUNK)
    norm_a, norm_b = (_norm_of_norms([p[i] for p in parts]) for i in (0, 1))   # (1, 1) each

    def dot(start: int, end: int) -> torch.Tensor:
        products = torch.empty(1, end - start, device=src.device)            # (1, m)
        for lo in range(start, end, BLOCK):   # element-wise in cache-sized blocks; the sum over the chunk
            a, b = pair(lo, min(lo + BLOCK, end))
            torch.mul(a / norm_a, b / norm_b, out=products[:, lo - start:lo - start + a.shape[1]])
        return products.sum(dim=1, keepdim=True)

    cos = torch.stack(src.map(dot, CHUNK)).sum(dim=0).clamp(-1, 1)     # (1, 1) cos(theta)
    if bool(cos.abs() > COLINEAR):
        coef_a, coef_b = 1 - t32, t32
    else:
        theta = torch.acos(cos)
        sin_theta = torch.sin(theta)
        coef_a = torch.sin((1 - t32) * theta) / sin_theta
        coef_b = torch.sin(t32 * theta) / sin_theta

    def output(start: int, end: int) -> None:
        for lo in range(start, end, BLOCK):
            a, b = pair(lo, min(lo + BLOCK, end))
            src.emit(lo, torch.add(coef_a * a, coef_b * b).view(-1))

    src.map(output, CHUNK)


def _norm_of_norms(parts: list[torch.Tensor]) -> torch.Tensor:
    """The L2 norm from the per-chunk norms; 1 when it is too small to divide by. (1, 1)"""
    norm = torch.linalg.vector_norm(torch.stack(parts), dim=0)
    return torch.where(norm > NORM_EPS, norm, 1)


STRATEGY = Strategy(
    name="slerp",
    fn=whole(slerp_chunks),
    chunked=slerp_chunks,
    title="SLERP",
    summary="Spherical interpolation between the base and one other model; t=0 is the base, t=1 the other.",
    paper="https://en.wikipedia.org/wiki/Slerp",
    base="required",
    min_inputs=1,
    max_inputs=1,
    propagates_nonfinite=True,   # a NaN or Inf makes a norm, hence every coefficient, NaN
    params=(
        Param("t", float, "interpolation position: 0 is the base model, 1 the other model"),
    ),
)
