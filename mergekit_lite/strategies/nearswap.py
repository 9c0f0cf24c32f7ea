"""NearSwap: take the other model's value where it is near the base's, keep the base's where they differ
(alchemonaut, https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001; mergekit's nearswap)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..strategy import Param, Strategy, TensorContext

DIFF_FLOOR = 1e-6   # |base - other| is clamped to at least this before dividing


def nearswap(inputs: Sequence[torch.Tensor], base: Optional[torch.Tensor], ctx: TensorContext, *,
             t: float) -> torch.Tensor:
    """w * other + (1 - w) * base per entry, with w = clamp(t / max(|base - other|, 1e-6), 0, 1): entries
    within t of each other take the other model's value, farther ones move toward it by t / distance.

    Element-wise: any block of entries merges alone. The operations are mergekit's (``t / d`` is
    torch's reciprocal of d times t), so the float32 result has the same bits.
    """
    assert base is not None
    other = inputs[0]
    distance = torch.abs(base - other).clamp(min=DIFF_FLOOR)
    w = (t / distance).clamp(min=0, max=1)
    return w * other + (1 - w) * base


STRATEGY = Strategy(
    name="nearswap",
    fn=nearswap,
    title="NearSwap",
    summary="Per entry: the other model's value where it is within t of the base's, else a step of "
            "t / distance toward it; t=0 is the base.",
    paper="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",   # a model card, no paper
    base="required",
    min_inputs=1,
    max_inputs=1,
    elementwise=True,
    propagates_nonfinite=True,   # an Inf or NaN in either input makes the distance, hence the sum, Inf or NaN
    params=(
        Param("t", float, "distance below which the other model's value is taken (larger t: more of it)"),
    ),
)
