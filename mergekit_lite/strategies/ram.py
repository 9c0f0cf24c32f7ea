"""RAM and RAM+ (tensor-local): add every task vector entry that only one model changed, and the average of
the entries several models changed (Reinforced Agent Merging, arXiv 2601.13572; mergekit's ram, ramplus_tl).

An entry of model i's task vector counts as changed ("active") when |x_i - base| > epsilon. Per element, c is
the number of models for which it is active: c == 1 is a unique entry (added as is), c > 1 an overlapping one
(added divided by c). RAM+ scales each model's unique entries by lambda_i = 1 + r * clip(rho_i, 0, alpha),
rho_i = (its active overlapping entries) / (its active unique entries), counted over the whole tensor.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..strategy import Param, Strategy, TensorContext
from .chunks import Chunks, whole

CHUNK = 1 << 20   # RAM+'s counting pass and the output pass, per chunk of this many entries
BLOCK = 1 << 16   # element-wise work in cache-sized blocks (models x BLOCK float32 temporaries)


def _split(deltas: torch.Tensor, epsilon: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The masks of one block of task vectors (n_models, m): active, the count c (1, m), overlap, unique.
    The same tensor operations as mergekit, so the same float32 bits."""
    active = deltas.abs() > epsilon                         # (n, m) bool; epsilon rounded to float32
    counts = active.sum(dim=0, keepdim=True)                # (1, m) int64
    return active, counts, counts > 1, counts == 1


def _merge_block(base: torch.Tensor, deltas: torch.Tensor, epsilon: float,
                 scale: Optional[torch.Tensor]) -> torch.Tensor:
    """base + sum_i delta_i * active_i * (unique * lambda_i + overlap / c) for one block. (m,)"""
    active, counts, overlap, unique = _split(deltas, epsilon)
    kept = deltas * active                                  # NaN stays NaN (NaN * 0), as in mergekit
    solo = kept * unique
    if scale is not None:
        solo = solo * scale.unsqueeze(-1)                   # (n, 1): RAM+'s lambda_i
    merged = (solo + kept * overlap / counts.clamp(min=1)).sum(dim=0, keepdim=True)   # (1, m)
    return base + merged.view(-1)


def _deltas(src: Chunks, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
    base = src.base(lo, hi)
    return base, torch.stack([src.input(i, lo, hi) - base for i in range(src.count)])   # (m,), (n, m)


def _blocks(start: int, end: int) -> list[tuple[int, int]]:
    return [(lo, min(lo + BLOCK, end)) for lo in range(start, end, BLOCK)]


def ramplus_tl_chunks(src: Chunks, ctx: TensorContext, *, epsilon: float, r: float, alpha: float) -> None:
    """RAM+ in two passes over chunks: per model, count its active entries that are shared and unique
    (integers: exact in any chunking), then merge element-wise with lambda_i from those counts."""
    if src.numel == 0:
        return

    def count(start: int, end: int) -> torch.Tensor:       # (2, n) int64: shared, unique
        found = torch.zeros(2, src.count, dtype=torch.int64, device=src.device)
        for lo, hi in _blocks(start, end):
            active, _, overlap, unique = _split(_deltas(src, lo, hi)[1], epsilon)
            found[0] += (active & overlap).sum(dim=1)
            found[1] += (active & unique).sum(dim=1)
        return found

    shared, unique = torch.stack(src.map(count, CHUNK)).sum(dim=0)          # (n,) each
    rho = shared / unique.clamp(min=epsilon)                                # float32, as mergekit
    scale = 1 + r * rho.clamp(min=0, max=alpha)                             # (n,) lambda_i

    def output(start: int, end: int) -> None:
        for lo, hi in _blocks(start, end):
            base, deltas = _deltas(src, lo, hi)
            src.emit(lo, _merge_block(base, deltas, epsilon, scale))

    src.map(output, CHUNK)


def ram(inputs: Sequence[torch.Tensor], base: Optional[torch.Tensor], ctx: TensorContext, *,
        epsilon: float) -> torch.Tensor:
    """RAM on whole tensors or row blocks (element-wise): RAM+'s output pass without the lambda_i."""
    assert base is not None
    deltas = torch.stack([x.reshape(-1) - base.reshape(-1) for x in inputs])           # (n, numel)
    return _merge_block(base.reshape(-1), deltas, epsilon, None).view(base.shape)


EPSILON = Param("epsilon", float, "a task vector entry counts as changed when |x - base| > epsilon",
                default=1e-5, min=0)
DETAILS = ("Per element, c = how many models changed it (|x_i - base| > epsilon). Entries changed by one "
           "model are added as they are, entries changed by several are averaged over those models.")

STRATEGIES = [
    Strategy(
        name="ram",
        fn=ram,
        title="Reinforced Agent Merging (RAM)",
        summary="Adds to the base each task vector entry only one model changed, and the mean of the entries "
                "several models changed. Per-model weights are not used.",
        paper="https://arxiv.org/abs/2601.13572",
        base="required",
        elementwise=True,
        details=DETAILS,
        params=(EPSILON,),
    ),
    Strategy(
        name="ramplus_tl",
        fn=whole(ramplus_tl_chunks),
        chunked=ramplus_tl_chunks,
        title="Reinforced Agent Merging Plus, tensor-local (RAM+)",
        summary="RAM, with each model's unique entries scaled by 1 + r * clip(rho, 0, alpha), rho = its shared "
                "over its unique changed entries in the tensor. Per-model weights are not used.",
        paper="https://arxiv.org/abs/2601.13572",
        base="required",
        details=DETAILS,
        params=(
            Param("r", float, "how much the overlap ratio rho raises a model's unique entries", default=0.1, min=0),
            Param("alpha", float, "upper clip of the overlap ratio rho", default=0.2, min=0),
            EPSILON,
        ),
    ),
]
