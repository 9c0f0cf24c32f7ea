"""What a folded tensor is made of: its recipe (a base tensor, an optional full replacement, then each
adapter's folds in peft's order), and the builder that derives every recipe from the adapters' tables.

Building reads headers and JSON only and checks everything a fold can get wrong before any tensor is read:
every adapted module and replaced tensor exists in the base, shapes and ranks agree, Conv1D and embedding
layouts are recognised, tied embeddings are handled as ``tied_embeddings`` asks.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from dataclasses import replace as replace_field
from typing import Any, Optional

import torch

from ..architecture import CONV1D_LAYERS, INPUT_EMBEDDINGS, OUTPUT_EMBEDDING, tied_source
from ..dtypes import itemsize
from ..errors import ModelError
from ..safetensors_format import TensorInfo
from ..sources.checkpoint import Checkpoint
from .adapter import Adapter, LoraModule
from .fold import delta_weight, fold, fold_bias
from .patterns import Pattern


@dataclass(frozen=True)
class Fold:
    """One adapter's update of one module: the low-rank delta of its weight, or of its bias (lora_bias)."""

    adapter: Adapter
    module: LoraModule
    kind: str                  # linear, conv1d, embedding, conv (fold.KINDS)
    scaling: float             # peft's scaling times the adapter's weight
    bias: bool = False

    def apply(self, tensor: torch.Tensor, unmerged: torch.Tensor) -> torch.Tensor:
        read = self.adapter.read
        if self.bias:
            return fold_bias(tensor, read(self.module.up_bias), self.scaling)
        delta = delta_weight(self.kind, read(self.module.down), read(self.module.up), self.scaling)
        magnitude = read(self.module.magnitude) if self.module.magnitude else None
        return fold(self.kind, tensor, delta, magnitude=magnitude, unmerged=unmerged,
                    round_delta_first=self.adapter.settings.mica)


@dataclass(frozen=True)
class Replacement:
    """A full tensor stored in an adapter that takes the place of a base tensor before any fold."""

    adapter: Adapter
    key: str
    amount: float              # how far to move from the base tensor to this one: the adapter's weight for a
                               # trained tensor; 1 for a saved copy of the base (peft loads it whole)
    is_copy: bool              # a saved copy of a LoRA layer's base weight, not a trained tensor


@dataclass
class Recipe:
    """How to produce one output tensor: start from a base tensor, replace it, then fold module by module."""

    source: str                                            # base tensor to start from
    replacement: Optional[Replacement] = None
    groups: dict[str, list[Fold]] = field(default_factory=dict)   # module -> its folds, in adapter order


class RecipeBuilder:
    """Routes each adapter tensor to the output tensors it changes, checking shapes as it goes."""

    def __init__(self, base: Checkpoint, tied_embeddings: str, adapters: list[Adapter]):
        self.base = base
        self.mode = tied_embeddings
        self.tied = None if OUTPUT_EMBEDDING in base.tensors else tied_source(OUTPUT_EMBEDDING, base.tensors)
        self.recipes: dict[str, Recipe] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}           # output tensors whose shape a replacement changed
        # A trained lm_head (modules_to_save) on a tied base is its own tensor even in peft (>= 0.19 unties it).
        self.lm_head_replaced = bool(self.tied) and any(
            t == OUTPUT_EMBEDDING and t not in a.base_layer_copies
            for a in adapters for t in a.replacements)
        self.warnings: list[str] = []
        self.notes: list[str] = []
        self.conv1d = CONV1D_LAYERS.get(str(base.config.get("model_type", "")), set())

    # --- where things go -------------------------------------------------------------------------------
    def module_names(self) -> set[str]:
        names = {n.rsplit(".", 1)[0] for n in self.base.tensors if "." in n}
        return names | ({"lm_head"} if self.tied else set())

    def _base_name(self, name: str, label: str, what: str) -> str:
        """The base tensor ``name`` refers to (tolerating a missing/extra ``transformer.``-style prefix)."""
        if name in self.base.tensors or (name == OUTPUT_EMBEDDING and self.tied):
            return name
        _, _, rest = name.partition(".")
        if rest in self.base.tensors:
            return rest
        raise ModelError(f"{what} '{name}', which the base model does not have", file=label,
                         hint="the adapter was made for another architecture, or this base names its tensors "
                              "differently; use the base the adapter was trained on")

    def _targets(self, name: str, copy_of_shared: bool = False) -> list[str]:
        """Output tensors that an update of base tensor ``name`` lands in (two for a shared embedding copy)."""
        if not self.tied or name not in (OUTPUT_EMBEDDING, self.tied):
            return [name]
        separate = self.mode == "untie" or self.lm_head_replaced
        if copy_of_shared:                                      # peft loads it into the shared tensor
            return [self.tied, OUTPUT_EMBEDDING] if separate else [self.tied]
        return [OUTPUT_EMBEDDING] if name == OUTPUT_EMBEDDING and separate else [self.tied]

    def _recipe(self, name: str) -> Recipe:
        if name not in self.recipes:
            self.recipes[name] = Recipe(self.tied if name == OUTPUT_EMBEDDING and self.tied else name)
        return self.recipes[name]

    def _info(self, name: str) -> TensorInfo:
        source = self.tied if name == OUTPUT_EMBEDDING and self.tied else name
        info = self.base.tensors[source]
        shape = self.shapes.get(name, info.shape)
        return replace_field(info, name=name, shape=shape, nbytes=itemsize(info.dtype) * math.prod(shape))

    # --- full-tensor replacements ---------------------------------------------------------------------
    def add_replacements(self, adapter: Adapter, weight: float) -> None:
        shared_copies = {}
        for target, key in adapter.replacements.items():
            name = self._base_name(target, adapter.label, f"tensor '{key}' replaces")
            is_copy = target in adapter.base_layer_copies
            if is_copy and self.tied and name in (OUTPUT_EMBEDDING, self.tied):
                shared_copies[name] = key   # peft loads both copies into the one shared tensor; lm_head's last
                continue
            for out in self._targets(name):
                self._set_replacement(out, Replacement(adapter, key, 1.0 if is_copy else weight, is_copy))
        if shared_copies:
            key = shared_copies.get(OUTPUT_EMBEDDING, shared_copies.get(self.tied))
            for out in self._targets(self.tied, copy_of_shared=True):
                self._set_replacement(out, Replacement(adapter, key, 1.0, True))

    def _set_replacement(self, name: str, new: Replacement) -> None:
        """Record a replacement. Saved base-layer copies give way to trained tensors, and a later copy takes
        the place of an earlier one (peft loads them in that order); two trained tensors conflict."""
        recipe, adapter, key, amount = self._recipe(name), new.adapter, new.key, new.amount
        old = recipe.replacement
        if old is not None and not old.is_copy:
            if new.is_copy:
                return
            raise ModelError(f"two adapters replace tensor '{name}' ({old.adapter.label} and {adapter.label})",
                             file=adapter.label,
                             hint="peft cannot activate two adapters with modules_to_save on the same module "
                                  "either; fold them one at a time")
        info, stored = self._info(name), adapter.info(key)
        base_shape = self.base.tensors[recipe.source].shape
        if stored.shape != base_shape:
            resizable = name in (OUTPUT_EMBEDDING, *INPUT_EMBEDDINGS) and len(stored.shape) == 2
            if not (resizable and stored.shape[1:] == base_shape[1:]):
                raise ModelError(f"tensor '{key}' has shape {list(stored.shape)}, the base's '{name}' has "
                                 f"{list(info.shape)}", file=adapter.label,
                                 hint="the adapter was made for another model size; use the base it was trained on")
            if amount != 1:
                raise ModelError(f"weight {amount:g} on an adapter that resizes '{name}' ({base_shape[0]} -> "
                                 f"{stored.shape[0]} rows)", file=adapter.label,
                                 hint="a resized vocabulary can only be applied whole: use weight 1")
        self.shapes[name] = stored.shape
        recipe.replacement = new

    # --- low-rank folds -------------------------------------------------------------------------------
    def add_folds(self, adapter: Adapter, weight: float) -> None:
        settings = adapter.settings
        for module in adapter.modules.values():
            name = self._base_name(module.name + ".weight", adapter.label, f"adapts module '{module.name}', tensor")
            scaling = settings.scaling(module.name)
            if weight != 1:
                scaling *= weight          # as peft's scale_layer: scaling *= weight
            kind = self._kind(adapter, module, name)
            if module.magnitude and not settings.use_dora:
                raise ModelError(f"module '{module.name}' has a DoRA magnitude but use_dora is false",
                                 file=adapter.label,
                                 hint="fix adapter_config.json (\"use_dora\": true) or remove the magnitudes")
            if settings.use_dora and not module.magnitude:
                raise ModelError(f"use_dora is true but module '{module.name}' has no lora_magnitude_vector",
                                 file=adapter.label, hint="the adapter file is incomplete; save it again with peft")
            for out in self._targets(name):
                self._recipe(out).groups.setdefault(module.name, []).append(Fold(adapter, module, kind, scaling))
            if module.up_bias:
                self._add_bias_fold(adapter, module, name, scaling, kind)

    def finish(self) -> None:
        """Complete the tied-embedding picture and put each tensor's module groups in model order."""
        if self.tied and self.recipes.keys() & {self.tied, OUTPUT_EMBEDDING} and \
                (self.mode == "untie" or self.lm_head_replaced):
            self._recipe(OUTPUT_EMBEDDING)   # lm_head is written even when only the input embedding changed
        for recipe in self.recipes.values():
            # On a shared tied tensor the embedding's folds come before lm_head's: peft merges modules in
            # model order, and the output embedding comes last.
            recipe.groups = dict(sorted(recipe.groups.items(), key=lambda item: item[0].split(".")[-1] == "lm_head"))

    def _add_bias_fold(self, adapter: Adapter, module: LoraModule, weight_name: str, scaling: float, kind: str) -> None:
        bias = weight_name[: -len("weight")] + "bias"
        if bias not in self.base.tensors:
            raise ModelError(f"module '{module.name}' has a lora_B bias (lora_bias) but the base has no '{bias}'",
                             file=adapter.label, hint="use the base the adapter was trained on")
        out_features = adapter.info(module.up).shape[0]
        if adapter.info(module.up_bias).shape != (out_features,) or self.base.tensors[bias].shape != (out_features,):
            raise ModelError(f"lora_B bias of '{module.name}' does not match the base bias '{bias}' "
                             f"({list(self.base.tensors[bias].shape)})", file=adapter.label)
        self._recipe(bias).groups.setdefault(module.name + ".bias", []).append(
            Fold(adapter, module, kind, scaling, bias=True))

    def _kind(self, adapter: Adapter, module: LoraModule, name: str) -> str:
        """The module's kind, from the shapes of its weight and factors (and, for square Conv1D, its name)."""
        weight = self._info(name).shape
        down, up = adapter.info(module.down).shape, adapter.info(module.up).shape
        rank = adapter.settings.rank(module.name)
        if len(down) < 2 or len(up) < 2 or 0 in down or 0 in up:
            raise ModelError(f"module '{module.name}' has LoRA factors of shape {list(down)} and {list(up)}",
                             file=adapter.label,
                             hint="empty or 1-D factors come from an un-gathered ZeRO-3/FSDP save; save it again "
                                  "with the parameters gathered")
        if down[0] != rank or up[1] != rank:
            raise ModelError(f"module '{module.name}' has rank {down[0]} (lora_A) / {up[1]} (lora_B) but the config "
                             f"says r={rank}", file=adapter.label,
                             hint="adapter_config.json and the tensors disagree (check r and rank_pattern)")
        if module.is_embedding:
            kind, expected = "embedding", (down[1], up[0])
        elif len(weight) >= 3:
            kind, expected = "conv", (up[0], *down[1:])
        else:
            out_features, in_features = up[0], down[1]
            square_conv1d = out_features == in_features and module.name.split(".")[-1] in self.conv1d
            transposed = weight == (in_features, out_features) and (out_features != in_features or square_conv1d)
            kind, expected = ("conv1d", (in_features, out_features)) if transposed else \
                ("linear", (out_features, in_features))
        if tuple(weight) != tuple(expected):
            raise ModelError(f"module '{module.name}': the adapter's factors {list(down)} x {list(up)} make a "
                             f"{list(expected)} update, but the base's '{name}' is {list(weight)}",
                             file=adapter.label, hint="the adapter was made for another model (or model size); "
                                                      "use the base it was trained on")
        magnitude = module.magnitude and adapter.info(module.magnitude)
        if magnitude and magnitude.numel != (expected[1] if kind in ("conv1d", "embedding") else expected[0]):
            raise ModelError(f"the DoRA magnitude of '{module.name}' has shape {list(magnitude.shape)}",
                             file=adapter.label, hint="the adapter file is inconsistent; save it again with peft")
        return kind

    # --- results --------------------------------------------------------------------------------------
    def tensor_table(self) -> dict[str, TensorInfo]:
        names = list(self.base.tensors)
        if OUTPUT_EMBEDDING in self.recipes and OUTPUT_EMBEDDING not in self.base.tensors:
            names.append(OUTPUT_EMBEDDING)
        return {name: self._info(name) for name in names}

    def output_config(self) -> dict[str, Any]:
        config = copy.deepcopy(self.base.config)
        if self.tied and OUTPUT_EMBEDDING in self.recipes:
            config["tie_word_embeddings"] = False
            why = ("a trained lm_head (modules_to_save)" if self.lm_head_replaced
                   else "adapters change lm_head or the input embeddings, which the base ties")
            self.notes.append(f"The base ties lm_head to {self.tied}; {why}, so lm_head.weight is written separately "
                              "and config.json says tie_word_embeddings: false. The model computes what base+adapter "
                              "computed (peft's merge_and_unload would fold both into the one shared tensor).")
            self.warnings.append(self.notes[-1])
        elif self.tied and self.tied in self.recipes and self.mode == "shared":
            self.notes.append(f"The base ties lm_head to {self.tied}, and the adapters' changes to both were folded "
                              "into the one shared tensor, as peft's merge_and_unload does (tied_embeddings: shared). "
                              "Its outputs differ from base+adapter applied at inference time.")
            self.warnings.append(self.notes[-1])
        rows = {shape[0] for name, shape in self.shapes.items()
                if shape != self.base.tensors[self.recipes[name].source].shape}
        if rows:
            if len(rows) > 1:
                raise ModelError(f"the adapters resize the embeddings to different vocabularies ({sorted(rows)})",
                                 file=self.base.label)
            config["vocab_size"] = rows.pop()
            self.notes.append(f"The adapter resized the vocabulary to {config['vocab_size']} tokens.")
        return config


def check_targets(adapter: Adapter, modules: set[str]) -> None:
    """Every name in ``target_modules`` must match some module of the base (peft would fail to inject it)."""
    targets = adapter.settings.target_modules
    if targets is None or targets == "all-linear":
        return
    if isinstance(targets, Pattern):   # a regex, matched in bounded time (patterns.py)
        if not any(targets.fullmatch(m) for m in sorted(modules)):
            raise ModelError(f"target_modules '{targets.source}' matches no module of the base", file=adapter.label,
                             hint="the adapter was made for another architecture; use the base it was trained on")
        return
    for target in targets:
        if not any(m == target or m.endswith("." + target) for m in modules):
            raise ModelError(f"target module '{target}' is not in the base model", file=adapter.label,
                             hint="the adapter was made for another architecture; use the base it was trained on")
