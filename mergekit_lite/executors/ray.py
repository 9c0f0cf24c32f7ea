"""Computing output shards as Ray tasks, on the nodes of a Ray cluster that see the same storage.

Each task gets the plan (made once, here, from the headers) and one shard, reads the inputs by their
absolute paths, and writes its shard straight into the partial folder; this process records each finished
shard in the resume journal as the tasks report back, and writes the index, config and card at the end.
It pays when reading and merging, not the network, is the limit: many large inputs on storage every node
mounts at the same path (NFS, Lustre, a shared volume), so that N nodes read and compute N shards at once.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Callable, Optional, Sequence

import torch

from ..errors import MergeError, UsageError
from ..plan import MergePlan
from ..writer import ShardPlan, ShardRecord

INSTALL_HINT = "install the extra: pip install 'mergekit-lite[ray]'"


def check_ray_installed() -> None:
    if importlib.util.find_spec("ray") is None:
        raise UsageError("--executor ray needs Ray, which is not installed", where="--executor", hint=INSTALL_HINT)


def _write_one(plan: MergePlan, shard: ShardPlan, path: str, device: str) -> ShardRecord:
    """The Ray task: one shard, computed on the worker's node."""
    from ..engine import write_shard

    try:
        return write_shard(plan, shard, path, torch.device(device))
    finally:
        plan.close()


def write_shards_on_ray(plan: MergePlan, shards: Sequence[ShardPlan], folder: str, device: torch.device,
                        progress: Callable[[int], None], on_shard: Callable[[ShardRecord], None],
                        address: Optional[str]) -> None:
    """Run one task per shard; report each shard as it finishes. ``address``: an existing cluster
    (``auto``, ``ray://host:10001``, ``host:6379``); None: the cluster this process is connected to, or a
    local one started for this merge."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False, logging_level="ERROR")
    resources = {"num_gpus": 1} if device.type == "cuda" else {"num_cpus": 1}
    task = ray.remote(**resources, max_retries=0)(_write_one)
    plan_ref = ray.put(plan)
    running = {task.remote(plan_ref, shard, os.path.join(folder, shard.file), device.type): shard
               for shard in shards}
    try:
        while running:
            finished, _ = ray.wait(list(running), num_returns=1)
            for ref in finished:
                shard = running.pop(ref)
                on_shard(_result(ray, ref))
                progress(shard.nbytes)
    finally:
        for ref in running:
            ray.cancel(ref, force=True)


def _result(ray, ref) -> ShardRecord:
    """The task's record; a task's MergeError is raised here as itself (not wrapped in Ray's error)."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, MergeError):
            raise cause from None
        raise
