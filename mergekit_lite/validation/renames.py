"""The names transformers gives a checkpoint's tensors when it loads them, and the parameters it builds from several
of them, so that such a model streams layer by layer (streamed.py) instead of being loaded whole.

Many checkpoints on the Hub name their tensors otherwise than the modules of transformers' model: the legacy
layout of vision-language models (``language_model.model.*``, ``vision_tower.*``; LLaVA, Mistral3, Gemma3, as
transformers 5 itself still saves them), GPT-NeoX's ``embed_out``, a base model saved without its
``model.`` prefix. And transformers 5 holds a mixture of experts' weights stacked, one tensor per layer
(``mlp.experts.gate_up_proj``), where the files hold one tensor per expert (``experts.3.w1.weight``).
transformers renames and stacks them while loading, by rules it keeps per model type (``conversion_mapping``);
we read the very same rules through its own functions rather than a copy of them, which would fall behind each
release. A stacking rule is followed only when its operations are stacks and concatenations (``STACKING``):
each stored tensor is then read straight into its place in the stack (``Fused.places``), which holds a layer's
experts once, where transformers' operations (``Fused.convert``) hold the parts, the stacks and the result;
before a rule is used, the two are compared on small stand-ins. Any other rule makes the model load whole, as
before. Before transformers 5 none of this exists and nothing is renamed.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch

STACKING = ("MergeModulelist", "Concatenate")   # the operations of the stacking rules followed here


@dataclass
class Fused:
    """A parameter transformers builds from several stored tensors (one per expert, say) by ``converter``'s
    operations; ``stored``: (source pattern, stored name) in the order transformers collects them; ``shapes``:
    each stored tensor's shape."""
    converter: Any
    stored: list[tuple[str, str]]
    shapes: dict[str, tuple[int, ...]]

    @property
    def names(self) -> list[str]:
        return [name for _, name in self.stored]

    def places(self, weight: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """(stored name, the view of ``weight`` it fills): each stored tensor is read straight into its place in
        the stack, so memory holds the parameter and no copy of its parts. transformers' operations
        (``convert``) build the same tensor from the parts, holding parts, stacks and result at once."""
        placed: list[tuple[str, torch.Tensor]] = []
        _place(self.layout, weight, placed)
        return placed

    def by_expert(self, shape: tuple[int, ...]) -> Optional[list[list[tuple[str, torch.Tensor]]]]:
        """For each index of the parameter's first dimension (an expert), the stored tensors that fill its slice, each
        with a ``meta`` view of the slice's shape giving its place (shape, strides, offset): so one expert's
        slice can be read on its own. None when a stored tensor spans two experts or some slice is not filled."""
        if not shape or shape[0] < 1:
            return None
        per = math.prod(shape[1:])
        slices: list[list[tuple[str, torch.Tensor]]] = [[] for _ in range(shape[0])]
        for name, view in self.places(torch.empty(shape, device="meta")):
            index, offset = divmod(view.storage_offset(), per)
            last = offset + sum((size - 1) * stride for size, stride in zip(view.shape, view.stride()))
            if last >= per or view.numel() == 0:
                return None
            slices[index].append((name, torch.empty(shape[1:], device="meta").as_strided(
                view.shape, view.stride(), offset)))
        if any(sum(view.numel() for _, view in parts) != per for parts in slices):
            return None
        return slices

    @functools.cached_property
    def layout(self) -> tuple:
        """The parameter as a tree of ("leaf", name, shape), ("stack", dim, children), ("cat", dim, children),
        as ``STACKING``'s operations put it together: MergeModulelist stacks each pattern's tensors, Concatenate
        joins the patterns' in the rule's order."""
        collected: dict[str, Any] = {}
        for pattern, name in self.stored:
            collected.setdefault(pattern, []).append(("leaf", name, self.shapes[name]))
        for operation in self.converter.operations:
            kind = type(operation).__name__
            if kind == "MergeModulelist":
                collected = {key: ("stack", operation.dim, items) for key, items in collected.items()}
            elif kind == "Concatenate":
                parts = [collected[pattern] for pattern in self.converter.source_patterns if pattern in collected]
                collected = {"": ("cat", operation.dim, [p for part in parts for p in _as_list(part)])}
            else:
                raise ValueError(f"not a stacking operation: {kind}")
        (node,) = collected.values()
        if isinstance(node, list):
            raise ValueError("the rule leaves a list of tensors, not one")
        return node

    def convert(self, tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
        """The parameter from its stored tensors ({stored name: tensor}) by transformers' own operations."""
        collected: dict[str, Any] = {}
        for pattern, stored in self.stored:
            collected.setdefault(pattern, []).append(tensors[stored])
        for operation in self.converter.operations:
            collected = operation.convert(collected, source_patterns=self.converter.source_patterns,
                                          target_patterns=self.converter.target_patterns, full_layer_name=name,
                                          missing_keys=None)
        (value,) = collected.values()
        return value


def _as_list(part: Any) -> list:
    return part if isinstance(part, list) else [part]


def _shape(node: tuple) -> list[int]:
    if node[0] == "leaf":
        return list(node[2])
    kind, dim, children = node
    shape = _shape(children[0])
    if kind == "stack":
        shape.insert(dim if dim >= 0 else len(shape) + 1 + dim, len(children))
    else:
        shape[dim] = sum(_shape(child)[dim] for child in children)
    return shape


def _place(node: tuple, view: torch.Tensor, placed: list) -> None:
    if node[0] == "leaf":
        placed.append((node[1], view))
        return
    kind, dim, children = node
    offset = 0
    for index, child in enumerate(children):
        if kind == "stack":
            _place(child, view.select(dim, index), placed)
        else:
            size = _shape(child)[dim]
            _place(child, view.narrow(dim, offset, size), placed)
            offset += size


def loaded_names(model: torch.nn.Module, stored: dict) -> dict[str, Union[str, Fused]]:
    """{name of a parameter of ``model``: the stored name transformers loads into it, or the ``Fused`` stored
    tensors it builds it from}, for the parameters it does not load from a stored tensor of their own name.
    ``model``: the skeleton, before peft wraps it; ``stored``: {stored name: info with ``shape``}."""
    params = dict(model.named_parameters(remove_duplicate=False))
    try:
        found = _by_transformers_rules(model, stored, params)
    except Exception:   # noqa: BLE001 - transformers 4 (no such rules), rules it cannot apply here, or internals
        return {}       # that changed: the model loads whole, as before
    return {name: source for name, source in found.items()
            if not isinstance(source, Fused) or _builds(source, params[name], name)}


def _by_transformers_rules(model: torch.nn.Module, stored: dict, params: dict) -> dict[str, Union[str, Fused]]:
    """transformers' loading applied to the stored names only: every renaming rule, then at most one stacking
    rule, adding or dropping the base model's prefix, in the order its loader goes through the names."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, dot_natural_key, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    prefix = getattr(model, "base_model_prefix", None) or None
    found: dict[str, Union[str, Fused]] = {}
    for name in sorted(stored, key=dot_natural_key):   # transformers' order: experts 0, 1, ..., 10
        loaded, pattern = rename_source_key(name, renamings, converters, prefix, params)
        if loaded == name or loaded not in params:
            continue
        if pattern is None:
            found.setdefault(loaded, name)
            continue
        converter = next(c for c in converters if pattern in c.source_patterns)
        fused = found.setdefault(loaded, Fused(converter, [], {}))
        if isinstance(fused, Fused):
            fused.stored.append((pattern, name))
            fused.shapes[name] = tuple(stored[name].shape)
    return found


def _builds(fused: Fused, param: torch.Tensor, name: str) -> bool:
    """Whether ``fused`` stacks plain tensors into exactly ``param``'s shape, placing each where transformers'
    own operations put it: its rule has one target and only ``STACKING`` operations, and on small stand-ins
    (each size cut to at most 3, every value distinct) ``places`` fills in what ``convert`` builds."""
    converter = fused.converter
    if len(converter.target_patterns) != 1 or any(type(op).__name__ not in STACKING for op in converter.operations):
        return False
    try:
        if _shape(fused.layout) != list(param.shape):
            return False
        small = Fused(converter, fused.stored, {n: tuple(min(3, size) for size in shape)
                                                for n, shape in fused.shapes.items()})
        sizes = [math.prod(small.shapes[stored]) for stored in small.names]
        values = torch.arange(sum(sizes), dtype=torch.float32).split(sizes)   # every value distinct
        parts = {stored: v.view(small.shapes[stored]) for stored, v in zip(small.names, values)}
        expected = small.convert(parts, name)
        built = torch.full(_shape(small.layout), -1.0)
        for stored, view in small.places(built):
            view.copy_(parts[stored])
        return torch.equal(built, expected)
    except Exception:   # noqa: BLE001 - a rule these stand-ins do not fit: the model loads whole
        return False

