"""The merge loop: read the inputs of one output tensor, merge on the device, cast, write. Repeat.

One module owns the loop, the device and the dtypes. Three threads work at once (pipeline.py): a reader
loads the next pieces within a byte budget, the main thread merges, a writer puts finished pieces into
their shards. Element-wise strategies (linear, task arithmetic) get large tensors in row blocks of at most
PIECE_ELEMENTS (the unit of reading and writing), and on the CPU each row block is merged in cache-sized
blocks of BLOCK_ELEMENTS: converting the inputs to float32, the strategy's passes and the cast back all
happen while the block is in cache, so memory traffic is about one read of the inputs and one write of the
result. Whole-tensor strategies with a chunked body (SLERP, DARE, TIES; chunks.py) get the raw inputs of
the whole tensor and spread each of their passes over the merging threads. A shard is an independent unit
of work (``write_shard``): the local executor runs them in one pipeline, Ray runs them on other nodes
(executors/).
"""

from __future__ import annotations

import gc
import math
import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import torch

from .chunks import Chunks, Spread, in_order
from .dtypes import compute_dtype, itemsize
from .errors import ModelError, StrategyError
from .memory import reuse_freed_memory
from .nonfinite import check_inputs, check_result, count_nonfinite
from .pipeline import Reader, WriteBehind
from .plan import MergePlan, TensorJob
from .strategy import Strategy, TensorContext
from .writer import Entry, ShardPlan, ShardRecord, ShardWriter, file_order, plan_output

# Row blocks of element-wise merges hold at most this many elements (32 MB per float32 input): measured on
# 3 x 1B linear, peak RSS fell from 1.8 GiB (whole 32k x 2k embeddings) to 0.7 GiB at the same speed.
PIECE_ELEMENTS = 1 << 23
# Cache-sized blocks of element-wise arithmetic on the CPU (1 MB per float32 input). Measured for 3-input
# linear on 128M elements: 12.6 ns per element converting whole row blocks to float32 first, 1.8 ns with
# 256K-element blocks; 16K blocks pay Python overhead (5.0 ns), 4M blocks fall out of cache (8.2 ns).
BLOCK_ELEMENTS = 1 << 18
# Threads merging row blocks at once (the reader and the writer threads come on top, mostly waiting on I/O).
MAX_MERGE_THREADS = 4
Rows = Optional[tuple[int, int]]


@dataclass(frozen=True)
class WrittenShards:
    """What the loop wrote: file names, which tensor is where, and the tensor bytes."""

    files: list[str]
    weight_map: dict[str, str]
    total_size: int
    seconds: float


@dataclass(frozen=True, eq=False)
class _Piece:
    """A unit of work: a whole output tensor, or a block of its rows (element-wise strategies only)."""

    job: TensorJob
    rows: Rows
    blocked: bool = False    # merged in cache-sized blocks from raw inputs (element-wise, on the CPU)
    chunked: bool = False    # a whole tensor merged by the strategy's chunked body from raw inputs (on the CPU)

    @property
    def raw(self) -> bool:
        """Its inputs are loaded as stored (converted to float32 by the merge, a block at a time)."""
        return self.blocked or self.chunked

    @property
    def numel(self) -> int:
        return self.job_numel if self.rows is None else (self.rows[1] - self.rows[0]) * math.prod(self.job.shape[1:])

    @property
    def job_numel(self) -> int:
        return math.prod(self.job.shape)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.job.shape if self.rows is None else (self.rows[1] - self.rows[0], *self.job.shape[1:])


def output_layout(plan: MergePlan, max_shard_size: int) -> list[ShardPlan]:
    """The output files and the tensors in each, in plan order: known before anything is computed."""
    return plan_output([Entry(j.name, j.dtype, j.shape) for j in plan.jobs], max_shard_size)


def written_shards(plan: MergePlan, layout: Sequence[ShardPlan], seconds: float = 0.0) -> WrittenShards:
    return WrittenShards([s.file for s in layout], {e.name: s.file for s in layout for e in s.entries},
                         sum(j.nbytes for j in plan.jobs), seconds)


def write_tensors(plan: MergePlan, folder: str, *, max_shard_size: int, device: torch.device,
                  progress: Optional[Callable[[int], None]] = None) -> WrittenShards:
    """Compute every planned tensor into shards in ``folder``."""
    started = time.perf_counter()
    layout = output_layout(plan, max_shard_size)
    write_shards(plan, layout, folder, device, progress)
    return written_shards(plan, layout, time.perf_counter() - started)


def write_shard(plan: MergePlan, shard: ShardPlan, path: str, device: torch.device, threads: int = 1) -> ShardRecord:
    """Compute one output shard into the file ``path``: the unit of work of every executor (one merging
    thread by default: a Ray task has the one CPU Ray gave it)."""
    records: list[ShardRecord] = []
    write_shards(plan, [shard], os.path.dirname(path) or ".", device, on_shard=records.append,
                 paths={shard.file: path}, threads=threads)
    return records[0]


def merge_threads() -> int:
    """Threads that merge row blocks at once: one per core this process may use, at most MAX_MERGE_THREADS."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(MAX_MERGE_THREADS, cores))


def write_shards(plan: MergePlan, shards: Sequence[ShardPlan], folder: str, device: torch.device,
                 progress: Optional[Callable[[int], None]] = None,
                 on_shard: Optional[Callable[[ShardRecord], None]] = None,
                 paths: Optional[dict[str, str]] = None, threads: Optional[int] = None) -> None:
    """Compute ``shards`` into ``folder`` in one pipeline (reading runs ahead across shard boundaries).

    Each shard's tensors are computed in the order they are stored, so its CRC-32 is computed on the way;
    ``on_shard`` gets each shard's record once the shard is complete and flushed (from the writer thread).
    Row blocks of element-wise merges (small, independent) are merged by up to ``threads`` threads at once
    (default: ``merge_threads()``); whole tensors one at a time, so memory holds one whole-tensor merge.
    """
    jobs = {job.name: job for job in plan.jobs}
    blocked = device.type == "cpu"
    order = [(shard, jobs[e.name]) for shard in shards for e in file_order(shard.entries)]
    pieces = [(shard, p) for shard, job in order for p in split(job, job.strategy or plan.strategy, blocked)]
    threads = merge_threads() if threads is None else threads
    writers: dict[str, ShardWriter] = {}

    def hand_over(shard: ShardPlan, piece: _Piece, result: torch.Tensor) -> None:
        """To the writer thread, in file order."""
        if shard.file not in writers:
            path = (paths or {}).get(shard.file) or os.path.join(folder, shard.file)
            writers[shard.file] = ShardWriter(path, shard.entries)
        behind.put(writers[shard.file], piece.job.name, result, piece.rows)
        if progress is not None:
            progress(piece.numel * itemsize(piece.job.dtype))

    with _merge_session(device), ThreadPoolExecutor(threads, "mergekit-lite-merge", _one_torch_thread) as pool:
        # chunked merges spread each pass over the pool (then idle: whole tensors wait for the row blocks)
        spread = (lambda fn, items: list(pool.map(fn, items))) if threads > 1 else in_order
        reader = Reader([p for _, p in pieces], lambda p: _load(p, device, not plan.allow_nonfinite),
                        lambda p: _loaded_bytes(p, device))
        behind = WriteBehind(on_shard)
        running: deque[tuple[ShardPlan, _Piece, Future]] = deque()   # merging in the pool, in file order
        try:
            for (shard, piece), (_, loaded) in zip(pieces, reader):
                parallel = piece.blocked and threads > 1
                while running and (len(running) >= threads or not parallel):
                    hand_over(*_finished(running))
                if parallel:
                    running.append((shard, piece, pool.submit(_compute, plan, piece, loaded, device)))
                else:
                    hand_over(shard, piece, _compute(plan, piece, loaded, device, spread))
                del loaded
            while running:
                hand_over(*_finished(running))
            behind.finish()
        except BaseException:
            for _, _, future in running:
                future.cancel()
            behind.abort()
            for writer in writers.values():   # also those not yet handed to the writer thread
                writer.abort()
            raise
        finally:
            reader.stop()


def _finished(running: deque) -> tuple[ShardPlan, _Piece, torch.Tensor]:
    """The oldest pool merge, done (its error is raised; the caller then cancels those queued after it)."""
    shard, piece, future = running.popleft()
    return shard, piece, future.result()


def _one_torch_thread() -> None:
    """Each merging thread runs torch ops on itself only (torch's intra-op thread count is per thread)."""
    torch.set_num_threads(1)


@contextmanager
def _merge_session(device: torch.device) -> Iterator[None]:
    """For the length of a merge: freed memory stays in the heap (memory.py), no cyclic garbage collection
    (2-4% of a 1B merge was the collector walking torch's objects; the loop makes no cycles), and on the
    CPU one torch thread, because the other core reads and writes (intra-op threads on a busy 2-core box
    made block arithmetic 4-10x slower, waiting at each op's barrier)."""
    threads = torch.get_num_threads()
    collecting = gc.isenabled()
    gc.disable()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        with reuse_freed_memory():
            yield
    finally:
        torch.set_num_threads(threads)
        if collecting:
            gc.enable()


def split(job: TensorJob, strategy: Strategy, blocked: bool = False) -> list[_Piece]:
    """Row blocks of at most PIECE_ELEMENTS elements for element-wise merges; else the whole tensor.

    ``blocked`` (on the CPU): element-wise pieces are merged in cache-sized blocks from their raw inputs, and
    whole tensors by the strategy's chunked body when it has one for this tensor's parameters (float32
    arithmetic only: TIES' radix select reads float32 bits; float64 inputs take whole tensors).
    """
    numel = math.prod(job.shape)
    elementwise = strategy.elementwise
    chunked = (blocked and not job.copy and not elementwise and strategy.chunks(job.params) is not None
               and all(compute_dtype(job.load_dtype or s.info.dtype) == torch.float32 for s in job.sources))
    blocked = blocked and elementwise and not job.copy
    if not elementwise or job.copy or len(job.shape) < 2 or numel <= PIECE_ELEMENTS:
        return [_Piece(job, None, blocked, chunked)]
    step = max(1, PIECE_ELEMENTS // math.prod(job.shape[1:]))
    return [_Piece(job, (start, min(start + step, job.shape[0])), blocked) for start in range(0, job.shape[0], step)]


def read_sources(job: TensorJob, rows: Rows = None) -> list[torch.Tensor]:
    """The raw input tensors of one job (or one block of its rows), in ``job.sources`` order, as stored.

    The merge loop and validation's recomputation both read through here, so a change to what a source
    returns (a LoRA fold) is recomputed exactly as it was merged."""
    return [source.checkpoint.read(source.name, rows) for source in job.sources]


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
        check_result(job, (job.strategy or plan.strategy).name, result, written, rows)
    return written.cpu()


def _run_strategy(plan: MergePlan, job: TensorJob, tensors: list[torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    """The strategy on prepared inputs (the base last, when the job has one); the result's shape checked."""
    base = tensors.pop() if job.base is not None else None
    ctx = TensorContext(job.name, job.layer, job.t, plan.seed)
    strategy = job.strategy or plan.strategy
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
    strategy = job.strategy or plan.strategy
    if check and not strategy.propagates_nonfinite:
        check_inputs(job, raw, rows)
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
            check_result(job, (job.strategy or plan.strategy).name, result, flat_out[start:end], None,
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
    strategy = job.strategy or plan.strategy
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


def _compute(plan: MergePlan, piece: _Piece, loaded: list[torch.Tensor], device: torch.device,
             spread: Spread = in_order) -> torch.Tensor:
    """One piece's output, on the CPU in the written dtype."""
    if piece.blocked:
        return merge_blocks(plan, piece.job, loaded, piece.shape, piece.rows)
    if piece.chunked:
        return merge_chunks(plan, piece.job, loaded, spread)
    prepared = loaded if device.type == "cpu" else prepare_inputs(piece.job, loaded, device, piece.rows,
                                                                  check=not plan.allow_nonfinite)
    return merge_prepared(plan, piece.job, prepared, piece.rows)


def _load(piece: _Piece, device: torch.device, check: bool) -> list[torch.Tensor]:
    """A piece's inputs as the merging thread wants them: raw for blocked merges (checked there) and off-CPU
    devices (moved and converted there), converted to float32 and checked for NaN and Inf (``check``) here
    otherwise, in the reader thread."""
    job = piece.job
    raw = read_sources(job, piece.rows)
    return raw if piece.raw or device.type != "cpu" else prepare_inputs(job, raw, device, piece.rows,
                                                                            check=check)


def _loaded_bytes(piece: _Piece, device: torch.device) -> int:
    """Bytes a piece's inputs occupy once loaded (``_load``): raw, or converted to the compute dtype."""
    job = piece.job
    converted = not piece.raw and not job.copy and device.type == "cpu"
    total = 0
    for source in job.sources:
        dtype = compute_dtype(job.load_dtype or source.info.dtype) if converted else source.info.dtype
        total += piece.numel * itemsize(dtype)
    return total
