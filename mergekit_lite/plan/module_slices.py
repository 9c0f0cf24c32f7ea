"""Layer stacking inside one module of a ``modules:`` merge (``modules: {NAME: {slices: [...]}}``), e.g. a
deeper text decoder of a VLM whose vision tower is merged whole.

mergekit's rules, which specs written for mergekit rely on:
- the module's layers are the slices' layers in order, renumbered from 0, with stacking's rules (stacking.py):
  a slice with several sources is merged layer by layer, gradients restart in each slice;
- the module's tensors outside its layers: embeddings (and any other) from the first slice's sources, the
  final norm and ``lm_head`` from the last slice's (mergekit's "pre" and "post" weights), all at t = 0;
- parameters: a source's own, then its slice's, then the module's, then the top-level ones;
- the output config's layer count of the module (``text_config.num_hidden_layers``) is the sum of the ranges.
  mergekit sets it only for the modules of its architecture files; for a module it infers (LLaVA's
  ``model.language_model.layers``) it leaves the input's count, which does not load, so we set it there too.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

from ..architecture import OUTPUT_EMBEDDING, layer_index, layer_stack, outside_position, sub_config
from ..errors import ModelError
from ..sources.checkpoint import Checkpoint
from ..spec.references import ModelRef
from ..spec.schema import Module, Spec
from ..strategy import Strategy
from .jobs import Dtypes, TensorJob
from .remap import TokenRemap
from .stacking import PlannedSlice, Stack, _check_same_naming, _layer_jobs, _outside_jobs, _plan_slice, restack_config


def module_stack(checkpoint: Checkpoint, module: str, owner: Callable[[str], str], where: str) -> Stack:
    """The module's tensors of one model, sorted into before / per layer / after."""
    prefixes: dict[str, str] = {}
    by_layer: dict[int, list[str]] = {}
    before: list[str] = []
    after: list[str] = []
    for name in checkpoint.tensors:
        if owner(name) != module:
            continue
        prefix = layer_stack(name)
        if prefix is not None:
            prefixes.setdefault(prefix, name)
            by_layer.setdefault(layer_index(name) or 0, []).append(name)
        elif outside_position(name) == "after":
            after.append(name)
        else:
            before.append(name)
    if len(prefixes) > 1:
        (_, first), (_, second) = list(prefixes.items())[:2]
        raise ModelError(f"module '{module}' has two stacks of layers ('{first}' and '{second}'), so a layer "
                         "number is ambiguous", file=checkpoint.label, where=where,
                         hint="name the modules as mergekit infers them (one per stack of layers)")
    count = max(by_layer) + 1 if by_layer else 0
    missing = [i for i in range(count) if i not in by_layer]
    if missing:
        raise ModelError(f"module '{module}' has no tensors for layer {missing[0]} but has layer {count - 1}",
                         file=checkpoint.label, where=where, hint="the checkpoint is incomplete")
    return Stack(checkpoint, next(iter(prefixes), None), [by_layer[i] for i in range(count)], before, after)


def module_slice_jobs(spec: Spec, strategy: Strategy, module: Module, checkpoints: dict[ModelRef, Checkpoint],
                      dtypes: Dtypes, owner: Callable[[str], str], config: dict,
                      remap: Optional[TokenRemap] = None) -> list[TensorJob]:
    """The jobs of a module given by slices; sets the module's layer count in ``config``. ``owner``: the module
    of a tensor name (modules.py)."""
    assert module.slices
    stacks: dict[ModelRef, Stack] = {}
    for piece in module.slices:
        for source in piece.sources:
            if source.ref not in stacks:
                stacks[source.ref] = module_stack(checkpoints[source.ref], module.name, owner, f"{source.where}.model")
    # the module's parameters sit between the slice's and the top-level ones
    pieces = [dataclasses.replace(p, parameters={**module.parameters, **p.parameters}) for p in module.slices]
    slices = [_plan_slice(spec, strategy, piece, checkpoints, stacks) for piece in pieces]
    _check_same_naming(slices, stacks)
    head = owner(OUTPUT_EMBEDDING) == module.name
    jobs = _outside_jobs(spec, strategy, slices[0], stacks, "before", dtypes, remap=remap, head=head)
    out_layer = 0
    for planned in slices:
        for k in range(planned.length):
            jobs += _layer_jobs(spec, strategy, planned, stacks, k, out_layer, dtypes)
            out_layer += 1
    jobs += _outside_jobs(spec, strategy, slices[-1], stacks, "after", dtypes, first=slices[0], remap=remap,
                          head=head)
    key = _count_key(slices[0], stacks, config)
    if key is not None:
        restack_config(config, key, slices, stacks, out_layer)
    return jobs


def _count_key(planned: PlannedSlice, stacks: dict[ModelRef, Stack], config: dict) -> Optional[str]:
    """The config key of the module's layer count: its sub-config's (``text_config.num_hidden_layers``), or,
    for a model with one stack of layers, the top-level one; None for a module without layers in a sub-config."""
    from ..architecture import layer_count_key

    stack = stacks[planned.lead.ref]
    if not stack.layers:
        return None
    found = sub_config(stack.layers[0][0], config)
    if found is None:
        return layer_count_key(config)
    key = f"{found[0]}.num_hidden_layers"
    sub = config.get(found[0])
    if not isinstance(sub, dict) or not isinstance(sub.get("num_hidden_layers"), int):
        raise ModelError(f"config.json's {found[0]} has no num_hidden_layers, so the stacked module's layer count "
                         "cannot be written", file=planned.lead.checkpoint.label,
                         hint="merge this module whole with models: instead")
    return key
