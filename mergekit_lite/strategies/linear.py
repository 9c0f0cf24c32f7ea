"""Linear: a weighted average of the models (Wortsman et al., "Model soups", arXiv 2203.05482)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..strategy import Param, Strategy, TensorContext, weights_sum_check


def linear(inputs: Sequence[torch.Tensor], base: Optional[torch.Tensor], ctx: TensorContext, *,
           weight: Sequence[float], normalize: bool) -> torch.Tensor:
    """sum_i w_i x_i, divided by sum_i w_i when ``normalize``.

    The operations are mergekit's (float32 ``addcmul_`` per model in order, then one division by the
    float32 sum of the weights), so the result is the same float32 bits.
    """
    weights = torch.tensor(weight, dtype=inputs[0].dtype, device=inputs[0].device)   # (n_models,)
    result = torch.zeros_like(inputs[0])
    for tensor, coefficient in zip(inputs, weights):
        result.addcmul_(tensor, coefficient)
    if normalize:
        result.div_(weights.sum())
    return result


STRATEGY = Strategy(
    name="linear",
    fn=linear,
    title="Linear (model soup)",
    summary="Weighted average of the models' tensors; a base_model, if given, is one more input.",
    elementwise=True,
    propagates_nonfinite=True,   # sum_i w_i x_i (/ sum_i w_i)
    paper="https://arxiv.org/abs/2203.05482",
    base="input",
    check=weights_sum_check,   # normalize by a zero sum would write NaN/Inf (mergekit does)
    params=(
        Param("weight", float, "how much this model contributes", per_model=True),
        Param("normalize", bool, "divide by the sum of the weights, so weights need not sum to 1",
              default=True),
    ),
)
