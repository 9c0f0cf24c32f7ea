"""The names transformers gives a checkpoint's tensors when it loads them, and the parameters it builds from several
of them, so that such a model streams layer by layer (streamed.py) instead of being loaded whole.

Many checkpoints on the Hub name their tensors otherwise than the modules of transformers' model: the legacy
layout of vision-language models (``language_model.model.*``, ``vision_tower.*``; LLaVA, Mistral3, Gemma3, as
transformers 5 itself still saves them), GPT-NeoX's ``embed_out``, a base model saved without its
``model.`` prefix. And transformers 5 holds a mixture of experts' weights stacked, one tensor per layer
(``mlp.experts.gate_up_proj``), where the files hold one tensor per expert (``experts.3.w1.weight``).
transformers renames and stacks them while loading, by rules it keeps per model type (``conversion_mapping``);
we apply the very same rules through its own functions and operations rather than a copy of them, which would
fall behind each release. A stacking rule is used only when its operations are plain tensor reshuffles
(``STACKING``); any other makes the model load whole, as before. Before transformers 5 none of this exists and
nothing is renamed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch

STACKING = ("MergeModulelist", "Concatenate", "Transpose")   # operations of a stacking rule run here


@dataclass
class Fused:
    """A parameter transformers builds from several stored tensors (one per expert, say) by ``converter``'s
    operations; ``stored``: (source pattern, stored name) in the order transformers collects them."""
    converter: Any
    stored: list[tuple[str, str]]

    @property
    def names(self) -> list[str]:
        return [name for _, name in self.stored]

    def build(self, read: Callable[[str], torch.Tensor], name: str) -> torch.Tensor:
        """The parameter from its stored tensors (``read(stored name)``), as transformers builds it while loading.
        Holds the stored tensors and the result at once, at most twice the parameter."""
        collected: dict[str, Any] = {}
        for pattern, stored in self.stored:
            collected.setdefault(pattern, []).append(read(stored))
        for operation in self.converter.operations:
            collected = operation.convert(collected, source_patterns=self.converter.source_patterns,
                                          target_patterns=self.converter.target_patterns, full_layer_name=name,
                                          missing_keys=None)
        (value,) = collected.values()
        return value.contiguous()


def loaded_names(model: torch.nn.Module, stored: dict) -> dict[str, Union[str, Fused]]:
    """{name of a parameter of ``model``: the stored name transformers loads into it, or the ``Fused`` stored
    tensors it builds it from}, for the parameters it does not load from a stored tensor of their own name.
    ``model``: the skeleton, before peft wraps it; ``stored``: {stored name: info with ``shape``}."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, dot_natural_key, rename_source_key
    except ImportError:   # transformers 4: no per-model rules to read
        return {}
    try:
        transforms = get_model_conversion_mapping(model)
    except Exception:   # noqa: BLE001 - a rule transformers cannot build for this model: it loads whole, as before
        return {}
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    params = dict(model.named_parameters(remove_duplicate=False))
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
        fused = found.setdefault(loaded, Fused(converter, []))
        if isinstance(fused, Fused):
            fused.stored.append((pattern, name))
    return {name: source for name, source in found.items()
            if not isinstance(source, Fused) or _builds(source, params[name], stored, name)}


def _builds(fused: Fused, param: torch.Tensor, stored: dict, name: str) -> bool:
    """Whether ``fused`` stacks plain tensors into exactly ``param``'s shape: its rule has one target and only
    ``STACKING`` operations, tried on empty (``meta``) tensors of the stored shapes."""
    converter = fused.converter
    if len(converter.target_patterns) != 1 or any(type(op).__name__ not in STACKING for op in converter.operations):
        return False
    try:
        built = fused.build(lambda source: torch.empty(tuple(stored[source].shape), device="meta"), name)
    except Exception:   # noqa: BLE001 - shapes transformers' operation refuses: the model loads whole
        return False
    return tuple(built.shape) == tuple(param.shape)


def too_large(model: torch.nn.Module, names: dict, limit: Optional[int], held: int) -> bool:
    """Whether a module with stacked parameters (``names``: {id(parameter): its stored name or Fused}) needs more
    than ``limit`` bytes: its parameters in float32 plus, while the largest is built, its stored tensors (as many
    values again); ``held``: 2 when the next layer's are read while it runs, else 1."""
    if limit is None:
        return False
    for module in model.modules():
        owned = [p for p in module._parameters.values() if p is not None and isinstance(names.get(id(p)), Fused)]
        if owned:
            values = sum(p.numel() for p in module._parameters.values() if p is not None and id(p) in names)
            if 4 * (held * values + max(p.numel() for p in owned)) > limit:
                return True
    return False
