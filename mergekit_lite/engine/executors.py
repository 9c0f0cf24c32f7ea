"""Who computes the output shards: this process (``local``, the default) or the nodes of a Ray cluster.

The layout of every output shard is known from the plan, so a shard is an independent unit of work
(``engine.write_shard``). Either way the shards land in the partial folder, each finished one is recorded
in the resume journal (output/journal.py), and this process then writes the index, config and card.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..errors import UsageError
from ..output.journal import Journal, open_journal
from ..output.writer import ShardRecord, WrittenShards, written_shards
from ..plan.planner import MergePlan
from ..plan.shards import ShardPlan, output_layout
from .loop import write_shards

EXECUTORS = ("local", "ray")


def check_executor(executor: str, ray_address: Optional[str]) -> None:
    """Usage errors, before anything is planned or written."""
    if executor not in EXECUTORS:
        raise UsageError(f"unknown executor '{executor}'", where="executor", hint="use local or ray")
    if ray_address is not None and executor != "ray":
        raise UsageError("--ray-address needs --executor ray", where="ray_address")
    if executor == "ray":
        from .ray import check_ray_installed

        check_ray_installed()


@dataclass
class PendingOutput:
    """A merge's output shards, with those an interrupted run finished (verified, kept on ``--resume``)."""

    plan: MergePlan
    partial: str
    device: torch.device
    layout: list[ShardPlan]
    journal: Journal
    done: dict[str, ShardRecord]

    def write(self, progress: Callable[[int], None], executor: str = "local",
              ray_address: Optional[str] = None, threads: Optional[int] = None) -> WrittenShards:
        """Compute every shard not done yet into the partial folder, recording each one as it finishes
        (``threads``: merging threads of the local executor; default one per core)."""
        check_executor(executor, ray_address)
        started = time.perf_counter()
        todo = [shard for shard in self.layout if shard.file not in self.done]
        progress(sum(shard.nbytes for shard in self.layout if shard.file in self.done))
        if executor == "ray":
            from .ray import write_shards_on_ray

            write_shards_on_ray(self.plan, todo, self.partial, self.device, progress, self.journal.record,
                                ray_address)
        else:
            write_shards(self.plan, todo, self.partial, self.device, progress, on_shard=self.journal.record,
                         threads=threads)
        return written_shards(self.plan, self.layout, time.perf_counter() - started)

    def finish(self) -> None:
        """Remove the journal: the last step before the partial folder is renamed into place (a crash before
        this still resumes with every shard kept)."""
        self.journal.remove()


def open_output(plan: MergePlan, partial: str, *, max_shard_size: int, device: torch.device,
                resume: bool = False) -> PendingOutput:
    """Plan the shards and start (or, with ``resume``, verify and continue) the partial folder's journal.
    Raises before any tensor is computed when the partial folder belongs to another merge."""
    layout = output_layout(plan, max_shard_size)
    journal, done = open_journal(partial, plan, layout, device, resume)
    return PendingOutput(plan, partial, device, layout, journal, done)
