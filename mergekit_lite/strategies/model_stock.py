"""Model Stock: move from the base toward the average of the models by a ratio set by how much their task
vectors agree (Jang et al., "Model Stock", arXiv 2403.19522)."""

from __future__ import annotations

import torch

from ..strategy import Param, Strategy, TensorContext
from .chunks import Chunks, collect, whole

NORM_PRODUCT_CLAMP = 1e-6   # |a| |b| is clamped to at least this before dividing
SINGULAR = 1e-6             # |1 + (N-1) cos| below this: no finite ratio, keep the base
BLOCK = 1 << 18             # elements per piece of work


def model_stock(src: Chunks, ctx: TensorContext, *, filter_wise: bool) -> None:
    """t * mean(models) + (1 - t) * base, with t = N cos / (1 + (N - 1) cos) and cos the mean pairwise
    cosine between the task vectors (per tensor, or per row with ``filter_wise``). Same operations as
    mergekit, so the same float32 bits: each norm and dot product is torch's reduction over one whole float32
    vector (each task vector, each pairwise product), filled in chunks from the raw inputs (``collect``) and
    filled again for the next; the interpolation runs in chunks. Memory holds the raw inputs, the output and
    that one vector, not every model's float32 copy and task vector.
    """
    if src.numel == 0:
        return
    # reductions run over the last dim of this shape: the whole tensor as one row, or its rows (dim 1)
    shape = (src.numel,) if not filter_wise else src.shape if len(src.shape) >= 2 else (1, src.numel)
    vector = None

    def offset(i: int, lo: int, hi: int) -> torch.Tensor:
        return src.input(i, lo, hi) - src.base(lo, hi)

    norms = []
    for i in range(src.count):
        vector = collect(src, lambda lo, hi, i=i: offset(i, lo, hi), BLOCK, out=vector)
        norms.append(torch.norm(vector.view(shape), dim=-1))                          # shape[:-1]
    cosines = []
    for i in range(src.count):
        for j in range(i + 1, src.count):
            vector = collect(src, lambda lo, hi, i=i, j=j: offset(i, lo, hi).mul_(offset(j, lo, hi)), BLOCK,
                             out=vector)
            dot = vector.view(shape).sum(dim=-1)
            cosines.append((dot / (norms[i] * norms[j]).clamp(min=NORM_PRODUCT_CLAMP)).clamp(-1, 1))
    del vector
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)        # shape[:-1] + (1,)
    count = src.count
    denominator = 1 + (count - 1) * cos
    singular = denominator.abs() < SINGULAR
    t = torch.where(singular, torch.zeros_like(cos),
                    (count * cos) / torch.where(singular, torch.ones_like(denominator), denominator)).view(-1)
    keep_base = (1 - t)                                          # one value per row of ``shape``
    per_row = t.numel() > 1                                      # filter_wise over several rows
    width = shape[-1]

    def output(lo: int, hi: int) -> None:
        average = src.input(0, lo, hi).clone()                    # a view of the input on the whole path
        for i in range(1, count):
            average.add_(src.input(i, lo, hi))
        average.div_(count)
        base = src.base(lo, hi)
        ratio, rest = t, keep_base
        if per_row:   # the chunk holds whole rows (the step below): each row with its own ratio
            rows = slice(lo // width, hi // width)
            ratio, rest = t[rows].unsqueeze(1), keep_base[rows].unsqueeze(1)
            average, base = average.view(-1, width), base.view(-1, width)
        src.emit(lo, (ratio * average + rest * base).view(-1))

    src.map(output, width * max(1, BLOCK // width) if per_row else BLOCK)


STRATEGY = Strategy(
    name="model_stock",
    fn=whole(model_stock),
    chunked=model_stock,
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
