"""Planning a merge from headers only: which output tensors, from which inputs, with which parameters.

Everything that can be wrong is found here, before a single byte of tensor data is read: the spec's
parameters against the strategy's declarations, the inputs' tensor names, shapes and dtypes, and every
parameter's value for every output tensor. The engine then only reads, computes and writes.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import torch

from .checkpoint import Checkpoint
from .dtypes import dtype_name, itemsize
from .errors import MergeError, ModelError, SpecError, did_you_mean
from .inputs import open_inputs
from .layout import count_layers, layer_index, layer_position, tied_source
from .params import check_setting, resolve
from .references import ModelRef
from .registry import get_strategy, known_parameters
from .spec import Parameters, Spec
from .strategy import ParamProblem, Strategy

OUTPUT_EMBEDDING = "lm_head.weight"
log = logging.getLogger("mergekit_lite")


@dataclass(frozen=True, eq=False)
class Source:
    """One input tensor: which checkpoint, which name in it."""

    checkpoint: Checkpoint
    name: str

    @property
    def info(self):
        return self.checkpoint.tensors[self.name]


@dataclass(eq=False)
class TensorJob:
    """Everything needed to produce one output tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype                  # written dtype
    merge_dtype: torch.dtype            # the result is rounded to this first (mergekit's `dtype` semantics)
    load_dtype: Optional[torch.dtype]   # inputs are rounded to this when read (spec `dtype`), else None
    inputs: tuple[Source, ...]          # in model order; for base policy "input" the base is among them
    base: Optional[Source]
    params: dict[str, Any]
    layer: Optional[int]
    t: float
    copy: bool = False                  # non-float tensor (e.g. an int buffer): copied, after checking equality

    @property
    def nbytes(self) -> int:
        return itemsize(self.dtype) * _numel(self.shape)

    @property
    def sources(self) -> tuple[Source, ...]:
        return self.inputs + ((self.base,) if self.base is not None else ())


@dataclass
class _Input:
    """A model taking part in the merge, with its own parameter settings."""

    ref: ModelRef
    checkpoint: Checkpoint
    parameters: Parameters
    where: str


@dataclass
class MergePlan:
    spec: Spec
    strategy: Strategy
    checkpoints: dict[ModelRef, Checkpoint]
    jobs: list[TensorJob]
    config: dict[str, Any]               # the output config.json
    reference: Checkpoint                # base model, else first model: config and generation config come from it
    tokenizer_folder: Optional[str]
    seed: int = 0
    warnings: list[str] = field(default_factory=list)
    card_notes: list[str] = field(default_factory=list)   # facts a user of the output should read

    @property
    def total_bytes(self) -> int:
        return sum(job.nbytes for job in self.jobs)

    def close(self) -> None:
        for checkpoint in self.checkpoints.values():
            checkpoint.close()


def plan_merge(spec: Spec, *, strategies: Iterable[Strategy] = (), dtype: Optional[torch.dtype] = None,
               out_dtype: Optional[torch.dtype] = None, seed: int = 0) -> MergePlan:
    """Check the spec against its strategy and inputs and plan every output tensor. Reads headers only."""
    strategies = list(strategies)
    strategy = get_strategy(spec.merge_method, strategies, file=spec.file)
    warnings = _check_parameter_names(spec, strategy, strategies)
    for message in warnings:
        log.warning(message)
    if spec.slices is not None:
        raise spec.error("slices (layer stacking) are not supported yet", where="slices",
                         hint="use models: to merge whole models")
    checkpoints = open_inputs(spec)
    try:
        inputs, base, lead = _whole_model_inputs(spec, strategy, checkpoints)
        reference = lead.checkpoint
        load_dtype = dtype or spec.dtype
        jobs = _whole_model_jobs(spec, strategy, inputs, base, lead, load_dtype, out_dtype or spec.out_dtype)
        config, notes = _output_config(reference, jobs, out_dtype or spec.out_dtype or load_dtype)
        for message in notes:
            log.warning(message)
        warnings += notes
    except MergeError as exc:
        if isinstance(exc, SpecError) and exc.file is None:
            exc.file = spec.file
        for checkpoint in checkpoints.values():
            checkpoint.close()
        raise
    tokenizer = spec.tokenizer_source
    tokenizer_folder = checkpoints[tokenizer].folder if isinstance(tokenizer, ModelRef) else reference.folder
    return MergePlan(spec, strategy, checkpoints, jobs, config, reference, tokenizer_folder, seed, warnings,
                     card_notes=notes)


def _check_parameter_names(spec: Spec, strategy: Strategy, extra: list[Strategy]) -> list[str]:
    """Unknown names are errors; names another method uses are one warning; values are type-checked."""
    levels: list[tuple[Parameters, bool]] = [(spec.parameters, False)]
    levels += [(entry.parameters, True) for entry in spec.models or ()]
    for piece in spec.slices or ():
        levels.append((piece.parameters, False))
        levels += [(source.parameters, True) for source in piece.sources]
    others = known_parameters(extra)
    ignored: list[str] = []
    warnings: list[str] = []
    for parameters, per_model_level in levels:
        for name, setting in parameters.items():
            param = strategy.param(name)
            if param is None:
                if name in others:
                    ignored.append(setting.where)
                    continue
                raise spec.error("unknown parameter." + did_you_mean(name, [p.name for p in strategy.params] +
                                                                      list(others)),
                                 where=setting.where,
                                 hint=f"{strategy.name} takes: " + ", ".join(p.name for p in strategy.params))
            if per_model_level and not param.per_model:
                warnings.append(f"{setting.where}: '{name}' is set once per merge, not per model; it is ignored "
                                "here (as mergekit does). Move it to the top-level parameters.")
                continue
            try:
                check_setting(setting, param)
            except SpecError as exc:
                exc.file = spec.file
                raise
    if ignored:
        warnings.append(f"{strategy.name} does not use these parameters, so they are ignored: " + ", ".join(ignored))
    return warnings


def _whole_model_inputs(spec: Spec, strategy: Strategy, checkpoints: dict[ModelRef, Checkpoint]
                        ) -> tuple[list[_Input], Optional[_Input], _Input]:
    """The models in spec order; the base (separate, or appended as one more input for linear); and the
    reference model (the base, else the first model) whose tensor names, config and tokenizer are used."""
    entries = [_Input(e.ref, checkpoints[e.ref], e.parameters, e.where) for e in spec.models or ()]
    base_ref = spec.base_model
    if strategy.base == "input":
        if base_ref is not None and all(e.ref != base_ref for e in entries):
            entries.append(_Input(base_ref, checkpoints[base_ref], {}, "base_model"))
        inputs, base = entries, None
    else:
        if base_ref is None and strategy.base == "required":
            raise spec.error(f"{strategy.name} needs a base_model", where="base_model",
                             hint="add base_model: <the model the others were fine-tuned from>")
        base = None if base_ref is None else next(
            (e for e in entries if e.ref == base_ref), _Input(base_ref, checkpoints[base_ref], {}, "base_model"))
        inputs = [e for e in entries if e.ref != base_ref]
    count = len(inputs)
    what = ("model" if strategy.min_inputs == strategy.max_inputs == 1 else "models") + \
        (" besides the base" if base is not None else "")
    if count < strategy.min_inputs or (strategy.max_inputs is not None and count > strategy.max_inputs):
        wanted = (f"exactly {strategy.min_inputs}" if strategy.min_inputs == strategy.max_inputs
                  else f"at least {strategy.min_inputs}" if strategy.max_inputs is None
                  else f"{strategy.min_inputs} to {strategy.max_inputs}")
        raise spec.error(f"{strategy.name} takes {wanted} {what}, got {count}", where="models",
                         hint=f"see `merge methods {strategy.name}`")
    lead = base or next((e for e in inputs if e.ref == base_ref), inputs[0] if inputs else None)
    if lead is None:
        raise spec.error("no models to merge", where="models")
    return inputs, base, lead


def _whole_model_jobs(spec: Spec, strategy: Strategy, inputs: list[_Input], base: Optional[_Input], lead: _Input,
                      load_dtype: Optional[torch.dtype], out_dtype: Optional[torch.dtype]) -> list[TensorJob]:
    """One job per tensor of the reference model (base, else first), each input supplying the same name."""
    models = inputs + ([base] if base is not None else [])
    reference = lead.checkpoint
    names = list(reference.tensors)
    if OUTPUT_EMBEDDING not in reference.tensors and any(OUTPUT_EMBEDDING in m.checkpoint.tensors for m in models):
        names.append(OUTPUT_EMBEDDING)  # as mergekit: the output has lm_head if any input has one
    for model in models:
        extra = sorted(set(model.checkpoint.tensors) - set(names))
        if extra:
            raise ModelError(f"has tensor '{extra[0]}' (and {len(extra) - 1} more) that "
                             f"{reference.label} does not have" if len(extra) > 1 else
                             f"has tensor '{extra[0]}' that {reference.label} does not have",
                             file=model.checkpoint.label, where=model.where,
                             hint="the models have different architectures; merge models of one architecture")
    num_layers = count_layers(names)
    jobs = []
    for name in names:
        layer = layer_index(name)
        t = layer_position(layer, num_layers)
        sources = {id(m): Source(m.checkpoint, _source_name(m, name)) for m in models}
        job_inputs = tuple(sources[id(m)] for m in inputs)
        job_base = sources[id(base)] if base is not None else None
        params = _resolve_params(strategy, spec.parameters, inputs, name, t)
        jobs.append(_job(name, job_inputs, job_base, sources[id(lead)], params, layer, t, load_dtype, out_dtype))
    return jobs


def _source_name(model: _Input, name: str) -> str:
    if name in model.checkpoint.tensors:
        return name
    tied = tied_source(name, model.checkpoint.tensors)
    if tied is not None:
        return tied  # a tied model's lm_head is its input embedding
    raise ModelError(f"tensor '{name}' is missing", file=model.checkpoint.label, where=model.where,
                     hint="the models have different architectures or the checkpoint is incomplete")


def _resolve_params(strategy: Strategy, merge_level: Parameters, inputs: list[_Input], name: str,
                    t: float) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for param in strategy.params:
        if param.per_model:
            params[param.name] = tuple(
                resolve(param, (m.parameters, merge_level), name, t,
                        f"tensor '{name}' of {m.where} ({m.checkpoint.label})") for m in inputs)
        else:
            params[param.name] = resolve(param, (merge_level,), name, t, f"tensor '{name}'")
    if strategy.check is not None:
        problem = strategy.check(params)
        if isinstance(problem, ParamProblem):
            model = inputs[problem.model] if problem.model is not None else None
            levels = ((model.parameters,) if model is not None else ()) + (merge_level,)
            where = next((level[p].where for p in problem.blame for level in levels if p in level), "parameters")
            of = f" of {model.where} ({model.checkpoint.label})" if model is not None else ""
            raise SpecError(f"{problem.message} for tensor '{name}'{of}", where=where,
                            hint=f"see `merge methods {strategy.name}`")
        if problem:
            raise SpecError(f"{problem} (tensor '{name}')", where="parameters",
                            hint=f"see `merge methods {strategy.name}`")
    return params


def _job(name: str, inputs: tuple[Source, ...], base: Optional[Source], first: Source, params: dict[str, Any],
         layer: Optional[int], t: float, load_dtype: Optional[torch.dtype],
         out_dtype: Optional[torch.dtype]) -> TensorJob:
    """Check one output tensor's sources against ``first`` (the reference model's) and fix its dtypes."""
    sources = inputs + ((base,) if base is not None else ())
    for source in sources:
        if source.info.shape != first.info.shape:
            raise ModelError(f"shape {list(source.info.shape)} != {list(first.info.shape)} in "
                             f"{first.checkpoint.label}", where=f"tensor '{name}'", file=source.checkpoint.label,
                             hint=_shape_hint(name, source.info.shape, first.info.shape))
    dtypes = {source.info.dtype for source in sources}
    if not all(d.is_floating_point for d in dtypes):
        if len(dtypes) > 1:
            raise ModelError(f"non-float tensor has different dtypes across models: "
                             f"{', '.join(sorted(map(dtype_name, dtypes)))}", where=f"tensor '{name}'")
        stored = first.info.dtype
        return TensorJob(name, first.info.shape, stored, stored, None, inputs, base, params, layer, t, copy=True)
    if len(dtypes) > 1 and load_dtype is None:
        raise ModelError(f"models store this tensor as {' and '.join(sorted(map(dtype_name, dtypes)))}",
                         where=f"tensor '{name}'",
                         hint="set dtype: (e.g. dtype: bfloat16) in the spec to say which precision to merge in")
    merge_dtype = load_dtype or first.info.dtype
    return TensorJob(name, first.info.shape, out_dtype or merge_dtype, merge_dtype, load_dtype, inputs, base,
                     params, layer, t)


def _shape_hint(name: str, got: tuple[int, ...], want: tuple[int, ...]) -> str:
    if ("embed" in name or "lm_head" in name or "wte" in name) and got[1:] == want[1:] and got[:1] != want[:1]:
        return (f"the vocabulary sizes differ ({got[0]} vs {want[0]}): merge models that share a tokenizer, "
                "or resize the embeddings of one model first")
    return "the models have different architectures or sizes; merge models of one architecture and size"


def _output_config(reference: Checkpoint, jobs: list[TensorJob], dtype: Optional[torch.dtype]
                   ) -> tuple[dict[str, Any], list[str]]:
    """The reference model's config, with its dtype and tying updated to what is written; and notes on
    changes a user of the output should know about."""
    notes = []
    config = copy.deepcopy(reference.config)
    if dtype is not None:
        keys = [key for key in ("dtype", "torch_dtype") if key in config] or ["torch_dtype"]
        for key in keys:
            config[key] = dtype_name(dtype)
    writes_head = any(job.name == OUTPUT_EMBEDDING for job in jobs)
    if writes_head and OUTPUT_EMBEDDING not in reference.tensors and config.get("tie_word_embeddings", True):
        config["tie_word_embeddings"] = False
        notes.append(f"{reference.label} ties lm_head to its embeddings but another input has its own lm_head; "
                     "the merged lm_head is written and config.json says tie_word_embeddings: false.")
    return config, notes


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
