"""One output tensor (or a block of its rows) from its raw inputs: convert, run the strategy, cast.

Three paths with the same arithmetic per element: whole tensors on the compute device (``merge_prepared``),
element-wise strategies in cache-sized blocks on the CPU (``merge_blocks``), and whole-tensor strategies
through their chunked body on the CPU (``merge_chunks``). The loop (loop.py) picks the path per piece;
validation's recomputation calls the same functions, so what it recomputes is what was merged.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

from ..dtypes import compute_dtype
from ..errors import ModelError, StrategyError
from ..plan.jobs import TensorJob
from ..plan.planner import MergePlan
from ..strategies.chunks import Chunks, Spread, in_order
from ..strategy import Strategy, TensorContext
from .nonfinite import check_inputs, check_result, count_nonfinite

# Cache-sized blocks of element-wise arithmetic on the CPU (1 MB per float32 input). Measured for 3-input
# linear on 128M elements: 12.6 ns per element converting whole row blocks to float32 first, 1.8 ns with
# 256K-element blocks; 16K blocks pay Python overhead (5.0 ns), 4M blocks fall out of cache (8.2 ns).
BLOCK_ELEMENTS = 1 << 18


Rows = Optional[tuple[int, int]]


def read_sources(job: TensorJob, rows: Rows = None) -> list[torch.Tensor]:
    """The raw input tensors of one job (or one block of its rows), in ``job.sources`` order, as stored.

    The merge loop and validation's recomputation both read through here, so a change to what a source
    returns (a LoRA fold) is recomputed exactly as it was merged."""
    return [source.read(rows) for source in job.sources]


def fetch_sources(job: TensorJob, rows: Rows = None) -> list[Any]:
    """What ``read_sources`` returns, except that a source transform that computes (a LoRA fold) may return a
    deferred value instead: its inputs read now (the reader thread), computed by ``resolve_sources`` later."""
    return [source.fetch(rows) for source in job.sources]


def resolve_sources(fetched: list[Any]) -> list[torch.Tensor]:
    """``fetch_sources``' values as tensors (deferred ones computed here, on the calling thread)."""
    return [item if isinstance(item, torch.Tensor) else item.resolve() for item in fetched]


def merge_tensor(plan: MergePlan, job: TensorJob, raw: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """One whole output tensor from its raw inputs (in ``job.sources`` order), on ``device``, back on the CPU."""
    return merge_prepared(plan, job, prepare_inputs(job, raw, device, check=not plan.allow_nonfinite))


def prepare_inputs(job: TensorJob, raw: list[torch.Tensor], device: torch.device, rows: Rows = None, *,
                   check: bool = True) -> list[torch.Tensor]:
    """Move raw inputs to ``device`` and convert them to the compute dtype (float32), one at a time so each
    raw buffer is dropped as soon as it is converted. Non-float tensors (copied, not merged) pass through.
    ``check``: refuse an input holding NaN or Inf (a ModelError naming it; --allow-nonfinite turns it off)."""
    if job.copy:
        return raw
    tensors = []
    while raw:
        tensor = raw.pop(0).to(device)
        if job.load_dtype is not None:
            tensor = tensor.to(job.load_dtype)   # mergekit rounds inputs to the spec dtype first
        tensors.append(tensor.to(compute_dtype(tensor.dtype)))
        del tensor
    if check:
        check_inputs(job, tensors, rows)
    return tensors


def merge_prepared(plan: MergePlan, job: TensorJob, tensors: list[torch.Tensor], rows: Rows = None) -> torch.Tensor:
    """Run the strategy on prepared inputs (whole tensors, or the same row block of each); cast; to the CPU."""
    if job.copy:
        first = tensors[-1] if job.base is not None else tensors[0]
        for source, tensor in zip(job.sources, tensors):
            if not torch.equal(tensor, first):
                raise ModelError("non-float tensor differs between models (cannot be averaged)",
                                 where=f"tensor '{job.name}'", file=source.checkpoint.label,
                                 hint="the models disagree on a buffer such as position_ids; fix one checkpoint")
        return first
    shape = job.shape if rows is None else (rows[1] - rows[0], *job.shape[1:])
    result = _run_strategy(plan, job, tensors, shape)
    written = result.to(job.merge_dtype).to(job.dtype)
    if not plan.allow_nonfinite:
        check_result(job, job.strategy.name, result, written, rows)
    return written.cpu()


def _run_strategy(plan: MergePlan, job: TensorJob, tensors: list[torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    """The strategy on prepared inputs (the base last, when the job has one); the result's shape checked."""
    base = tensors.pop() if job.base is not None else None
    ctx = TensorContext(job.name, job.layer, job.t, plan.seed)
    strategy = job.strategy
    try:
        result = strategy(tensors, base, ctx, **job.params)
    except (RuntimeError, ValueError) as exc:
        raise _failed(strategy, job, exc) from exc
    if tuple(result.shape) != tuple(shape):
        raise StrategyError(f"{strategy.name} returned shape {list(result.shape)}, planned {list(shape)}",
                            where=f"tensor '{job.name}'")
    return result


def _failed(strategy: Strategy, job: TensorJob, exc: Exception) -> StrategyError:
    return StrategyError(f"{strategy.name} failed: {exc}", where=f"tensor '{job.name}'",
                         hint="this is likely a bug in the strategy; re-run with --debug and report it")


def merge_blocks(plan: MergePlan, job: TensorJob, raw: list[torch.Tensor], shape: tuple[int, ...],
                 rows: Rows = None) -> torch.Tensor:
    """An element-wise merge of raw (stored-dtype) CPU inputs, in cache-sized blocks; the result in job.dtype.

    Per block: each input is rounded to the load dtype when set and converted to float32 into a reused
    scratch buffer, the strategy runs on 1-D views, and its result is cast into the output. The operations
    on each element are those of ``merge_prepared``, so the bytes are the same.

    NaN and Inf: the written result is checked once at the end (a NaN or Inf made by the arithmetic survives
    the cast, and so does a value the cast overflows); the inputs before, unless the strategy propagates NaN
    and Inf (then a bad input shows in the result). Only when the result is not finite are the inputs looked
    at for one to blame, and then the blocks merged again, each one checked, to say where and why (a rare,
    slow path: the common one costs one sum per piece, not one per block and input).
    """
    check = not plan.allow_nonfinite
    strategy = job.strategy
    if check and not strategy.propagates_nonfinite:
        check_inputs(job, raw, rows)
    if _copies_input(job, raw) and not (check and count_nonfinite(raw[0]) is not None):
        return raw[0]
    out = torch.empty(shape, dtype=job.dtype)
    flat_out = out.view(-1)                                    # (numel,)
    offset = rows[0] * math.prod(job.shape[1:]) if rows is not None else 0
    flats = [tensor.reshape(-1) for tensor in raw]             # (numel,) each, stored dtype
    scratch = [torch.empty(min(BLOCK_ELEMENTS, flat_out.numel()), dtype=compute_dtype(job.load_dtype or t.dtype))
               for t in flats]
    _merge_block_range(plan, job, flats, scratch, flat_out, None)
    if check and count_nonfinite(out) is not None:
        check_inputs(job, raw, rows)                                      # an input to blame, first
        _merge_block_range(plan, job, flats, scratch, flat_out, offset)   # else raises at the first bad block
    return out


def _copies_input(job: TensorJob, raw: list[torch.Tensor]) -> bool:
    """An unscaled passthrough of an input stored in the written dtype (a fold, a layer slice): the result is
    the input itself, bit for bit, without the pass through float32 and back."""
    return (job.strategy.name == "passthrough" and len(raw) == 1 and raw[0].is_contiguous()
            and all(factor is None for factor in job.params.get("scale", (None,)))
            and raw[0].dtype == job.dtype == job.merge_dtype and job.load_dtype in (None, job.dtype))


def _merge_block_range(plan: MergePlan, job: TensorJob, flats: list[torch.Tensor], scratch: list[torch.Tensor],
                       flat_out: torch.Tensor, check_offset: Optional[int]) -> None:
    """``merge_blocks``' loop; with ``check_offset`` (the flat index of ``flat_out`` in the whole tensor),
    each block's result is checked for NaN and Inf before and after its cast."""
    numel = flat_out.numel()
    for start in range(0, numel, BLOCK_ELEMENTS):
        end = min(start + BLOCK_ELEMENTS, numel)
        inputs = [_to_compute(buffer[: end - start], flat[start:end], job.load_dtype)
                  for buffer, flat in zip(scratch, flats)]
        result = _run_strategy(plan, job, inputs, (end - start,))
        if job.merge_dtype != job.dtype:     # rounded twice, as merge_prepared does (e.g. bf16, then f16)
            result = result.to(job.merge_dtype)
        flat_out[start:end].copy_(result)    # the (last) cast, in the same pass as the copy
        if check_offset is not None:
            check_result(job, job.strategy.name, result, flat_out[start:end], None,
                         offset=check_offset + start)
        del inputs, result


def merge_chunks(plan: MergePlan, job: TensorJob, raw: list[torch.Tensor], spread: Spread = in_order) -> torch.Tensor:
    """A whole-tensor merge by the strategy's chunked body, from raw (stored-dtype) CPU inputs; the result
    in job.dtype. Each chunk of each input is rounded to the load dtype when set and converted to float32
    as the body reads it; the body's passes run on the merging threads (``spread``).

    NaN and Inf as in ``merge_blocks``: the inputs first unless the strategy propagates them, the written
    result once. When the result is not finite, an input to blame is looked for, and then the tensor is
    merged again on whole float32 tensors, checked, to say where and why (the rare, slow path).
    """
    strategy = job.strategy
    check = not plan.allow_nonfinite
    if check and not strategy.propagates_nonfinite:
        check_inputs(job, raw, None)
    out = torch.empty(job.shape, dtype=job.dtype)
    flat_out = out.view(-1)                                    # (numel,)

    def emit(start: int, values: torch.Tensor) -> None:
        if job.merge_dtype != job.dtype:     # rounded twice, as merge_prepared does (e.g. bf16, then f16)
            values = values.to(job.merge_dtype)
        flat_out[start:start + values.numel()].copy_(values)   # the (last) cast, in the same pass as the copy

    def convert(chunk: torch.Tensor) -> torch.Tensor:
        return _to_compute(torch.empty(chunk.shape, dtype=compute_dtype(job.load_dtype or chunk.dtype)),
                           chunk, job.load_dtype)

    base = raw[-1] if job.base is not None else None
    inputs = raw[:-1] if job.base is not None else raw
    body = strategy.chunks(job.params)
    assert body is not None
    ctx = TensorContext(job.name, job.layer, job.t, plan.seed)
    try:
        body(Chunks(inputs, base, emit, convert, spread), ctx, **job.params)
    except (RuntimeError, ValueError) as exc:
        raise _failed(strategy, job, exc) from exc
    if check and count_nonfinite(out) is not None:
        check_inputs(job, raw, None)                                   # an input to blame, first
        return merge_prepared(plan, job, prepare_inputs(job, list(raw), torch.device("cpu"), check=False))
    return out


def _to_compute(buffer: torch.Tensor, block: torch.Tensor, load_dtype: Optional[torch.dtype]) -> torch.Tensor:
    if load_dtype is not None and load_dtype != block.dtype:
        block = block.to(load_dtype)          # mergekit rounds inputs to the spec dtype first
    return buffer.copy_(block)
