"""Layer stacking (``slices:``): the output's layers are layer ranges of the inputs, renumbered.

mergekit's rules, which specs written for mergekit rely on:
- the output's layers are the slices' layers in order, numbered 0, 1, 2, ...; a range may repeat or
  overlap another (depth upscaling), and every repeat is written as its own tensor;
- a slice with several sources (of equal length) is merged layer by layer with the merge method, with the
  slice's ``base_model`` (else the top-level one); gradients restart in each slice (layer k of an L-layer
  slice sits at t = k / (L - 1), or 1 when L == 1);
- embeddings and other tensors before the layers come from the first slice's sources, the final norm and
  ``lm_head`` from the last slice's, both at t = 0;
- parameters: a source's own, then its slice's, then the top-level ones.

Which layer a tensor belongs to is read from its name (architecture.py); a tensor we cannot place is an error
naming it, never a silent skip. Everything here reads headers and configs only.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..architecture import (
    LAYER_COUNT_KEYS,
    OUTPUT_EMBEDDING,
    PER_LAYER_KEYS,
    get_config_value,
    layer_count_key,
    layer_index,
    layer_position,
    layer_stack,
    outside_position,
    rename_layer,
    set_config_value,
    sibling_key,
    tied_source,
)
from ..errors import ModelError, SpecError
from ..sources.checkpoint import Checkpoint
from ..spec.references import ModelRef
from ..spec.schema import Parameters, Slice, Spec
from ..strategy import Strategy
from .jobs import Dtypes, Input, Planned, Source, TensorJob, check_input_count, make_job, resolve_params
from .remap import TokenRemap
from .vocabulary import Vocabulary, build_vocabulary, set_vocab_size, unchanged_vocabulary
from .whole_models import source_name

NAMING = ".layers.N., .h.N., .layer.N. or .blocks.N."


@dataclass
class Stack:
    """One model's tensors as stacking sees them: before the layers, per layer, after the layers."""

    checkpoint: Checkpoint
    prefix: Optional[str]          # the name up to the layer number, e.g. "model.layers."; None: no layers
    layers: list[list[str]]        # tensor names of each layer, in file order
    before: list[str]
    after: list[str]

    @property
    def num_layers(self) -> int:
        return len(self.layers)


@dataclass
class SliceInput(Input):
    start: int = 0                 # first source layer of the slice


@dataclass
class PlannedSlice:
    """One slice after its checks: which source is the base, which are inputs, how many layers."""

    piece: Slice
    inputs: list[SliceInput]
    base: Optional[SliceInput]
    lead: SliceInput               # whose tensor names the slice's output layers take (the base, else the first)
    length: int

    @property
    def models(self) -> list[SliceInput]:
        return self.inputs + ([self.base] if self.base is not None else [])


def read_stack(checkpoint: Checkpoint, where: str) -> Stack:
    """Sort a model's tensors into before / layers / after; any tensor that fits none is an error."""
    prefixes: dict[str, str] = {}
    by_layer: dict[int, list[str]] = {}
    before: list[str] = []
    after: list[str] = []
    for name in checkpoint.tensors:
        prefix = layer_stack(name)
        if prefix is not None:
            prefixes.setdefault(prefix, name)
            by_layer.setdefault(layer_index(name), []).append(name)
            continue
        position = outside_position(name)
        if position is None:
            raise ModelError(f"cannot place tensor '{name}' when stacking layers: it is not in a numbered layer "
                             f"({NAMING}) nor a known embedding, final norm or head", file=checkpoint.label,
                             where=where, hint="slices need models whose layers are numbered in their tensor "
                                               "names; merge this model whole with models: instead")
        (before if position == "before" else after).append(name)
    if len(prefixes) > 1:
        (a, first), (b, second) = list(prefixes.items())[:2]
        raise ModelError(f"has two stacks of layers ('{first}' and '{second}'), so a layer number is ambiguous",
                         file=checkpoint.label, where=where,
                         hint="slices work on models with one stack of layers (decoder-only language models)")
    count = max(by_layer) + 1 if by_layer else 0
    missing = [i for i in range(count) if i not in by_layer]
    if missing:
        raise ModelError(f"has no tensors for layer {missing[0]} but has layer {count - 1}", file=checkpoint.label,
                         where=where, hint="the checkpoint is incomplete")
    key = layer_count_key(checkpoint.config)
    if key is not None and get_config_value(checkpoint.config, key) != count:
        raise ModelError(f"config.json says {key}: {get_config_value(checkpoint.config, key)} but the tensor names "
                         f"have {count} layers", file=checkpoint.label, where=where,
                         hint="the config and the weights disagree; fix config.json or the checkpoint")
    return Stack(checkpoint, next(iter(prefixes), None), [by_layer[i] for i in range(count)], before, after)


class Stacking:
    """The Layout of ``slices:`` merges."""

    def companions(self, spec: Spec, extra: Sequence[Strategy]) -> list[Strategy]:
        return []

    def plan(self, spec: Spec, strategy: Strategy, checkpoints: dict[ModelRef, Checkpoint], dtypes: Dtypes,
             extra: Sequence[Strategy]) -> Planned:
        stacks: dict[ModelRef, Stack] = {}
        for piece in spec.slices or ():
            for source in piece.sources:
                if source.ref not in stacks:
                    stacks[source.ref] = read_stack(checkpoints[source.ref], f"{source.where}.model")
        slices = [_plan_slice(spec, strategy, piece, checkpoints, stacks) for piece in spec.slices or ()]
        _check_same_naming(slices, stacks)
        remap, vocabulary = token_remap(spec, checkpoints, dtypes.load)
        jobs = _outside_jobs(spec, strategy, slices[0], stacks, "before", dtypes, remap=remap)
        out_layer = 0
        for planned in slices:
            for k in range(planned.length):
                jobs += _layer_jobs(spec, strategy, planned, stacks, k, out_layer, dtypes)
                out_layer += 1
        jobs += _outside_jobs(spec, strategy, slices[-1], stacks, "after", dtypes, first=slices[0], remap=remap)
        reference = checkpoints[spec.base_model or spec.slices[0].sources[0].ref]
        config = _stacked_config(reference, slices, stacks, out_layer)
        if vocabulary is not None:
            set_vocab_size(config, vocabulary.size)
        return Planned(jobs, config, reference, vocabulary)


def token_remap(spec: Spec, checkpoints: dict[ModelRef, Checkpoint], load_dtype: Optional[torch.dtype],
                lead: Optional[ModelRef] = None) -> tuple[Optional[TokenRemap], Optional[Vocabulary]]:
    """A tokenizer merge's output vocabulary over every merged model (remap.py), when the spec asks for one
    that changes any row (not ``source: base`` over models that already share its vocabulary). ``lead``: the
    model whose tokenizer ``source: base`` means (default: the base, else the first model)."""
    if spec.tokenizer is None:
        return None, None
    models = [ref for ref, where in spec.references() if not where.startswith("tokenizer")]
    lead = lead or spec.base_model or models[0]
    if unchanged_vocabulary(spec.tokenizer, checkpoints, models, lead, load_dtype):
        return None, None
    vocabulary = build_vocabulary(spec.tokenizer, checkpoints, models, lead)
    return TokenRemap(vocabulary, models, spec.base_model), vocabulary


def _plan_slice(spec: Spec, strategy: Strategy, piece: Slice, checkpoints: dict[ModelRef, Checkpoint],
                stacks: dict[ModelRef, Stack]) -> PlannedSlice:
    """Check one slice's ranges, lengths and inputs; sort its sources into base and inputs."""
    sources = []
    for source in piece.sources:
        start, end = source.layer_range
        count = stacks[source.ref].num_layers
        if end > count:
            raise SpecError(f"[{start}, {end}) goes beyond the {count} layers of {checkpoints[source.ref].label}",
                            where=f"{source.where}.layer_range", file=spec.file,
                            hint=f"its layers are 0..{count - 1}; ranges are half-open, so [0, {count}) is all of "
                                 "them" if count else "the model has no numbered layers")
        sources.append(SliceInput(source.ref, checkpoints[source.ref], source.parameters, source.where, start))
    lengths = [s.layer_range[1] - s.layer_range[0] for s in piece.sources]
    for j, length in enumerate(lengths[1:], 1):
        if length != lengths[0]:
            raise SpecError(f"{length} layers, but sources[0] of this slice has {lengths[0]}",
                            where=f"{piece.sources[j].where}.layer_range", file=spec.file,
                            hint="the sources of a slice are merged layer by layer, so their ranges must have "
                                 "the same length; put layers taken as they are in a slice of their own")
    base_ref = piece.base_model or spec.base_model
    base = None
    if strategy.base != "input" and base_ref is not None:
        matches = [s for s in sources if s.ref == base_ref]
        if len(matches) != 1:
            raise SpecError(f"the base model {base_ref} is " + ("not among this slice's sources" if not matches
                                                                   else "more than one of this slice's sources"),
                            where=f"{piece.where}.sources", file=spec.file,
                            hint=f"{strategy.name} merges each slice's sources onto its base: list the base once "
                                 "among the sources, with a layer_range of the same length")
        base = matches[0]
    elif strategy.base == "required":
        raise SpecError(f"{strategy.name} needs a base_model", where=f"{piece.where}.base_model", file=spec.file,
                        hint="set base_model: at the top level or in this slice, and list it among the sources")
    inputs = [s for s in sources if s is not base]
    check_input_count(strategy, len(inputs), base is not None, f"{piece.where}.sources", spec.file)
    return PlannedSlice(piece, inputs, base, base or inputs[0], lengths[0])


def _check_same_naming(slices: list[PlannedSlice], stacks: dict[ModelRef, Stack]) -> None:
    """Every source must number its layers the same way, or renumbering would mix architectures."""
    first = slices[0].lead
    prefix = stacks[first.ref].prefix
    for planned in slices:
        for model in planned.models:
            other = stacks[model.ref].prefix
            if other != prefix:
                raise ModelError(f"its layers are named '{other}N.' but those of {first.checkpoint.label} are "
                                 f"'{prefix}N.'", file=model.checkpoint.label, where=model.where,
                                 hint="stack layers of models of one architecture")


def _layer_jobs(spec: Spec, strategy: Strategy, planned: PlannedSlice, stacks: dict[ModelRef, Stack], k: int,
                out_layer: int, dtypes: Dtypes) -> list[TensorJob]:
    """Output layer ``out_layer``: layer ``start + k`` of each source of the slice, merged."""
    lead_names = stacks[planned.lead.ref].layers[planned.lead.start + k]
    for model in planned.models:
        own = stacks[model.ref].layers[model.start + k]
        expected = {rename_layer(n, model.start + k) for n in lead_names}
        extra = sorted(set(own) - expected)
        if extra:
            raise ModelError(f"has tensor '{extra[0]}' that layer {planned.lead.start + k} of "
                             f"{planned.lead.checkpoint.label} does not have", file=model.checkpoint.label,
                             where=model.where, hint="stack or merge layers of models of one architecture")
    t = layer_position(k, planned.length)
    levels: tuple[Parameters, ...] = (planned.piece.parameters, spec.parameters)
    jobs = []
    for lead_name in lead_names:
        name = rename_layer(lead_name, out_layer)
        sources = {id(m): Source(m.checkpoint, source_name(m, rename_layer(lead_name, m.start + k)))
                   for m in planned.models}
        own_names = [rename_layer(lead_name, m.start + k) for m in planned.inputs]
        params = resolve_params(strategy, levels, planned.inputs, name, t, own_names)
        jobs.append(make_job(name, tuple(sources[id(m)] for m in planned.inputs),
                             sources[id(planned.base)] if planned.base is not None else None,
                             sources[id(planned.lead)], params, out_layer, t, dtypes.load, dtypes.out,
                             strategy=strategy))
    return jobs


def _outside_jobs(spec: Spec, strategy: Strategy, planned: PlannedSlice, stacks: dict[ModelRef, Stack],
                  position: str, dtypes: Dtypes, first: Optional[PlannedSlice] = None,
                  remap: Optional[TokenRemap] = None, head: bool = True) -> list[TensorJob]:
    """Tensors before the layers (from the first slice) or after them (from the last), at t = 0; ``head``:
    whether ``lm_head`` may be added (not for a module of a VLM that does not hold it)."""
    def outside(model: SliceInput) -> list[str]:
        stack = stacks[model.ref]
        return stack.before if position == "before" else stack.after

    names = list(outside(planned.lead))
    if position == "after" and head and OUTPUT_EMBEDDING not in names and _needs_head(planned, first):
        names.append(OUTPUT_EMBEDDING)
    for model in planned.models:
        extra = sorted(set(outside(model)) - set(names))
        if extra:
            raise ModelError(f"has tensor '{extra[0]}' that {planned.lead.checkpoint.label} does not have",
                             file=model.checkpoint.label, where=model.where,
                             hint="stack or merge layers of models of one architecture")
    levels: tuple[Parameters, ...] = (planned.piece.parameters, spec.parameters)
    jobs = []
    for name in names:
        sources = {id(m): Source(m.checkpoint, source_name(m, name)) for m in planned.models}
        if remap is not None:   # embeddings and lm_head in the output vocabulary's order
            sources = remap.by_input(name, sources, {id(m): m.ref for m in planned.models}, dtypes.load,
                                     planned.piece.base_model or spec.base_model)
        params = resolve_params(strategy, levels, planned.inputs, name, 0.0)
        jobs.append(make_job(name, tuple(sources[id(m)] for m in planned.inputs),
                             sources[id(planned.base)] if planned.base is not None else None,
                             sources[id(planned.lead)], params, None, 0.0, dtypes.load, dtypes.out,
                             strategy=strategy))
    return jobs


def _needs_head(last: PlannedSlice, first: Optional[PlannedSlice]) -> bool:
    """Whether the output writes ``lm_head``: when an input of the last slice has one (as in models mode), and
    when the last slice's models tie their head to their embeddings but the output's embeddings come from other
    models (the first slice's): tying would then give the output the first slice's head. (mergekit ties.)"""
    if any(OUTPUT_EMBEDDING in m.checkpoint.tensors for m in last.models):
        return True
    other_embeddings = first is not None and {m.ref for m in last.models} != {m.ref for m in first.models}
    return other_embeddings and all(tied_source(OUTPUT_EMBEDDING, m.checkpoint.tensors) for m in last.models)


def _stacked_config(reference: Checkpoint, slices: list[PlannedSlice], stacks: dict[ModelRef, Stack],
                    total: int) -> dict:
    """The reference config with the layer count set to the sum of the ranges and per-layer lists re-sliced."""
    config = copy.deepcopy(reference.config)
    if not config:
        return config
    key = layer_count_key(config)
    if key is None:
        raise ModelError("config.json has no layer count we know, so the stacked model's count cannot be written",
                         file=reference.label, hint="expected one of: " + ", ".join(LAYER_COUNT_KEYS))
    restack_config(config, key, slices, stacks, total)
    return config


def restack_config(config: dict, key: str, slices: list[PlannedSlice], stacks: dict[ModelRef, Stack],
                   total: int) -> None:
    """Set the layer count ``key`` to ``total`` and re-slice the per-layer lists beside it."""
    set_config_value(config, key, total)
    for list_key in (sibling_key(key, name) for name in PER_LAYER_KEYS):
        if get_config_value(config, list_key) is None:
            continue
        stacked: list = []
        for planned in slices:
            pieces = [_per_layer(m, list_key, planned.length, stacks[m.ref].num_layers) for m in planned.models]
            for model, piece in zip(planned.models, pieces):
                if piece != pieces[0]:
                    raise ModelError(f"config.json's {list_key} for layers {model.start}.."
                                     f"{model.start + planned.length - 1} is {piece}, but the slice's other source "
                                     f"has {pieces[0]}", file=model.checkpoint.label, where=model.where,
                                     hint="merge layers of the same kind (e.g. full with full attention)")
            stacked += pieces[0]
        set_config_value(config, list_key, stacked)


def _per_layer(model: SliceInput, key: str, length: int, num_layers: int) -> list:
    """The entries of a per-layer config list for the slice's layers of ``model``."""
    values = get_config_value(model.checkpoint.config, key)
    if not isinstance(values, list) or len(values) != num_layers:
        raise ModelError(f"config.json's {key} is not a list with one entry for each of its {num_layers} layers",
                         file=model.checkpoint.label, where=model.where,
                         hint="the output's config.json needs an entry for every stacked layer")
    return values[model.start:model.start + length]
