"""The merge loop: read the inputs of one output tensor, merge on the device, cast, write. Repeat.

One module owns the loop, the device and the dtypes. A background thread reads the next tensors' bytes
while the current one is computed, within a byte budget, so the disk and the cores are busy together
without memory growing beyond a few tensors.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import torch

from .dtypes import compute_dtype
from .errors import ModelError, StrategyError
from .plan import MergePlan, TensorJob
from .strategy import TensorContext
from .writer import Entry, ShardWriter, plan_shards, shard_filenames


@dataclass(frozen=True)
class WrittenShards:
    """What the loop wrote: file names, which tensor is where, and the tensor bytes."""

    files: list[str]
    weight_map: dict[str, str]
    total_size: int
    seconds: float


def write_tensors(plan: MergePlan, folder: str, *, max_shard_size: int, device: torch.device,
                  progress: Optional[Callable[[int], None]] = None) -> WrittenShards:
    """Compute every planned tensor into shards in ``folder``."""
    started = time.perf_counter()
    jobs = {job.name: job for job in plan.jobs}
    shards = plan_shards([Entry(j.name, j.dtype, j.shape) for j in plan.jobs], max_shard_size)
    files = shard_filenames(len(shards))
    ordered = [jobs[e.name] for shard in shards for e in shard]
    owner = {e.name: i for i, shard in enumerate(shards) for e in shard}
    writers: dict[int, ShardWriter] = {}
    reader = _Prefetcher(ordered)
    try:
        for job, raw in reader:
            index = owner[job.name]
            if index not in writers:
                writers[index] = ShardWriter(os.path.join(folder, files[index]), shards[index])
            writers[index].write(job.name, merge_tensor(plan, job, raw, device))
            del raw
            reader.done(job)
            if progress is not None:
                progress(job.nbytes)
            if job.name == shards[index][-1].name:
                writers.pop(index).close()
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    finally:
        reader.stop()
    return WrittenShards(files, {name: files[i] for name, i in owner.items()},
                         sum(j.nbytes for j in ordered), time.perf_counter() - started)


def read_sources(job: TensorJob) -> list[torch.Tensor]:
    """The raw input tensors of one job, in ``job.sources`` order, as stored (CPU, stored dtype).

    The merge loop and validation's recomputation both read through here, so a change to what a source
    returns (a LoRA fold) is recomputed exactly as it was merged."""
    return [source.checkpoint.read(source.name) for source in job.sources]


def merge_tensor(plan: MergePlan, job: TensorJob, raw: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """One output tensor from its raw inputs (in ``job.sources`` order), on ``device``, back on the CPU."""
    if job.copy:
        first = raw[-1] if job.base is not None else raw[0]
        for source, tensor in zip(job.sources, raw):
            if not torch.equal(tensor, first):
                raise ModelError(f"non-float tensor differs between models (cannot be averaged)",
                                 where=f"tensor '{job.name}'", file=source.checkpoint.label,
                                 hint="the models disagree on a buffer such as position_ids; fix one checkpoint")
        return first
    tensors = []
    while raw:  # convert one at a time, dropping each raw buffer as soon as it is converted
        tensor = raw.pop(0).to(device, non_blocking=False)
        if job.load_dtype is not None:
            tensor = tensor.to(job.load_dtype)   # mergekit rounds inputs to the spec dtype first
        tensors.append(tensor.to(compute_dtype(tensor.dtype)))
        del tensor
    base = tensors.pop() if job.base is not None else None
    ctx = TensorContext(job.name, job.layer, job.t, plan.seed)
    try:
        result = plan.strategy(tensors, base, ctx, **job.params)
    except (RuntimeError, ValueError) as exc:
        raise StrategyError(f"{plan.strategy.name} failed: {exc}", where=f"tensor '{job.name}'",
                            hint="this is likely a bug in the strategy; re-run with --debug and report it") from exc
    del tensors, base
    if tuple(result.shape) != job.shape:
        raise StrategyError(f"{plan.strategy.name} returned shape {list(result.shape)}, planned {list(job.shape)}",
                            where=f"tensor '{job.name}'")
    return result.to(job.merge_dtype).to(job.dtype).cpu()


class _Prefetcher:
    """Reads the next jobs' input bytes in a background thread, within a byte budget.

    The budget is the largest job's raw bytes plus a little (at most 256 MiB) so that, while the largest
    tensor is merged, only small tensors are read ahead. Reading uses positional reads that release the
    GIL, so it overlaps with torch's compute.
    """

    def __init__(self, jobs: Sequence[TensorJob]):
        self._jobs = list(jobs)
        self._cost = {id(j): sum(s.info.nbytes for s in j.sources) for j in self._jobs}
        largest = max(self._cost.values(), default=0)
        self._budget = largest + min(largest, 256 << 20)
        self._used = 0
        self._cond = threading.Condition()
        self._queue: queue.Queue = queue.Queue()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="mergekit-lite-reader", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for job in self._jobs:
            cost = self._cost[id(job)]
            with self._cond:
                while not self._stopped and self._used and self._used + cost > self._budget:
                    self._cond.wait()
                if self._stopped:
                    return
                self._used += cost
            try:
                item = (job, read_sources(job))
            except BaseException as exc:  # handed to the main thread, which raises it
                self._queue.put(exc)
                return
            self._queue.put(item)

    def __iter__(self) -> Iterator[tuple[TensorJob, list[torch.Tensor]]]:
        for _ in self._jobs:
            item = self._queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item

    def done(self, job: TensorJob) -> None:
        with self._cond:
            self._used -= self._cost[id(job)]
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
