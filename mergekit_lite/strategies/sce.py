"""SCE: Select, Calculate, Erase (Wan et al., "FuseChat: Knowledge Fusion of Chat Models", arXiv 2408.07990;
mergekit's sce).

The selection is a top-k over the whole tensor's per-entry variance, and the weights are whole-tensor means of
squares; everything else is per entry. The variance is one whole float32 vector filled in chunks
(``chunks.collect``), and its top-k a radix select over its bit patterns in chunks, as TIES' (no sort, no
top-k workspace): the same entries as torch's top-k except among equal variances at the cut, which are kept by
position, as TIES keeps equal magnitudes (torch orders them its own way). Each model's squared task vector is one
whole float32 vector for torch's float32 mean, which rounds in its own order. The rest runs in chunks of the raw
inputs. The result has mergekit's bits when the cut has no ties; memory holds the raw inputs, the output, one
float32 vector of the tensor's size and, with ``select_topk`` < 1, a byte per entry.
"""

from __future__ import annotations

import threading

import torch

from ..strategy import Param, Strategy, TensorContext
from .chunks import Chunks, as_rows, collect, whole

WEIGHT_SUM_FLOOR = 1e-6   # the matrix-level weights sum to less: every model gets 1/N instead
DIVISOR_FLOOR = 1e-6      # the per-entry sum of the kept weights is clamped to at least this
BLOCK = 1 << 16           # elements per piece of work: a few (n_models, BLOCK) float32 temporaries per thread
SELECT_CHUNK = 1 << 18    # the top-k's passes over the variance vector: one histogram per chunk
BUCKETS = 1 << 15         # top 16 bits of a non-negative float32 (as int32 >> 16)


def sce_chunks(src: Chunks, ctx: TensorContext, *, select_topk: float, int8_mask: bool) -> None:
    """base + sum_i w_i m_i tau_i / max(sum_i w_i m_i, 1e-6), tau_i = x_i - base.

    Select: with ``select_topk`` < 1, only the entries with the largest variance across the models are kept
    (the top select_topk of the entries with nonzero variance; one mask for every model).
    Calculate: w_i = mean(tau_i^2) / sum_j mean(tau_j^2) over the whole (selected) tensor, or 1/N when that
    sum is below 1e-6. Erase: m_i keeps tau_i's entries whose sign agrees with the sign of sum_j tau_j
    (0 counting as +), as in TIES. ``int8_mask`` changes only the dtype of mergekit's masks, not the result.
    """
    if src.numel == 0:
        return
    keep = _select(src, select_topk) if select_topk < 1 else None     # (numel,) bool, or None: all

    def delta(i: int, lo: int, hi: int) -> torch.Tensor:             # (m,) model i's selected task vector
        values = src.input(i, lo, hi) - src.base(lo, hi)
        return values if keep is None else values.mul_(keep[lo:hi])  # x * 1.0 / x * 0.0, as mergekit's float mask

    def deltas(lo: int, hi: int) -> torch.Tensor:                     # (n_models, m)
        return torch.stack([delta(i, lo, hi) for i in range(src.count)])

    # Calculate: each model's mean squared (selected) task vector entry, by torch over the whole vector
    squares, energy = None, []
    for i in range(src.count):
        squares = collect(src, lambda lo, hi, i=i: delta(i, lo, hi).square_(), BLOCK, out=squares)
        energy.append(as_rows(squares).mean(dim=1)[0])            # as mergekit's row of its stack
    del squares
    weights = _matrix_weights(torch.stack(energy)).view(-1, 1)        # (n_models, 1)

    def output(lo: int, hi: int) -> None:
        block = deltas(lo, hi)
        # Erase: keep entries agreeing with the elected sign (sum >= 0 elects +)
        elected = (block.sum(dim=0) >= 0).to(block.dtype) * 2 - 1    # (m,) +1 / -1
        kept = weights * (block.sign() == elected)                    # (n_models, m); zeros never agree
        mixed = block.mul_(kept).sum(dim=0)
        src.emit(lo, src.base(lo, hi) + mixed / kept.sum(dim=0).clamp(min=DIVISOR_FLOOR))

    src.map(output, BLOCK)


def _select(src: Chunks, fraction: float) -> torch.Tensor:
    """True at the top ``fraction`` of the entries with nonzero variance across the models. (numel,) bool"""
    keep = torch.zeros(src.numel, dtype=torch.bool, device=src.device)
    if fraction <= 0:
        return keep

    def variance(lo: int, hi: int) -> torch.Tensor:                   # population variance per entry, >= 0
        block = torch.stack([src.input(i, lo, hi) for i in range(src.count)]).sub_(src.base(lo, hi))
        return torch.var(block, dim=0, unbiased=False).abs_()         # NaN with its sign bit cleared

    variances = collect(src, variance, BLOCK)
    k = int(torch.count_nonzero(variances) * fraction)               # float32 product, as mergekit rounds it
    if k > 0:
        _keep_largest(src, variances.view(torch.int32), k, keep)
    return keep


def _keep_largest(src: Chunks, bits: torch.Tensor, k: int, keep: torch.Tensor) -> None:
    """Set ``keep`` at the k largest of non-negative float32 values, read as their int32 bit patterns (which
    order alike, NaN above inf): a radix select in chunks, as TIES' (task_chunks._cuts). A histogram of the top
    16 bits finds the bucket holding rank k; that bucket's entries give the k-th largest, ``cut``. Entries above
    it are kept, and of those equal to it the first by position, as a stable sort ranks them."""
    n = bits.numel()
    counts = torch.zeros(BUCKETS, dtype=torch.int64)
    lock = threading.Lock()

    def histogram(lo: int, hi: int) -> None:
        found = torch.bincount((bits[lo:hi] >> 16).cpu(), minlength=BUCKETS)
        with lock:                                                    # integer counts: any order, same totals
            counts.add_(found)

    src.map(histogram, SELECT_CHUNK)
    below = counts.cumsum_(0)                                         # entries in buckets <= b
    rank = n - k + 1                                                  # the k-th largest is this smallest
    bucket = int(torch.searchsorted(below, rank))
    first = int(below[bucket - 1]) if bucket else 0                   # entries in lower buckets

    def gather(lo: int, hi: int) -> torch.Tensor:                     # positions in the bucket, ascending
        return torch.nonzero((bits[lo:hi] >> 16) == bucket).view(-1).add_(lo)

    positions = torch.cat(src.map(gather, SELECT_CHUNK))
    values = bits[positions]
    cut = torch.kthvalue(values.cpu(), rank - first).values.to(bits.device)
    above = n - int(below[bucket]) + int((values > cut).sum())        # ranked before every entry equal to cut

    def mark(lo: int, hi: int) -> None:
        torch.gt(bits[lo:hi], cut, out=keep[lo:hi])

    src.map(mark, SELECT_CHUNK)
    keep[positions[values == cut][:k - above]] = True


def _matrix_weights(energy: torch.Tensor) -> torch.Tensor:
    """Each model's mean squared task vector entry, as a share of their sum. (n_models,)"""
    total = torch.sum(energy).item()
    if abs(total) < WEIGHT_SUM_FLOOR:
        return torch.ones_like(energy) / energy.shape[0]
    return energy / total


STRATEGY = Strategy(
    name="sce",
    fn=whole(sce_chunks),
    chunked=sce_chunks,
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
