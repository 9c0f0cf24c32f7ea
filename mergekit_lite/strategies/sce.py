"""SCE: Select, Calculate, Erase (Wan et al., "FuseChat: Knowledge Fusion of Chat Models", arXiv 2408.07990;
mergekit's sce).

Whole tensors: the selection is a top-k over the whole tensor's per-entry variance, and the weights are
whole-tensor means of squares. The operations are mergekit's, on the same stacked tensors, so the float32
reductions (the variance, the means, the sums over models) round the same way and give the same bits.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..strategy import Param, Strategy, TensorContext

WEIGHT_SUM_FLOOR = 1e-6   # the matrix-level weights sum to less: every model gets 1/N instead
DIVISOR_FLOOR = 1e-6      # the per-entry sum of the kept weights is clamped to at least this


def sce(inputs: Sequence[torch.Tensor], base: Optional[torch.Tensor], ctx: TensorContext, *,
        select_topk: float, int8_mask: bool) -> torch.Tensor:
    """base + sum_i w_i m_i tau_i / max(sum_i w_i m_i, 1e-6), tau_i = x_i - base.

    Select: with ``select_topk`` < 1, only the entries with the largest variance across the models are kept
    (the top select_topk of the entries with nonzero variance; one mask for every model).
    Calculate: w_i = mean(tau_i^2) / sum_j mean(tau_j^2) over the whole (selected) tensor, or 1/N when that
    sum is below 1e-6. Erase: m_i keeps tau_i's entries whose sign agrees with the sign of sum_j tau_j
    (0 counting as +), as in TIES. ``int8_mask`` changes only the dtype of mergekit's masks, not the result.
    """
    assert base is not None
    # In place where mergekit makes a new tensor (the same values): about 3 stacks at the peak, not 5.
    deltas = torch.stack(list(inputs)).sub_(base)                   # (n_models, *shape)
    if select_topk < 1:
        deltas.mul_(_select(deltas, select_topk).unsqueeze(0))
    # Erase: keep entries agreeing with the elected sign (sum >= 0 elects +)
    elected = (deltas.sum(dim=0) >= 0).to(deltas.dtype) * 2 - 1     # (*shape,) +1 / -1
    agrees = deltas.sign() == elected                                # (n_models, *shape); zeros never agree
    weights = _matrix_weights(deltas).view(-1, *([1] * base.dim()))  # (n_models, 1, ...)
    kept = weights * agrees                                          # (n_models, *shape)
    del agrees
    mixed = deltas.mul_(kept).sum(dim=0)
    return base + mixed / kept.sum(dim=0).clamp(min=DIVISOR_FLOOR)


def _select(deltas: torch.Tensor, fraction: float) -> torch.Tensor:
    """1.0 at the top ``fraction`` of the entries with nonzero variance across the models, else 0.0. (*shape)"""
    if fraction <= 0:
        return torch.zeros_like(deltas[0])
    variance = torch.var(deltas, dim=0, unbiased=False)             # (*shape,) population variance
    k = int(torch.count_nonzero(variance) * fraction)               # float32 product, as mergekit rounds it
    mask = torch.zeros_like(variance)
    if k > 0:
        # the same top-k call on the same values: the same entries win ties at the cut
        mask.view(-1)[torch.topk(variance.abs().view(-1), k=k, largest=True).indices] = 1
    return mask


def _matrix_weights(deltas: torch.Tensor) -> torch.Tensor:
    """Each model's mean squared task vector entry, as a share of their sum. (n_models,)"""
    energy = deltas.square().reshape(deltas.shape[0], -1).mean(dim=1)
    total = torch.sum(energy).item()
    if abs(total) < WEIGHT_SUM_FLOOR:
        return torch.ones_like(energy) / energy.shape[0]
    return energy / total


STRATEGY = Strategy(
    name="sce",
    fn=sce,
    title="SCE",
    summary="Select the entries where the models' task vectors vary most, weight each model by its mean "
            "squared task vector, erase entries against the elected sign, and average.",
    paper="https://arxiv.org/abs/2408.07990",
    base="required",
    min_inputs=1,
    params=(
        Param("select_topk", float, "fraction of the entries (those varying across the models) kept: the "
                                    "largest variances; 1 keeps all", default=1.0, min=0, max=1),
        Param("int8_mask", bool, "accepted for mergekit configs; no effect on the result (mergekit: the dtype "
                                 "of its masks)", default=False),
    ),
)
