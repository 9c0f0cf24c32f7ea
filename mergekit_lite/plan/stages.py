"""Fusing the stages of a multi-stage file (``merge run --fuse``): which files can, and the stage as an input.

A fused run writes no intermediate: a later stage reads a named stage through a ``StageCheckpoint``, whose
tensors are the stage's planned output tensors (names, shapes, and the dtype the stage would write), and
whose ``read`` computes one of them in memory from the stage's own inputs, exactly as the merge loop would
write it (the engine's function, passed in: a plan does not compute). So the final tensors are the bytes of
the staged run. That holds when every stage is a per-tensor merge of whole models: each output tensor is
computed from the same-named tensor of each input. Layer slices, modules, tokenizer merges (rows remapped
by token) and methods that change shapes (concat) are refused, with the reason.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from ..safetensors_format import TensorInfo
from ..sources.checkpoint import Checkpoint
from ..spec.schema import Spec
from ..strategies.registry import get_strategy
from ..strategy import Strategy
from .jobs import TensorJob

Compute = Callable[[Any, TensorJob], torch.Tensor]   # (the stage's MergePlan, one of its jobs) -> the tensor


def fuse_refusal(named: list[tuple[Optional[str], Spec, tuple[str, ...]]], folders: set[str],
                 strategies: list[Strategy]) -> Optional[str]:
    """Why these stages (name, spec, names of the stages it uses; the final one last) cannot be fused, or None.
    ``folders``: the stages' folders, as the rewritten specs name them."""
    used = {name for _, _, uses in named for name in uses}
    for name, spec, _ in named:
        stage = f"stage '{name}'" if name is not None else "the final stage"
        if name is not None and name not in used:
            return f"{stage} is used by no other stage, and --fuse writes only the final model"
        if spec.models is None:
            return f"{stage} merges {'layer slices' if spec.slices else 'modules'}, not whole models"
        if spec.tokenizer is not None:
            return f"{stage} merges tokenizers ({spec.tokenizer.where}), which remaps embedding rows by token"
        strategy = get_strategy(spec.merge_method, strategies, file=spec.file)
        if strategy.changes_shapes:
            return f"{stage} uses {strategy.name}, which changes tensor shapes"
        adapted = [str(ref) for ref, _ in spec.references() if ref.adapters and ref.model.path in folders]
        if adapted:
            return f"{stage} folds LoRA adapters into a stage ({adapted[0]})"
    return None


@dataclass(eq=False)
class StageCheckpoint(Checkpoint):
    """A named stage as an input of a later stage, computed on read (nothing of it is written)."""

    plan: Any = None                     # the stage's MergePlan, planned with its own inputs (headers only)
    compute: Optional[Compute] = None
    _jobs: dict[str, TensorJob] = field(default_factory=dict, repr=False)
    _last: Optional[tuple[str, torch.Tensor]] = field(default=None, repr=False)   # row blocks read one by one
    _compute_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def of(cls, name: str, folder: str, plan: Any, compute: Compute) -> "StageCheckpoint":
        tensors = {job.name: TensorInfo(job.name, job.dtype, tuple(job.shape), f"<stage {name}>", 0, job.nbytes)
                   for job in plan.jobs}
        return cls(f"stage '{name}'", plan.tokenizer_folder or plan.reference.folder, tensors, dict(plan.config),
                   plan=plan, compute=compute, _jobs={job.name: job for job in plan.jobs})

    @property
    def folders(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(f for c in self.plan.checkpoints.values() for f in c.folders))

    def read(self, name: str, rows: Optional[tuple[int, int]] = None) -> torch.Tensor:
        with self._compute_lock:
            if self._last is None or self._last[0] != name:
                self._last = (name, self.compute(self.plan, self._jobs[name]))
            tensor = self._last[1]
        return tensor if rows is None else tensor[rows[0]:rows[1]]

    def will_read(self, name: str, rows: Optional[tuple[int, int]] = None) -> None:
        """No hint: a stage is computed, not read (the inputs of its merge are read by the merge)."""

    def close(self) -> None:
        self._last = None
        if self.plan is not None:
            self.plan.close()
