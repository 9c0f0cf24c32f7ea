"""The fold arithmetic: one module's low-rank update added to its base weight, exactly as peft merges it.

Pure functions of tensors. The factors are upcast to float32 (peft autocasts adapter weights to float32 on
load), the delta is computed in float32 in peft's operation order, and the sum is rounded once to the
weight's dtype, so the result is bit for bit what ``merge_and_unload()`` writes on the same CPU
(shared/research/lora.md section 2; 5.8 lists what breaks bit-exactness: ``(B*s)@A`` instead of
``(B@A)*s``, a float64 delta, another rounding).

Module kinds: ``linear`` (nn.Linear, weight (out, in)), ``conv1d`` (transformers' GPT-2 ``Conv1D``,
weight stored transposed as (in, out)), ``embedding`` (weight (V, d)), ``conv`` (nn.Conv1d/2d/3d,
weight (out, in, *k)).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

KINDS = ("linear", "conv1d", "embedding", "conv")

# Row-wise folds of linear weights (``fold_rows``) compute B @ A in blocks of whole multiples of ROW_ALIGN rows
# starting at multiples of ROW_ALIGN, about BLOCK_ELEMENTS elements each (1 MB of float32: the delta, the add
# and the rounding happen while the block is in cache). MKL's sgemm gives every element of such a block the bits
# of the whole product (checked against the whole B @ A on 1B-sized and odd shapes, 1 and 2 threads); blocks of
# 1 or 3 rows, or unaligned narrow ones, take other kernels and differ in the last bit.
ROW_ALIGN = 64
BLOCK_ELEMENTS = 1 << 18


def delta_weight(kind: str, down: torch.Tensor, up: torch.Tensor, scaling: float) -> torch.Tensor:
    """ΔW in the layout of the base weight, float32, scaling included.

    linear: (B @ A) * s, (out, in). conv1d: (B @ A).T * s, (in, out). embedding: A is (r, V) and B is
    (d, r), so (B @ A).T * s is (V, d). conv: A (r, in, *k), B (out, r, 1, ...); a 1x1 kernel is a matmul,
    others convolve A with B.
    """
    # Scaling in place: the same values and memory layout as peft's out-of-place ``* scaling``, one
    # temporary of the weight's size fewer (these are as large as the weight, in float32).
    down, up = down.float(), up.float()
    if kind == "linear":
        return (up @ down).mul_(scaling)
    if kind in ("conv1d", "embedding"):
        return (up @ down).T.mul_(scaling)
    if kind == "conv":
        if tuple(down.shape[2:4]) == (1, 1) and down.dim() == 4:
            return (up.squeeze(3).squeeze(2) @ down.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(3).mul_(scaling)
        conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[down.dim()]
        return conv(down.transpose(0, 1), up).transpose(0, 1).mul_(scaling)   # (out, in, *k)
    raise ValueError(f"unknown module kind {kind!r}")


def fold(kind: str, weight: torch.Tensor, delta: torch.Tensor, *, magnitude: Optional[torch.Tensor] = None,
         unmerged: Optional[torch.Tensor] = None, round_delta_first: bool = False) -> torch.Tensor:
    """``weight`` with ``delta`` folded in, in ``weight``'s dtype. ``delta`` may be overwritten.

    Plain LoRA on linear and conv layers adds the float32 delta and rounds once (peft's in-place
    ``W.data += delta``). Embeddings (and MiCA adapters) round the delta to the weight's dtype first, then
    add: peft's ``W + delta.to(dtype)``, a second rounding in bfloat16 that we reproduce on purpose.

    DoRA (``magnitude`` given) rescales each output row (each embedding dimension; each output channel of
    a conv) of ``weight + delta`` to the learned magnitude m: ``(m / ||unmerged + delta||) * (weight + delta)``.
    The norm is taken on the unmerged base weight, as peft's forward pass does.
    """
    dtype = weight.dtype
    if magnitude is None:
        if round_delta_first or kind == "embedding":
            return weight + delta.to(dtype)
        if torch.promote_types(dtype, delta.dtype) == delta.dtype:
            return delta.add_(weight).to(dtype)   # W + delta in float32 (addition commutes exactly), one rounding
        return (weight + delta).to(dtype)         # a float64 weight: the sum is float64
    base = weight if unmerged is None else unmerged
    magnitude = magnitude.float()
    if kind == "conv":
        # (1, out, 1, ...): the norm over everything but the output channel
        norm = (base + delta).norm(p=2, dim=tuple(range(1, base.dim())), keepdim=True).transpose(1, 0)
        factor = (magnitude / norm).view(-1, *([1] * (base.dim() - 1)))
        return (factor * (weight + delta)).to(dtype)
    # The norm runs along dim 1 of the (out, in) orientation: Conv1D and embedding weights are transposed
    # views here, as in peft, so the reduction sees the same memory layout and gives the same bits.
    transposed = kind in ("conv1d", "embedding")
    oriented = (base.T + delta.T) if transposed else (base + delta)
    norm = torch.linalg.norm(oriented, dim=1).to(oriented.dtype)          # (out,) or (d,)
    factor = (magnitude / norm).view(-1, 1)
    if transposed:
        factor = factor.T                                                  # broadcast over rows of (in, out) / (V, d)
    return (factor * (weight + delta)).to(dtype)


def aligned_rows(start: int, end: int, total: int) -> tuple[int, int]:
    """The rows of B that ``fold_rows`` needs for output rows [start, end) of ``total``: aligned to ROW_ALIGN."""
    return start - start % ROW_ALIGN, min(total, -(-end // ROW_ALIGN) * ROW_ALIGN)


def fold_rows(weight: torch.Tensor, start: int, first: int,
              steps: list[tuple[torch.Tensor, torch.Tensor, float, bool]]) -> torch.Tensor:
    """Rows [start, start + len(weight)) of a linear layer's weight with low-rank updates folded in, one after
    another, in cache-sized blocks; per element exactly ``fold("linear", w, delta_weight("linear", A, B, s))``.

    ``steps``: (A (r, in), rows [first, ...) of B (aligned_rows), scaling, round_delta_first) per update. Each
    update rounds to the weight's dtype before the next, as folding them one at a time does.
    """
    rows, cols = weight.shape[0], math.prod(weight.shape[1:])
    steps = [(down.float(), up.float(), scaling, round_first) for down, up, scaling, round_first in steps]
    out = torch.empty_like(weight)
    if rows == 0:
        return out
    block = max(ROW_ALIGN, BLOCK_ELEMENTS // max(1, cols) // ROW_ALIGN * ROW_ALIGN)   # rows per block
    scratch = torch.empty(block * cols, dtype=torch.float32)
    end = start + rows
    for top in range(first, end, block):                      # absolute rows [top, bottom) of B @ A
        bottom = min(top + block, first + steps[0][1].shape[0])
        lo, hi = max(top, start), min(bottom, end)            # the part of it in this tensor's rows
        current, target = weight[lo - start:hi - start], out[lo - start:hi - start]
        for down, up, scaling, round_first in steps:
            delta = torch.mm(up[top - first:bottom - first], down, out=scratch[: (bottom - top) * cols].view(
                bottom - top, cols))[lo - top:hi - top]      # (hi - lo, in)
            delta.mul_(scaling)
            if round_first:
                torch.add(current, delta.to(weight.dtype), out=target)
            else:
                target.copy_(delta.add_(current))             # W + delta in float32, rounded once
            current = target
    return out


def fold_bias(bias: torch.Tensor, up_bias: torch.Tensor, scaling: float) -> torch.Tensor:
    """``lora_bias``: the bias of lora_B, scaled, added to the base bias (one rounding)."""
    return (bias + up_bias.float() * scaling).to(bias.dtype)


def replace(weight: torch.Tensor, value: torch.Tensor, amount: float) -> torch.Tensor:
    """A full-tensor replacement (modules_to_save, trained biases), applied ``amount`` of the way.

    amount 1 is the stored tensor itself, cast to the weight's dtype (what loading it into the base does);
    another amount moves the base that far towards it: lerp(W, R, amount), rounded once.
    """
    if amount == 1:
        return value.to(weight.dtype)
    return torch.lerp(weight.float(), value.float(), amount).to(weight.dtype)
