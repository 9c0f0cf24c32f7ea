"""Model Stock: move from the base toward the average of the models by a ratio set by how much their task
vectors agree (Jang et al., "Model Stock", arXiv 2403.19522)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..strategy import Param, Strategy, TensorContext

NORM_PRODUCT_CLAMP = 1e-6   # |a| |b| is clamped to at least this before dividing
SINGULAR = 1e-6             # |1 + (N-1) cos| below this: no finite ratio, keep the base


def model_stock(inputs: Sequence[torch.Tensor], base: Optional[torch.Tensor], ctx: TensorContext, *,
                filter_wise: bool) -> torch.Tensor:
    """t * mean(models) + (1 - t) * base, with t = N cos / (1 + (N - 1) cos) and cos the mean pairwise
    cosine between the task vectors (per tensor, or per row with ``filter_wise``). Same operation order as
    mergekit, so the same float32 bits.
    """
    assert base is not None
    if filter_wise:
        w0 = base.unsqueeze(0) if base.dim() == 1 else base      # (rows, ...): one ratio per row
        models = [x.unsqueeze(0) if x.dim() == 1 else x for x in inputs]
    else:
        w0 = base.reshape(-1)                                    # (n,): one ratio for the tensor
        models = [x.reshape(-1) for x in inputs]
    offsets = [x - w0 for x in models]
    norms = [torch.norm(offset, dim=-1) for offset in offsets]  # (rows,) or ()
    cosines = []
    for i in range(len(offsets)):
        for j in range(i + 1, len(offsets)):
            dot = (offsets[i] * offsets[j]).sum(dim=-1)
            cosines.append((dot / (norms[i] * norms[j]).clamp(min=NORM_PRODUCT_CLAMP)).clamp(-1, 1))
    del offsets
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)        # (rows, 1) or (1,)
    count = len(models)
    denominator = 1 + (count - 1) * cos
    singular = denominator.abs() < SINGULAR
    t = torch.where(singular, torch.zeros_like(cos),
                    (count * cos) / torch.where(singular, torch.ones_like(denominator), denominator))
    average = models[0].clone()
    for x in models[1:]:
        average.add_(x)
    average.div_(count)
    return (t * average + (1 - t) * w0).reshape(base.shape)


STRATEGY = Strategy(
    name="model_stock",
    fn=model_stock,
    title="Model Stock",
    summary="Interpolates between the base and the models' average by a ratio set by how well their task "
            "vectors agree (mean pairwise cosine). Per-model weights are not used.",
    paper="https://arxiv.org/abs/2403.19522",
    base="required",
    min_inputs=2,
    params=(
        Param("filter_wise", bool, "one ratio per row (output filter) instead of one per tensor", default=False),
    ),
)
