"""Arcee Fusion: take the other model's value only where it matters, that is where its change from the base,
weighted by how much the row's softmax distribution moved (KL divergence), is an upper outlier (mergekit's
arcee_fusion, https://arcee.ai; Tukey's fence median + 1.5 IQR).
"""

from __future__ import annotations

import torch

from ..strategy import Strategy, TensorContext
from .chunks import Chunks, whole

SOFTMAX_EPS = 1e-8        # added to both softmax distributions before the KL divergence
SAMPLE = 1_000_000        # more importance values than this: the quantiles come from a sample of this size
QUANTILES = (0.25, 0.5, 0.75)
FENCE = 1.5               # threshold = median + FENCE * (q3 - q1)
CHUNK = 1 << 20           # entries per chunk (whole rows: a chunk holds at least one row)
BLOCK = 1 << 16           # element-wise work in cache-sized blocks of whole rows


def arcee_fusion_chunks(src: Chunks, ctx: TensorContext) -> None:
    """out = base + (x - base) * [importance >= median + 1.5 IQR], importance = |x - base| * KL(p || q) per row,
    p = softmax(x) + 1e-8 and q = softmax(base) + 1e-8 along the last dimension.

    Two passes over chunks of whole rows: each row's KL divergence and the importance values (all of them, or
    the sampled ones), then the output. The same float32 operations per row as mergekit, so the same bits;
    above 1M entries the quantiles come from a sample drawn from the tensor's seeded generator (mergekit
    draws from torch's global generator), so there the threshold is not mergekit's.
    """
    if src.numel == 0:
        return
    cols = src.shape[-1] if src.shape else 1
    step = cols * max(1, CHUNK // cols)
    sample = None
    if src.numel > SAMPLE:   # with replacement, as mergekit; sorted so each chunk finds its own by bisection
        draw = torch.randint(src.numel, (SAMPLE,), generator=ctx.generator())
        sample = torch.sort(draw).values

    def rows(start: int, end: int) -> list[tuple[int, int, torch.Tensor, torch.Tensor]]:
        """Blocks of whole rows: (start, end, base, x), the last two (rows, cols)."""
        per = cols * max(1, BLOCK // cols)
        return [(lo, min(lo + per, end), src.base(lo, min(lo + per, end)).view(-1, cols),
                 src.input(0, lo, min(lo + per, end)).view(-1, cols)) for lo in range(start, end, per)]

    def divergence(start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The chunk's KL per row (rows, 1) and its importance values (all, or those sampled)."""
        kls, values = [], []
        for lo, hi, base, x in rows(start, end):
            kl = _kl_rows(x, base)                                           # (rows, 1)
            kls.append(kl)
            if sample is None:
                values.append(((x - base).abs() * kl).view(-1))
            else:
                a, b = (int(i) for i in torch.searchsorted(sample, torch.tensor([lo, hi])))
                at = sample[a:b].to(x.device) - lo                           # positions in this block
                values.append((x - base).abs().view(-1)[at] * kl.view(-1)[at // cols])
        return torch.cat(kls), torch.cat(values)

    parts = src.map(divergence, step)
    kl_rows = torch.cat([kl for kl, _ in parts])                             # (all rows, 1)
    threshold = _fence(torch.cat([values for _, values in parts]))           # ()

    def output(start: int, end: int) -> None:
        for lo, hi, base, x in rows(start, end):
            kl = kl_rows[lo // cols:hi // cols]
            mask = ((x - base).abs() * kl >= threshold).float()
            src.emit(lo, (base + (x - base) * mask).view(-1))

    src.map(output, step)


def _kl_rows(x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """KL(softmax(x) || softmax(base)) of each row, both smoothed by 1e-8. (rows, 1)"""
    p = torch.softmax(x, dim=-1) + SOFTMAX_EPS
    q = torch.softmax(base, dim=-1) + SOFTMAX_EPS
    return torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)


def _fence(values: torch.Tensor) -> torch.Tensor:
    """median + 1.5 (q3 - q1), the quantiles read from the sorted values at index int(q (n - 1)). ()"""
    ordered = torch.sort(values).values
    at = (torch.tensor(QUANTILES) * (ordered.numel() - 1)).long().to(ordered.device)
    q1, median, q3 = ordered[at]
    return median + FENCE * (q3 - q1)


STRATEGY = Strategy(
    name="arcee_fusion",
    fn=whole(arcee_fusion_chunks),
    chunked=arcee_fusion_chunks,
    title="Arcee Fusion",
    summary="Takes the other model's value only where its change, weighted by the row's KL divergence, is an "
            "outlier above median + 1.5 IQR; elsewhere keeps the base.",
    paper="https://arcee.ai",
    base="required",
    min_inputs=1,
    max_inputs=1,
    details="importance = |x - base| * KL(softmax(x) || softmax(base)) per row (last dimension); "
            "out = x where importance >= median + 1.5 (q3 - q1) of the tensor's importance values, else the base. "
            "Tensors above 1M entries take the quantiles from 1M entries sampled with the seeded generator.",
    params=(),
)
