"""The default layout (``models:``): one output tensor per tensor of the reference model, same name and shape.

The reference model is the base, else the first model; its tensor names, config and tokenizer are used.
Every input must supply every one of those tensors; a tied model supplies its input embedding for a
missing ``lm_head``.
"""

from __future__ import annotations

import copy
from typing import Optional, Sequence

from ..architecture import OUTPUT_EMBEDDING, layer_index, layer_position, layer_stack, stack_layers, tied_source
from ..errors import ModelError, SpecError
from ..sources.checkpoint import Checkpoint
from ..spec.references import ModelRef
from ..spec.schema import Parameters, Spec
from ..strategy import Strategy
from .jobs import Dtypes, Input, Planned, Source, TensorJob, check_input_count, make_job, resolve_params
from .remap import TokenRemap
from .vocabulary import build_vocabulary, set_vocab_size, unchanged_vocabulary


def whole_model_inputs(spec: Spec, strategy: Strategy, checkpoints: dict[ModelRef, Checkpoint]
                       ) -> tuple[list[Input], Optional[Input], Input]:
    """The models in spec order; the base (separate, or appended as one more input for linear); and the
    reference model (the base, else the first model) whose tensor names, config and tokenizer are used."""
    entries = [Input(e.ref, checkpoints[e.ref], e.parameters, e.where) for e in spec.models or ()]
    base_ref = spec.base_model
    if strategy.base == "input":
        if base_ref is not None and all(e.ref != base_ref for e in entries):
            entries.append(Input(base_ref, checkpoints[base_ref], {}, "base_model"))
        inputs, base = entries, None
    else:
        if base_ref is None and strategy.base == "required":
            raise SpecError(f"{strategy.name} needs a base_model", where="base_model", file=spec.file,
                            hint="add base_model: <the model the others were fine-tuned from>")
        base = None if base_ref is None else next(
            (e for e in entries if e.ref == base_ref), Input(base_ref, checkpoints[base_ref], {}, "base_model"))
        inputs = [e for e in entries if e.ref != base_ref]
    check_input_count(strategy, len(inputs), base is not None, "models", spec.file)
    lead = base or next((e for e in inputs if e.ref == base_ref), inputs[0] if inputs else None)
    if lead is None:
        raise SpecError("no models to merge", where="models", file=spec.file)
    return inputs, base, lead


def output_names(reference: Checkpoint, models: Sequence[Input]) -> list[str]:
    """The reference model's tensor names (plus ``lm_head`` when any input has one, as in mergekit).

    Any other input having a tensor the reference lacks is an error: mergekit would silently drop it.
    """
    names = list(reference.tensors)
    if OUTPUT_EMBEDDING not in reference.tensors and any(OUTPUT_EMBEDDING in m.checkpoint.tensors for m in models):
        names.append(OUTPUT_EMBEDDING)
    known = set(names)
    for model in models:
        extra = sorted(set(model.checkpoint.tensors) - known)
        if extra:
            raise ModelError(f"has tensor '{extra[0]}' (and {len(extra) - 1} more) that "
                             f"{reference.label} does not have" if len(extra) > 1 else
                             f"has tensor '{extra[0]}' that {reference.label} does not have",
                             file=model.checkpoint.label, where=model.where,
                             hint="the models have different architectures; merge models of one architecture")
    return names


def source_name(model: Input, name: str) -> str:
    """The name under which ``model`` stores the tensor ``name`` (its embedding, for a tied ``lm_head``)."""
    if name in model.checkpoint.tensors:
        return name
    tied = tied_source(name, model.checkpoint.tensors)
    if tied is not None:
        return tied
    raise ModelError(f"tensor '{name}' is missing", file=model.checkpoint.label, where=model.where,
                     hint="the models have different architectures or the checkpoint is incomplete")


class WholeModels:
    """The Layout of ``models:`` merges."""

    def companions(self, spec: Spec, extra: Sequence[Strategy]) -> list[Strategy]:
        return []

    def plan(self, spec: Spec, strategy: Strategy, checkpoints: dict[ModelRef, Checkpoint], dtypes: Dtypes,
             extra: Sequence[Strategy]) -> Planned:
        inputs, base, lead = whole_model_inputs(spec, strategy, checkpoints)
        config = copy.deepcopy(lead.checkpoint.config)
        remap = vocabulary = None
        models = list(dict.fromkeys(m.ref for m in ([base] if base is not None else []) + inputs))
        if spec.tokenizer is not None and not unchanged_vocabulary(spec.tokenizer, checkpoints, models, lead.ref,
                                                                    dtypes.load):
            # rows of the vocabulary tensors follow the output tokenizer (remap.py)
            vocabulary = build_vocabulary(spec.tokenizer, checkpoints, models, lead.ref)
            remap = TokenRemap(vocabulary, models, spec.base_model)
            set_vocab_size(config, vocabulary.size)
        jobs = whole_model_jobs(spec, strategy, inputs, base, lead, dtypes, remap)
        return Planned(jobs, config, lead.checkpoint, vocabulary)


def whole_model_jobs(spec: Spec, strategy: Strategy, inputs: list[Input], base: Optional[Input], lead: Input,
                     dtypes: Dtypes, remap: Optional[TokenRemap] = None) -> list[TensorJob]:
    """One job per output tensor, each input supplying the same name."""
    names = output_names(lead.checkpoint, inputs + ([base] if base is not None else []))
    num_layers = stack_layers(names)   # per stack: a gradient spans a VLM's vision tower and its text model apart
    return [whole_model_job(spec, strategy, inputs, base, lead, name, num_layers.get(layer_stack(name) or "", 0),
                            dtypes, remap) for name in names]


def whole_model_job(spec: Spec, strategy: Strategy, inputs: list[Input], base: Optional[Input], lead: Input,
                    name: str, num_layers: int, dtypes: Dtypes, remap: Optional[TokenRemap] = None,
                    shared: Optional[Sequence[Parameters]] = None) -> TensorJob:
    """The job for output tensor ``name``, every model supplying its tensor of that name, merged by ``strategy``.
    ``shared``: the parameter levels above the models, highest first (default: the top-level parameters)."""
    layer = layer_index(name)
    t = layer_position(layer, num_layers)
    sources = {id(m): Source(m.checkpoint, source_name(m, name)) for m in (*inputs, base, lead) if m is not None}
    if remap is not None:   # embeddings and lm_head in the output vocabulary's order
        refs = {id(m): m.ref for m in (base, *inputs, lead) if m is not None}
        sources = remap.by_input(name, sources, refs, dtypes.load, spec.base_model)
    params = resolve_params(strategy, shared or (spec.parameters,), inputs, name, t)
    return make_job(name, tuple(sources[id(m)] for m in inputs), sources[id(base)] if base is not None else None,
                    sources[id(lead)], params, layer, t, dtypes.load, dtypes.out, strategy=strategy)
