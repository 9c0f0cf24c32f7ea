"""NaN and Inf: refused in the inputs, and never made by a merge without saying why.

One NaN in one weight turns every activation it touches into NaN. A checkpoint that already holds one
(training that diverged, a corrupt download) would be merged into an output that looks fine until it is
run, so the merge stops at the first such tensor and names it, unless the user opts in with
``--allow-nonfinite``. A merge of finite inputs that produces NaN or Inf (weights so large that float32
overflows, an output dtype too narrow for the values) is an error too, naming the tensor and the cause.

The fast path costs one sum per tensor: a float sum is finite only if every value is (a NaN or an Inf
makes it NaN or Inf), and summing is several times faster than ``isfinite().all()`` (which materialises a
mask). Only when the sum is not finite (a NaN or Inf somewhere, or an overflowing sum of finite values) are
the values checked one by one, counted and located. Results written in 16 bits also get one ``aminmax``,
to find values the cast would overflow.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch

from ..dtypes import dtype_name
from ..errors import ModelError, StrategyError

ALLOW_HINT = "pass --allow-nonfinite to merge anyway (NaN and Inf then spread into the output)"


def count_nonfinite(tensor: torch.Tensor) -> Optional[tuple[int, int, int]]:
    """None when every value is finite; else (NaN count, Inf count, flat index of the first bad value)."""
    if not tensor.dtype.is_floating_point or not tensor.numel():
        return None
    if tensor.element_size() == 1:   # float8: torch sums it only into a wider dtype, and has no isfinite for it
        if bool(torch.isfinite(tensor.sum(dtype=torch.float32))):
            return None
        tensor = tensor.float()
    elif bool(torch.isfinite(tensor.sum())):
        return None
    flat = tensor.reshape(-1)
    finite = torch.isfinite(flat)
    bad = flat.numel() - int(finite.sum())
    if not bad:   # the sum overflowed, the values are fine
        return None
    nan = int(torch.isnan(flat).sum())
    return nan, bad - nan, int(torch.argmin(finite.to(torch.uint8)))


def describe(counts: tuple[int, int, int]) -> str:
    """'2 NaN and 1 Inf values'."""
    nan, inf, _ = counts
    parts = [f"{nan} NaN" if nan else "", f"{inf} Inf" if inf else ""]
    return " and ".join(p for p in parts if p) + (" value" if nan + inf == 1 else " values")


def first_at(counts: tuple[int, int, int], shape: Sequence[int], offset: int = 0) -> str:
    """'the first at [3, 7]' (``offset``: flat index of this block of rows in the whole tensor)."""
    return f"the first at {list(unravel(counts[2] + offset, tuple(shape)))}"


def check_inputs(job: Any, tensors: Sequence[torch.Tensor], rows: Optional[tuple[int, int]]) -> None:
    """Raise a ModelError naming the first input (tensor and model) that holds NaN or Inf."""
    offset = rows[0] * math.prod(job.shape[1:]) if rows is not None else 0
    for source, tensor in zip(job.sources, tensors):
        counts = count_nonfinite(tensor)
        if counts is not None:
            shape = source.info.shape
            raise ModelError(f"the input already holds {describe(counts)}, {first_at(counts, shape, offset)}",
                             where=f"tensor '{source.name}'", file=source.checkpoint.label,
                             hint="the checkpoint is corrupt or its training diverged: download it again or leave "
                                  f"it out; or {ALLOW_HINT}")


def check_result(job: Any, strategy_name: str, merged: torch.Tensor, written: torch.Tensor,
                 rows: Optional[tuple[int, int]], offset: int = 0) -> None:
    """Raise a StrategyError when finite inputs gave NaN or Inf: in the arithmetic (``merged``, float32), or in
    the cast to the written dtype (``written``). ``offset``: flat index of ``merged`` in the whole tensor, when
    it is a block of it rather than rows."""
    offset = rows[0] * math.prod(job.shape[1:]) if rows is not None else offset
    where = f"tensor '{job.name}'"
    counts = count_nonfinite(merged)
    if counts is None:
        # rounded to the merge dtype, then written in the output dtype: the narrower one can overflow
        narrow = min((job.merge_dtype, written.dtype), key=lambda d: torch.finfo(d).max if d.is_floating_point else 0)
        if not _may_overflow(merged, narrow):
            return
        counts = count_nonfinite(written)
        if counts is None:
            return
        largest = float(merged.abs().max())
        limit = torch.finfo(narrow).max
        raise StrategyError(f"merged values up to {largest:.4g} do not fit {dtype_name(narrow)} (largest "
                            f"{limit:.4g}): {describe(counts)} after the cast, {first_at(counts, job.shape, offset)}",
                            where=where,
                            hint="write a wider dtype (out_dtype: bfloat16 or float32), or use smaller weights")
    params = ", ".join(f"{k}={_value(v)}" for k, v in job.params.items())
    raise StrategyError(f"{strategy_name} made {describe(counts)} from finite inputs, "
                        f"{first_at(counts, job.shape, offset)} ({params})", where=where,
                        hint="the parameters make float32 overflow or divide by zero for this tensor; "
                             "use smaller weights, or check the values set for it")


def _may_overflow(merged: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether casting finite ``merged`` to a narrower float ``dtype`` could make an Inf."""
    if not dtype.is_floating_point or torch.finfo(dtype).max >= torch.finfo(merged.dtype).max or not merged.numel():
        return False
    low, high = torch.aminmax(merged)
    return max(-float(low), float(high)) > torch.finfo(dtype).max


def _value(value: Any) -> str:
    if isinstance(value, tuple):
        return "(" + ", ".join(_value(v) for v in value) + ")"
    if isinstance(value, bool):
        return str(value).lower()
    return f"{value:g}" if isinstance(value, float) else str(value)


def unravel(flat: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    """A flat element index (as chunks count them) -> its position in a tensor of ``shape``."""
    index = []
    for size in reversed(shape):
        index.append(flat % size)
        flat //= size
    return tuple(reversed(index))
