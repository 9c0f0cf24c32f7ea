"""The merge loop: read the inputs of one output tensor, merge on the device, cast, write. Repeat.

One module owns the loop, the device and the dtypes. A background thread reads (and on the CPU converts to
float32) the next inputs while the current one is merged, within a byte budget, so the disk and both cores
are busy together. Element-wise strategies (linear, task arithmetic) get large tensors in row blocks, so a
1 GB embedding costs a few block-sized buffers rather than several copies of itself.
"""

from __future__ import annotations

import math
import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import torch

from .dtypes import compute_dtype, itemsize
from .errors import ModelError, StrategyError
from .memory import reuse_freed_memory
from .nonfinite import check_inputs, check_result
from .plan import MergePlan, TensorJob
from .strategy import TensorContext
from .writer import Entry, ShardWriter, plan_shards, shard_filenames

# Row blocks of element-wise merges hold at most this many elements (32 MB per float32 input): measured on
# 3 x 1B linear, peak RSS fell from 1.8 GiB (whole 32k x 2k embeddings) to 0.7 GiB at the same speed.
PIECE_ELEMENTS = 1 << 23
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

    @property
    def numel(self) -> int:
        return self.job_numel if self.rows is None else (self.rows[1] - self.rows[0]) * math.prod(self.job.shape[1:])

    @property
    def job_numel(self) -> int:
        return math.prod(self.job.shape)


def write_tensors(plan: MergePlan, folder: str, *, max_shard_size: int, device: torch.device,
                  progress: Optional[Callable[[int], None]] = None) -> WrittenShards:
    """Compute every planned tensor into shards in ``folder``."""
    started = time.perf_counter()
    jobs = {job.name: job for job in plan.jobs}
    shards = plan_shards([Entry(j.name, j.dtype, j.shape) for j in plan.jobs], max_shard_size)
    files = shard_filenames(len(shards))
    ordered = [jobs[e.name] for shard in shards for e in shard]
    owner = {e.name: i for i, shard in enumerate(shards) for e in shard}
    pieces = [p for job in ordered for p in split(job, (job.strategy or plan.strategy).elementwise)]
    writers: dict[int, ShardWriter] = {}
    with reuse_freed_memory():
        reader = _Prefetcher(pieces, device, check=not plan.allow_nonfinite)
        try:
            for piece, loaded in reader:
                job = piece.job
                index = owner[job.name]
                if index not in writers:
                    writers[index] = ShardWriter(os.path.join(folder, files[index]), shards[index])
                prepared = loaded if device.type == "cpu" else prepare_inputs(job, loaded, device, piece.rows,
                                                                              check=not plan.allow_nonfinite)
                writers[index].write(job.name, merge_prepared(plan, job, prepared, piece.rows), piece.rows)
                del loaded, prepared
                reader.done(piece)
                if progress is not None:
                    progress(piece.numel * itemsize(job.dtype))
                if writers[index].complete:
                    writers.pop(index).close()
        except BaseException:
            for writer in writers.values():
                writer.abort()
            raise
        finally:
            reader.stop()
    return WrittenShards(files, {name: files[i] for name, i in owner.items()},
                         sum(j.nbytes for j in ordered), time.perf_counter() - started)


def split(job: TensorJob, elementwise: bool) -> list[_Piece]:
    """Row blocks of at most PIECE_ELEMENTS elements for element-wise merges; else the whole tensor."""
    numel = math.prod(job.shape)
    if not elementwise or job.copy or len(job.shape) < 2 or numel <= PIECE_ELEMENTS:
        return [_Piece(job, None)]
    step = max(1, PIECE_ELEMENTS // math.prod(job.shape[1:]))
    return [_Piece(job, (start, min(start + step, job.shape[0]))) for start in range(0, job.shape[0], step)]


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
    base = tensors.pop() if job.base is not None else None
    ctx = TensorContext(job.name, job.layer, job.t, plan.seed)
    strategy = job.strategy or plan.strategy
    try:
        result = strategy(tensors, base, ctx, **job.params)
    except (RuntimeError, ValueError) as exc:
        raise StrategyError(f"{strategy.name} failed: {exc}", where=f"tensor '{job.name}'",
                            hint="this is likely a bug in the strategy; re-run with --debug and report it") from exc
    del tensors, base
    shape = job.shape if rows is None else (rows[1] - rows[0], *job.shape[1:])
    if tuple(result.shape) != shape:
        raise StrategyError(f"{strategy.name} returned shape {list(result.shape)}, planned {list(shape)}",
                            where=f"tensor '{job.name}'")
    written = result.to(job.merge_dtype).to(job.dtype)
    if not plan.allow_nonfinite:
        check_result(job, strategy.name, result, written, rows)
    return written.cpu()


class _Prefetcher:
    """Reads (and, on the CPU, converts to float32) the next pieces' inputs in a background thread, within
    a byte budget.

    The budget is the largest piece's loaded bytes plus a little (at most 256 MiB) so that, while the
    largest piece is merged, only small ones are read ahead. Positional reads and torch conversions release
    the GIL, so this overlaps with the main thread's merge arithmetic and writes.
    """

    def __init__(self, pieces: Sequence[_Piece], device: torch.device, check: bool = True):
        self._pieces = list(pieces)
        self._device = device
        self._check = check
        self._convert = device.type == "cpu"
        self._cost = {id(p): _loaded_bytes(p, self._convert) for p in self._pieces}
        largest = max(self._cost.values(), default=0)
        self._budget = largest + min(largest, 256 << 20)
        self._used = 0
        self._cond = threading.Condition()
        self._queue: queue.Queue = queue.Queue()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="mergekit-lite-reader", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for piece in self._pieces:
            cost = self._cost[id(piece)]
            with self._cond:
                while not self._stopped and self._used and self._used + cost > self._budget:
                    self._cond.wait()
                if self._stopped:
                    return
                self._used += cost
            try:
                job = piece.job
                raw = read_sources(job, piece.rows)
                item = (piece, prepare_inputs(job, raw, self._device, piece.rows, check=self._check)
                        if self._convert else raw)
            except BaseException as exc:  # handed to the main thread, which raises it
                self._queue.put(exc)
                return
            self._queue.put(item)

    def __iter__(self) -> Iterator[tuple[_Piece, list[torch.Tensor]]]:
        for _ in self._pieces:
            item = self._queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item

    def done(self, piece: _Piece) -> None:
        with self._cond:
            self._used -= self._cost[id(piece)]
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()


def _loaded_bytes(piece: _Piece, converted: bool) -> int:
    """Bytes a piece's inputs occupy once loaded: raw, or converted to the compute dtype."""
    job = piece.job
    total = 0
    for source in job.sources:
        dtype = source.info.dtype if not converted or job.copy else compute_dtype(job.load_dtype or source.info.dtype)
        total += piece.numel * itemsize(dtype)
    return total
