"""Passthrough: one input, copied (optionally scaled). The method of layer stacking (frankenmerges).

Used with ``slices:``, each output layer is one source layer taken as it is; ``scale`` with filters can,
for example, zero ``o_proj`` and ``down_proj`` of repeated layers so that they start as identity
functions of the residual stream (depth upscaling that does not change the model's outputs).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..strategy import Param, Strategy, TensorContext


def passthrough(inputs: Sequence[torch.Tensor], base: Optional[torch.Tensor], ctx: TensorContext, *,
                scale: Sequence[Optional[float]]) -> torch.Tensor:
    """The single input, times ``scale`` when one is set (None: the tensor as it is, bit for bit)."""
    (tensor,), (factor,) = inputs, scale
    return tensor if factor is None else tensor * factor


STRATEGY = Strategy(
    name="passthrough",
    fn=passthrough,
    title="Passthrough",
    summary="Copies its one input, optionally scaled: the method of layer stacking (slices).",
    elementwise=True,
    propagates_nonfinite=True,   # x, or x * scale
    base="input",
    min_inputs=1,
    max_inputs=1,
    params=(
        Param("scale", float, "multiplies this model's tensor; unset: copied unchanged", default=None,
              per_model=True),
    ),
)
