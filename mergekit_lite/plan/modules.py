"""The layout of ``modules:`` (mergekit's multi-module merges): each module of a multimodal model (its text
decoder, vision tower, projector) is merged from its own list of models, with its own parameters.

mergekit's rules, which specs written for mergekit rely on:
- a module's tensors are merged as a ``models:`` merge of that module's models, with the top-level
  ``base_model``; parameters resolve model > module > top level;
- module names are mergekit's: the named modules of its modular architectures (``text_decoder``,
  ``vision_tower``, ``multi_modal_projector``: architecture.NAMED_MODULES), or, for an architecture it has
  no file for (LLaVA), the modules it infers: one per stack of layers, named by its prefix
  (``model.language_model.layers``), plus ``default`` for every other tensor (a single stack is all ``default``);
- a gradient spans each stack of layers on its own; tensors outside the layers sit at t = 0.

Where mergekit would write something else than a loadable model, this is an error instead: a module the
model does not have, and a module of the model that the spec does not list (mergekit leaves its tensors
out). A module given by ``slices`` stacks layers inside the module (module_slices.py).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Callable, Optional, Sequence

from ..architecture import DEFAULT_MODULE, NAMED_MODULES, layer_stack, module_of, stack_layers
from ..errors import did_you_mean
from ..sources.checkpoint import Checkpoint
from ..spec.references import ModelRef
from ..spec.schema import Module, Spec
from ..strategy import Strategy
from .jobs import Dtypes, Input, Planned
from .module_slices import module_slice_jobs
from .stacking import token_remap
from .vocabulary import set_vocab_size
from .whole_models import output_names, whole_model_inputs, whole_model_job

NAMED = tuple(name for name, _ in NAMED_MODULES)


class Modules:
    """The Layout of ``modules:`` merges."""

    def companions(self, spec: Spec, extra: Sequence[Strategy]) -> list[Strategy]:
        return []

    def plan(self, spec: Spec, strategy: Strategy, checkpoints: dict[ModelRef, Checkpoint], dtypes: Dtypes,
             extra: Sequence[Strategy]) -> Planned:
        assert spec.modules is not None
        merges: dict[str, tuple[Module, list[Input], Optional[Input], Input]] = {}
        for module in spec.modules:   # each module is a models: merge of its own models, or stacked slices
            if module.slices is None:
                scoped = dataclasses.replace(spec, models=module.models, modules=None)
                merges[module.name] = (module, *whole_model_inputs(scoped, strategy, checkpoints))
        lead_ref = _lead(spec, merges)
        lead = checkpoints[lead_ref]
        everyone = [m for _, inputs, base, _ in merges.values() for m in (*inputs, *([base] if base else []))]
        names = output_names(lead, everyone)
        owners, owner = _owners(spec, names, lead.label)
        num_layers = stack_layers(names)
        config = copy.deepcopy(lead.config)
        remap, vocabulary = token_remap(spec, checkpoints, dtypes.load, lead_ref)
        if vocabulary is not None:
            set_vocab_size(config, vocabulary.size)
        jobs = []
        for name in names:
            if owners[name] not in merges:
                continue
            module, inputs, base, module_lead = merges[owners[name]]
            jobs.append(whole_model_job(spec, strategy, inputs, base, module_lead, name,
                                        num_layers.get(layer_stack(name) or "", 0), dtypes, remap,
                                        shared=(module.parameters, spec.parameters)))
        for module in spec.modules:
            if module.slices is not None:
                jobs += module_slice_jobs(spec, strategy, module, checkpoints, dtypes, owner, config, remap)
        return Planned(jobs, config, lead, vocabulary)


def _lead(spec: Spec, merges: dict) -> ModelRef:
    """Whose tensor names, config and tokenizer the output takes: the base, else the first module's first model."""
    first = spec.modules[0] if spec.modules else None
    if spec.base_model is not None:
        return spec.base_model
    if first is not None and first.name in merges:
        return merges[first.name][3].ref
    return spec.all_slices()[0].sources[0].ref




def _owners(spec: Spec, names: list[str], label: str) -> tuple[dict[str, str], Callable[[str], str]]:
    """The listed module each output tensor belongs to (and the rule for any tensor name); a SpecError for a module the model does not have, a tensor in no module, or a module
    of the model the spec does not list."""
    assert spec.modules is not None
    listed = [module.name for module in spec.modules]
    stacks = {module_of(name, False) for name in names} - {DEFAULT_MODULE}
    inferred = {name: module_of(name, False) if len(stacks) > 1 else DEFAULT_MODULE for name in names}
    named_owners = {name: module_of(name, True) for name in names}
    have_inferred = list(dict.fromkeys(inferred.values()))
    have_named = [m for m in NAMED if m in named_owners.values()]
    # the naming most of the listed modules use (a typo in one must not switch the naming)
    owners = inferred if sum(m in have_inferred for m in listed) >= sum(m in have_named for m in listed) \
        else named_owners
    have = have_inferred if owners is inferred else have_named
    for module in spec.modules:
        if module.name not in have:
            choices = have_named + have_inferred
            raise spec.error(f"{label} has no module '{module.name}'." + did_you_mean(module.name, choices),
                             where=module.where, hint=f"its modules by role: {', '.join(have_named) or 'none'}; as "
                                                      f"mergekit infers them: {', '.join(have_inferred)}")
    unplaced = [name for name, owner in owners.items() if owner == ""]
    if unplaced:
        raise spec.error(f"tensor '{unplaced[0]}' of {label} belongs to none of the modules "
                         f"{', '.join(have_named)}", where="modules",
                         hint="name the modules as mergekit infers them for this model: " + ", ".join(have_inferred))
    for module in have:
        if module not in listed:
            count = sum(owner == module for owner in owners.values())
            example = next(name for name, owner in owners.items() if owner == module)
            raise spec.error(f"the model's module '{module}' ({count} tensors, e.g. '{example}') is not listed, so "
                             "the output would lack its tensors (mergekit leaves them out)", where="modules",
                             hint=f"add modules.{module} with the models to merge into it")
    named = owners is named_owners
    several = len(stacks) > 1

    def owner(name: str) -> str:
        return module_of(name, True) if named else module_of(name, False) if several else DEFAULT_MODULE
    return owners, owner
