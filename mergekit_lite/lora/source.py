"""``base+adapter`` as a checkpoint: the base's tensors with LoRA adapters folded in as each is read.

A source transform (STYLE.md): ``LoraSource`` has the interface of ``checkpoint.Checkpoint`` (``tensors``,
``read``, ``label``, ``folder``, ``config``, ``close``), so a folded model feeds any strategy, tensor by
tensor, with no cache folder and no whole model in memory. Opening it reads headers and JSON only and checks
(recipes.py) everything a fold can get wrong: every adapted module and replaced tensor exists in the base, shapes and
ranks agree, the adapter was made for this base (identity.py). Then ``read(name)`` reads the base tensor and
that module's adapter tensors, and folds (fold.py) in peft's order: full-tensor replacements first
(modules_to_save, trained biases, saved embedding copies), then each adapter's delta in turn.

Tied embeddings (a base without ``lm_head.weight`` that reuses its input embedding): peft merges an
``lm_head`` or embedding adapter into the one shared tensor, so the merged model no longer computes what
base+adapter computed. ``untie`` (default) writes ``lm_head.weight`` separately, each tensor with its own
deltas, and sets ``tie_word_embeddings: false``; ``shared`` reproduces peft's shared tensor.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch

from ..dtypes import is_float8
from ..safetensors_format import TensorInfo
from ..sources.checkpoint import Checkpoint
from ..spec.references import ModelPath
from .adapter import Adapter
from .fold import aligned_rows, fold_rows, replace
from .identity import check_base
from .recipes import Fold, Recipe, RecipeBuilder, check_targets

log = logging.getLogger("mergekit_lite")

ROW_DTYPES = (torch.bfloat16, torch.float16, torch.float32)   # weights whose folds are rounded from float32


@dataclass
class LoraSource:
    """A base checkpoint with adapters folded in on read. Same interface as Checkpoint."""

    label: str
    base: Checkpoint
    adapters: list[Adapter]
    tensors: dict[str, TensorInfo]
    config: dict[str, Any]
    recipes: dict[str, Recipe]
    warnings: list[str] = field(default_factory=list)
    card_notes: list[str] = field(default_factory=list)
    _cached: Optional[tuple[str, torch.Tensor]] = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def folder(self) -> str:
        return self.base.folder

    @property
    def folders(self) -> tuple[str, ...]:
        return (self.base.folder, *(a.folder for a in self.adapters))

    def read(self, name: str, rows: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """Read one tensor with the adapters folded in, or the block of its rows [start, end).

        Plain LoRA on linear layers folds just those rows. Other row blocks of a folded tensor (DoRA's norms,
        transposed layouts, replacements) are cut from the whole folded tensor, which is kept until its last
        block is read (the engine reads one tensor's blocks in order), so the fold is computed once."""
        recipe = self.recipes.get(name)
        if recipe is None:
            return self.base.read(name, rows)
        if _row_folds(recipe, self.base) is not None:
            return self._fetch_rows(name, recipe, rows).resolve()
        if rows is None:
            return self._fold(name, recipe)
        with self._lock:
            if self._cached is None or self._cached[0] != name:
                self._cached = (name, self._fold(name, recipe))
            whole = self._cached[1]
            if rows[1] >= whole.shape[0]:
                self._cached = None
        return whole[rows[0]:rows[1]].clone()

    def will_read(self, name: str, rows: Optional[tuple[int, int]] = None) -> None:
        """A hint that the base tensor this one folds from is read soon (Checkpoint.will_read); the adapters'
        factors are small."""
        recipe = self.recipes.get(name)
        self.base.will_read(recipe.source if recipe is not None else name, rows)

    def fetch(self, name: str, rows: Optional[tuple[int, int]] = None) -> Union[torch.Tensor, "DeferredFold"]:
        """What ``read(name, rows)`` returns, or, for a tensor folded row by row (plain LoRA on a linear layer),
        its stored rows and adapter factors read now and folded by ``resolve()`` later: the merge loop reads in
        one thread and folds on the merging threads."""
        recipe = self.recipes.get(name)
        if recipe is None or _row_folds(recipe, self.base) is None:
            return self.read(name, rows)
        return self._fetch_rows(name, recipe, rows)

    def _fetch_rows(self, name: str, recipe: Recipe, rows: Optional[tuple[int, int]]) -> "DeferredFold":
        start, end = rows if rows is not None else (0, self.tensors[name].shape[0])
        first, last = aligned_rows(start, end, self.tensors[name].shape[0])
        steps = [(f.adapter.read(f.module.down), f.adapter.read(f.module.up, (first, last)), f.scaling,
                  f.adapter.settings.mica) for f in _row_folds(recipe, self.base) or ()]
        return DeferredFold(self.base.read(recipe.source, rows), start, first, steps)

    def _fold(self, name: str, recipe: Recipe) -> torch.Tensor:
        swap = recipe.replacement
        if swap is not None and swap.amount == 1:
            tensor = swap.adapter.read(swap.key).to(self.tensors[name].dtype)   # the base tensor is not needed
        else:
            tensor = self.base.read(recipe.source)
            if swap is not None:
                tensor = replace(tensor, swap.adapter.read(swap.key), swap.amount)
        if is_float8(tensor.dtype):   # no float8 arithmetic: folded in float32 (the output dtype is set by the plan)
            tensor = tensor.float()
        for folds in recipe.groups.values():
            unmerged = tensor        # DoRA norms use the module's weight before any adapter of it (peft's forward)
            for step in folds:
                tensor = step.apply(tensor, unmerged)
        return tensor.contiguous()

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (for Ray workers) without the lock and the cached fold."""
        state = {k: v for k, v in self.__dict__.items() if k != "_lock"}
        state["_cached"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def close(self) -> None:
        self.base.close()
        for adapter in self.adapters:
            adapter.close()


@dataclass
class DeferredFold:
    """Rows [start, ...) of a linear weight as stored and the factors of its folds (B's rows from ``first``, on
    ROW_ALIGN boundaries), read; ``resolve()`` folds them (fold.fold_rows), on whichever thread calls it."""

    weight: torch.Tensor
    start: int
    first: int
    steps: list[tuple[torch.Tensor, torch.Tensor, float, bool]]   # (A, B rows, scaling, round_delta_first)

    def resolve(self) -> torch.Tensor:
        return fold_rows(self.weight, self.start, self.first, self.steps)


def _row_folds(recipe: Recipe, base: Checkpoint) -> Optional[list[Fold]]:
    """The folds of a tensor that can be folded a block of rows at a time, in order; None if it cannot: only
    plain (not DoRA) LoRA weight updates of linear layers, with no full replacement, on a float16, bfloat16
    or float32 weight (others fold the whole tensor at once)."""
    folds = [step for group in recipe.groups.values() for step in group]
    if recipe.replacement is not None or base.tensors[recipe.source].dtype not in ROW_DTYPES or \
            any(step.bias or step.kind != "linear" or step.module.magnitude for step in folds):
        return None
    return folds


def open_source(label: str, base: Checkpoint, base_path: ModelPath, adapters: list[tuple[Adapter, float, bool]],
                tied_embeddings: str = "untie") -> LoraSource:
    """Check the adapters against the base (headers only) and plan every folded tensor."""
    builder = RecipeBuilder(base, tied_embeddings, [a for a, _, _ in adapters])
    for adapter, weight, check in adapters:
        if check:
            warning = check_base(adapter.settings.base_model_name_or_path, adapter.settings.revision, base_path,
                                 base.folder, adapter.label)
            if warning:
                builder.warnings.append(warning)
        check_targets(adapter, builder.module_names())
        builder.add_replacements(adapter, weight)
    for adapter, weight, _ in adapters:
        builder.add_folds(adapter, weight)
    builder.finish()
    for message in builder.warnings:
        log.warning(message)
    config = builder.output_config()
    folded = " + ".join([f"`{base.label}`"] + [f"`{a.label}`" + (f" (weight {w:g})" if w != 1 else "")
                                                for a, w, _ in adapters])
    notes = [f"{folded}: the LoRA adapters were folded into the base as each tensor was read, with the arithmetic "
             "of peft's merge_and_unload().", *builder.notes]
    return LoraSource(label, base, [a for a, _, _ in adapters], builder.tensor_table(), config, builder.recipes,
                      builder.warnings, notes)


