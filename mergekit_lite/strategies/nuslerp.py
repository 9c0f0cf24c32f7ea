"""NuSLERP: SLERP between two models driven by their weights, optionally of their task vectors (mergekit's
nuslerp): whole tensors, rows, or columns."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..strategy import Param, Strategy, TensorContext

NORM_CLAMP = 1e-7     # norms are clamped to at least this before dividing
COLINEAR_EPS = 1e-8   # lerp where 1 - cos^2 <= COLINEAR_EPS^2


def nuslerp(inputs: Sequence[torch.Tensor], base: Optional[torch.Tensor], ctx: TensorContext, *,
            weight: Sequence[float], nuslerp_flatten: bool, nuslerp_row_wise: bool) -> torch.Tensor:
    """Interpolate from the first model (t=0) to the second (t=1) at t = w2 / (w1 + w2) (0.5 when the
    weights sum to ~0). With a base, the task vectors x_i - base are interpolated and added to the base.

    ``nuslerp_flatten`` (default): one angle for the whole tensor. Otherwise one angle per vector along the
    last dimension (each row of a matrix), or with ``nuslerp_row_wise`` along the first (each column).
    Unlike slerp there is no 0.9995 cut-off: only truly colinear vectors are lerped.
    """
    total = sum(weight)
    t = 0.5 if abs(total) < 1e-6 else weight[1] / total
    if base is None:
        return _interpolate(t, inputs[0], inputs[1], nuslerp_flatten, nuslerp_row_wise)
    return base + _interpolate(t, inputs[0] - base, inputs[1] - base, nuslerp_flatten, nuslerp_row_wise)


def _interpolate(t: float, v0: torch.Tensor, v1: torch.Tensor, flatten: bool, row_wise: bool) -> torch.Tensor:
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)                  # (n,): one vector
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)        # (..., rows): vectors along dim 0
    cos = (_unit(v0) * _unit(v1)).sum(dim=-1, keepdim=True).clamp(-1, 1)    # (..., 1)
    colinear = (1 - cos.square()) <= COLINEAR_EPS ** 2
    if bool(colinear.all()):
        result = (1 - t) * v0 + t * v1
    else:
        theta = torch.acos(torch.where(colinear, 0, cos))
        sin_theta = torch.sin(theta)
        result = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin_theta
        if bool(colinear.any()):
            result = torch.where(colinear, (1 - t) * v0 + t * v1, result)
    if row_wise and not flatten:
        result = result.transpose(0, -1)
    return result.reshape(shape)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=NORM_CLAMP)


STRATEGY = Strategy(
    name="nuslerp",
    fn=nuslerp,
    title="NuSLERP",
    summary="Spherical interpolation between two models at t = w2 / (w1 + w2); with a base, of their task "
            "vectors. Whole tensors, or per row / per column.",
    paper="https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md#nuslerp-nuslerp",   # no paper
    base="optional",
    min_inputs=2,
    max_inputs=2,
    params=(
        Param("weight", float, "this model's share of the interpolation (t = w2 / (w1 + w2))", per_model=True,
              for_base=False),
        Param("nuslerp_flatten", bool, "one angle for the whole tensor (false: one per row or column)",
              default=True),
        Param("nuslerp_row_wise", bool, "with nuslerp_flatten false: interpolate columns (vectors along dim 0) "
                                        "instead of rows", default=False),
    ),
)
