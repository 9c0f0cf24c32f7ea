"""How the task vectors of one tensor are combined: summed, or summed after TIES' sign vote; then
normalized, scaled by lambda and added to the base. Element-wise, so any block of entries is combined
alone: the whole-tensor and the chunked paths of the task arithmetic family share these.

    mixed   = sum_i w_i delta_i                  # or, with the vote, only deltas agreeing with the
                                                 # sign of sum_i w_i delta_i (0 counting as +)
    out     = base + lambda * mixed / divisor    # divisor: the weights that took part, when normalizing
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

COMBINE_BLOCK = 1 << 18   # elements per block of the element-wise combination (1 MB per float32 operand)


def vote(deltas: list[torch.Tensor], weights: list[torch.Tensor], base: torch.Tensor, normalize: bool,
          lam: float) -> torch.Tensor:
    """Weight the flat (sparsified) deltas, vote, finish: the result, written over ``deltas[0]``.

    The sign vote and what follows are element-wise: done in cache-sized blocks (one pass over memory
    instead of a dozen; the same operations on each element in the same order, so the same bits), each
    block's result written over the first delta's block (already used by then).
    """
    out = deltas[0]
    for start in range(0, out.numel(), COMBINE_BLOCK):
        block = [d[start:start + COMBINE_BLOCK] for d in deltas]
        for d, w in zip(block, weights):
            d.mul_(w)
        mixed = torch.zeros_like(block[0])
        divisor = sign_vote(block, weights, mixed, normalize)
        out[start:start + COMBINE_BLOCK] = finish(mixed, divisor, lam, base[start:start + COMBINE_BLOCK])
    return out


def finish(mixed: torch.Tensor, divisor: Optional[torch.Tensor], lam: float, base: torch.Tensor) -> torch.Tensor:
    """base + lambda * mixed / divisor, in place in ``mixed``."""
    if divisor is not None:
        mixed.div_(divisor)
    if lam != 1:
        mixed.mul_(lam)
    return mixed.add_(base)   # = base + mixed, bit for bit (addition commutes), without another tensor


def sign_vote(deltas: list[Optional[torch.Tensor]], weights: list[torch.Tensor], mixed: torch.Tensor,
               normalize: bool) -> Optional[torch.Tensor]:
    """TIES steps 2-3 into ``mixed``: elect each entry's sign by total (weighted) mass, 0 counting as +,
    then sum only the deltas of that sign (zeros never take part). Returns the divisor for ``normalize``:
    the sum of the weights of the models that took part, 1 where none did. Consumes ``deltas``.
    """
    for delta in deltas:
        mixed.add_(delta)                                   # (*shape,) total mass per entry
    # +1 / -1 per entry. copysign makes -0 vote -1 where mergekit's `>= 0` says +1, but a -0 total means
    # every delta there is +-0, and zeros never take part, so the result is the same.
    elected = torch.ones_like(mixed).copysign_(mixed)    # (*shape,)
    mixed.zero_()
    divisor = torch.zeros_like(mixed) if normalize else None
    for i, w in enumerate(weights):
        delta, deltas[i] = deltas[i], None                  # drop our reference as soon as it is used
        agrees = torch.mul(delta, elected).gt_(0)          # 1.0 where sign(delta) == elected, else 0.0
        mixed.addcmul_(delta, agrees)                      # delta * 1 or * 0 is exact: same sum as mergekit's
        if divisor is not None:
            divisor.add_(agrees, alpha=float(w))
        del delta, agrees
    if divisor is not None:
        one_where_zero(divisor)
    return divisor


def one_where_zero(divisor: torch.Tensor) -> None:
    """divisor[divisor == 0] = 1, in place; on the CPU by adding NumPy's (divisor == 0) (torch's masked
    assignment cost more than the whole rest of the sign vote: 2-4 ns per entry against 0.8)."""
    if divisor.device.type != "cpu":
        divisor[divisor == 0] = 1
        return
    values = divisor.numpy()
    values += (values == 0).view(np.uint8)


def weighted_sum(deltas: list[torch.Tensor], weights: list[torch.Tensor], base: torch.Tensor, normalize: bool,
                 lam: float) -> torch.Tensor:
    """Without the vote: base + lambda * sum_i w_i delta_i (/ sum_i w_i when normalizing; a sum within 1e-8
    of 0 counts as 1). Consumes ``deltas`` (scaled in place)."""
    mixed = torch.zeros_like(base)
    for delta, w in zip(deltas, weights):
        mixed.add_(delta.mul_(w))
    return finish(mixed, weight_divisor(weights, normalize), lam, base)


def weight_divisor(weights: list[torch.Tensor], normalize: bool) -> Optional[torch.Tensor]:
    divisor = torch.stack(weights).sum() if normalize else None
    if divisor is not None and divisor.abs() < 1e-8:
        divisor = torch.ones_like(divisor)
    return divisor
