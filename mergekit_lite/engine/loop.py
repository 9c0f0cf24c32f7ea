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
(executors.py, ray.py).
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import math
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import torch

from ..dtypes import compute_dtype, itemsize
from ..output.journal import InputChecksums
from ..output.writer import ShardRecord, ShardWriter
from ..plan.jobs import TensorJob
from ..plan.planner import MergePlan
from ..plan.shards import ShardPlan, file_order
from ..strategies.chunks import Spread, in_order
from ..strategy import Strategy
from .compute import (
    Rows,
    fetch_sources,
    merge_blocks,
    merge_chunks,
    merge_prepared,
    prepare_inputs,
    read_sources,
    resolve_sources,
)
from .memory import release_free_heap, reuse_freed_memory
from .pipeline import Reader, WriteBehind

# Row blocks of element-wise merges hold at most this many elements (32 MB per float32 input): measured on
# 3 x 1B linear, peak RSS fell from 1.8 GiB (whole 32k x 2k embeddings) to 0.7 GiB at the same speed.
PIECE_ELEMENTS = 1 << 23
# Threads merging row blocks at once (the reader and the writer threads come on top, mostly waiting on I/O).
MAX_MERGE_THREADS = 4


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
    ``on_shard`` gets each shard's record once the shard is complete and flushed (from the writer thread), with
    the CRC-32 of the input bytes read for it (so that a resumed run can tell an input that changed).
    Row blocks of element-wise merges (small, independent) are merged by up to ``threads`` threads at once
    (default: ``merge_threads()``); whole tensors one at a time, so memory holds one whole-tensor merge.
    """
    jobs = {job.name: job for job in plan.jobs}
    blocked = device.type == "cpu"
    order = [(shard, jobs[e.name]) for shard in shards for e in file_order(shard.entries)]
    pieces = [(shard, p) for shard, job in order for p in split(job, job.strategy, blocked)]
    threads = merge_threads() if threads is None else threads
    writers: dict[str, ShardWriter] = {}
    checksums, finished = _with_inputs(on_shard, shards, paths)

    def hand_over(shard: ShardPlan, piece: _Piece, result: torch.Tensor, computed: list) -> None:
        """To the writer thread, in file order (with the checksums of inputs computed by the merging thread)."""
        written = None if checksums is None else _add_computed(checksums, piece.job, result, computed)
        if shard.file not in writers:
            path = (paths or {}).get(shard.file) or os.path.join(folder, shard.file)
            writers[shard.file] = ShardWriter(path, shard.entries)
        behind.put(writers[shard.file], piece.job.name, result, piece.rows, written)
        if progress is not None:
            progress(piece.numel * itemsize(piece.job.dtype))

    with _merge_session(device), ThreadPoolExecutor(threads, "mergekit-lite-merge", _one_torch_thread) as pool:
        # chunked merges spread each pass over the pool (then idle: whole tensors wait for the row blocks)
        spread = _pool_spread(pool) if threads > 1 else in_order
        reader = Reader([p for _, p in pieces], lambda p: _load(p, device, not plan.allow_nonfinite, checksums),
                        lambda p: _loaded_bytes(p, device), _will_read)
        behind = WriteBehind(finished)
        running: deque[tuple[ShardPlan, _Piece, Future]] = deque()   # merging in the pool, in file order
        try:
            for (shard, piece), (_, loaded) in zip(pieces, reader):
                parallel = piece.blocked and threads > 1
                while running and (len(running) >= threads or not parallel):
                    hand_over(*_finished(running))
                if parallel:
                    running.append((shard, piece, pool.submit(_compute, plan, piece, loaded, device)))
                else:
                    hand_over(shard, piece, *_compute(plan, piece, loaded, device, spread))
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


def _with_inputs(on_shard: Optional[Callable[[ShardRecord], None]], shards: Sequence[ShardPlan],
                 paths: Optional[dict[str, str]]) -> tuple[Optional[InputChecksums],
                                                          Optional[Callable[[ShardRecord], None]]]:
    """``on_shard`` given each shard's record with the CRC-32 of the input bytes read for it, and the checksums
    the reader adds those bytes to (None, None without ``on_shard``: nobody records them)."""
    if on_shard is None:
        return None, None
    checksums = InputChecksums()
    by_file = {os.path.basename((paths or {}).get(s.file) or s.file): s for s in shards}
    return checksums, lambda record: on_shard(dataclasses.replace(record, inputs=checksums.shard(by_file[record.file])))


def _add_computed(checksums: InputChecksums, job: TensorJob, result: torch.Tensor,
                  computed: list) -> Optional[Callable[[int, int], None]]:
    """Add the checksums of inputs a merging thread computed (LoRA folds) for one piece. An input written as it
    is (a fold passed through in its own dtype) is left to the writer, which computes the CRC-32 of the bytes
    it writes anyway: the callback for it (the same for every piece of a job, so its CRCs chain in order)."""
    others = [None if t is result else t for t in computed]
    if any(t is not None for t in others):
        checksums.add(job, others)
    copied = [i for i, t in enumerate(computed) if t is result]
    return functools.partial(checksums.add_crc, job, copied[0], inputs=len(computed)) if copied else None


def _finished(running: deque) -> tuple[ShardPlan, _Piece, torch.Tensor, list]:
    """The oldest pool merge, done (its error is raised; the caller then cancels those queued after it)."""
    shard, piece, future = running.popleft()
    return (shard, piece, *future.result())


def _pool_spread(pool: ThreadPoolExecutor) -> Spread:
    """A whole-tensor merge's passes over the merging threads, the results in order."""
    return lambda fn, items: list(pool.map(fn, items))


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


@contextmanager
def merge_arithmetic(device: torch.device) -> Iterator[None]:
    """Torch's intra-op threads as the merge sets them (``_merge_session``, ``_one_torch_thread``): one on the
    CPU. A reduction (a norm, a sum) split over several threads adds in another order and can round its last
    bit otherwise, so a recomputation must run with the merge's setting to give the merge's bits."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def computed_pieces(plan: MergePlan, job: TensorJob, device: torch.device, threads: int = 1
                    ) -> Iterator[tuple[Rows, torch.Tensor, list[torch.Tensor]]]:
    """(rows or None, result in the written dtype on the CPU, the inputs it was computed from) for each piece of
    one output tensor, in order, by the pieces and paths the loop takes (call under ``merge_arithmetic``): a
    recomputation holds what the merge held, and gets the bytes it wrote. Row blocks of element-wise merges are
    computed by up to ``threads`` threads at once, each with one torch thread, and the passes of a whole-tensor
    merge are spread over them, as the loop computes them (the same bytes in any order: strategies/chunks.py)."""
    pieces = split(job, job.strategy, blocked=device.type == "cpu")

    def one(piece: _Piece, spread: Spread = in_order) -> tuple[Rows, torch.Tensor, list[torch.Tensor]]:
        loaded = _load(piece, device, not plan.allow_nonfinite)
        inputs = resolve_sources(loaded) if piece.raw or device.type != "cpu" else list(loaded)
        return piece.rows, _compute(plan, piece, list(inputs), device, spread)[0], inputs

    if threads <= 1:
        for piece in pieces:
            yield one(piece)
        return
    with ThreadPoolExecutor(threads, "mergekit-lite-recompute", _one_torch_thread) as pool:
        if len(pieces) == 1 or not all(piece.blocked for piece in pieces):
            for piece in pieces:
                yield one(piece, _pool_spread(pool))
            return
        running: deque[Future] = deque()
        for piece in pieces:
            if len(running) >= threads:
                yield running.popleft().result()
            running.append(pool.submit(one, piece))
        while running:
            yield running.popleft().result()


def _compute(plan: MergePlan, piece: _Piece, loaded: list, device: torch.device,
             spread: Spread = in_order) -> tuple[torch.Tensor, list[Optional[torch.Tensor]]]:
    """One piece's output, on the CPU in the written dtype; and the inputs this thread computed from deferred
    ones (LoRA folds; None for the others), whose checksums the loop adds in file order."""
    inputs = resolve_sources(loaded)
    computed = [tensor if tensor is not item else None for tensor, item in zip(inputs, loaded)]
    if piece.blocked:
        return merge_blocks(plan, piece.job, inputs, piece.shape, piece.rows), computed
    if piece.chunked:
        if 2 * piece.numel >= plan.largest_numel:   # where the peak is
            release_free_heap()
        return merge_chunks(plan, piece.job, inputs, spread), computed
    prepared = inputs if device.type == "cpu" else prepare_inputs(piece.job, inputs, device, piece.rows,
                                                                  check=not plan.allow_nonfinite)
    return merge_prepared(plan, piece.job, prepared, piece.rows), computed


def compute_whole(plan: MergePlan, job: TensorJob, device: torch.device) -> torch.Tensor:
    """One output tensor in memory, in the written dtype, by the pieces and paths the loop takes for it, so
    its bytes are those the loop writes (a fused multi-stage run feeds it to the next stage: plan/stages.py)."""
    pieces = split(job, job.strategy, blocked=device.type == "cpu")
    parts = [_compute(plan, piece, _load(piece, device, not plan.allow_nonfinite), device)[0] for piece in pieces]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _load(piece: _Piece, device: torch.device, check: bool,
          checksums: Optional[InputChecksums] = None) -> list:
    """A piece's inputs as the merging thread wants them: raw for blocked and chunked merges (checked there;
    a LoRA fold deferred to the merging thread, fetch_sources) and off-CPU devices (moved and converted there),
    converted to float32 and checked for NaN and Inf (``check``) here otherwise, in the reader thread (which
    reads pieces in order: ``checksums`` sees each input's rows in order; deferred ones are added by the loop)."""
    job = piece.job
    raw = fetch_sources(job, piece.rows) if piece.raw else read_sources(job, piece.rows)
    if checksums is not None:
        checksums.add(job, [t if isinstance(t, torch.Tensor) else None for t in raw])
    return raw if piece.raw or device.type != "cpu" else prepare_inputs(job, raw, device, piece.rows,
                                                                            check=check)


def _will_read(piece: _Piece) -> None:
    """Ask the kernel for a piece's input bytes before the reader reads them (pipeline.ReadAhead)."""
    for source in piece.job.sources:
        source.will_read(piece.rows)


def _loaded_bytes(piece: _Piece, device: torch.device) -> int:
    """Bytes a piece's inputs occupy once loaded (``_load``): raw, or converted to the compute dtype."""
    job = piece.job
    converted = not piece.raw and not job.copy and device.type == "cpu"
    total = 0
    for source in job.sources:
        dtype = compute_dtype(job.load_dtype or source.info.dtype) if converted else source.info.dtype
        total += piece.numel * itemsize(dtype)
    return total
