"""Task arithmetic: add weighted task vectors to the base (Ilharco et al., arXiv 2212.04089)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..strategy import Param, Strategy, TensorContext, weights_sum_check

LAMBDA = Param("lambda", float, "scales the combined task vector, applied last", default=1.0)


def task_arithmetic(inputs: Sequence[torch.Tensor], base: Optional[torch.Tensor], ctx: TensorContext, *,
                    weight: Sequence[float], normalize: bool, **params: float) -> torch.Tensor:
    """base + lambda * sum_i w_i (x_i - base), divided by sum_i w_i when ``normalize``.

    Same operation order as mergekit's generalized task arithmetic: the weight multiplies each delta,
    deltas are summed in model order, the sum is divided by the weight total (a total of |w| < 1e-8 counts
    as 1, as in mergekit; plans refuse such weights with normalize), lambda is applied last.
    """
    assert base is not None
    lam = params["lambda"]
    mixed = torch.zeros_like(base)
    for tensor, w in zip(inputs, weight):
        delta = tensor - base                      # one delta alive at a time: memory stays (n + 3) tensors
        delta.mul_(torch.tensor(w, dtype=delta.dtype, device=delta.device))
        mixed.add_(delta)
        del delta
    if normalize:
        divisor = torch.tensor(weight, dtype=base.dtype, device=base.device).sum()
        if divisor.abs() < 1e-8:
            divisor = torch.ones_like(divisor)
        mixed.div_(divisor)
    if lam != 1:
        mixed.mul_(lam)
    return base + mixed


STRATEGY = Strategy(
    name="task_arithmetic",
    fn=task_arithmetic,
    title="Task Arithmetic",
    summary="Adds each model's weighted difference from the base (its task vector) to the base.",
    elementwise=True,
    paper="https://arxiv.org/abs/2212.04089",
    base="required",
    # mergekit quietly skips normalizing when the weights sum to ~0; a spec asking for it is refused instead.
    check=weights_sum_check,
    params=(
        Param("weight", float, "scales this model's task vector", per_model=True, for_base=False),
        Param("normalize", bool, "divide the summed task vectors by the sum of the weights", default=False),
        LAMBDA,
    ),
)
