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
from ..output.writer import ShardRecord
from ..plan.planner import MergePlan
from ..plan.shards import ShardPlan

INSTALL_HINT = "install the extra: pip install 'mergekit-lite[ray]'"


def check_ray_installed() -> None:
    if importlib.util.find_spec("ray") is None:
        raise UsageError("--executor ray needs Ray, which is not installed", where="executor", hint=INSTALL_HINT)


def _write_one(plan: MergePlan, shard: ShardPlan, path: str, device: str) -> ShardRecord:
    """The Ray task: one shard, computed on the worker's node."""
    from .loop import write_shard

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
        try:
            ray.init(address=address, log_to_driver=False, logging_level="ERROR")
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise MergeError(f"cannot connect to the Ray cluster: {_first_line(exc)}",
                             where=f"--ray-address {address}" if address else "--executor ray",
                             hint="start the cluster first (`ray start --head` on its head node) and pass its "
                                  "address, or leave --ray-address out to start a local instance") from None
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
                on_shard(_result(ray, ref, shard))
                progress(shard.nbytes)
    finally:
        for ref in running:
            ray.cancel(ref, force=True)


def _result(ray, ref, shard: ShardPlan) -> ShardRecord:
    """The task's record. A task's MergeError is raised here as itself (not wrapped in Ray's error); any other
    failure of the task (an exception, a worker that crashed or was killed) names the shard."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, MergeError):
            raise cause from None
        if isinstance(cause, KeyboardInterrupt):
            raise KeyboardInterrupt from None
        what = _first_line(cause) if isinstance(cause, BaseException) else _first_line(exc)
        raise MergeError(f"the Ray task computing {shard.file} failed: {what}", where="--executor ray",
                         hint="see the Ray worker logs on that node (/tmp/ray/session_latest/logs); "
                              "run the same command with --resume to keep the shards that finished") from None


def _first_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (Ray's own messages go on with tracebacks and log paths)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
