"""One output tensor, planned: its sources, parameters, shape and dtypes (shared by every layout).

The whole-model merge (whole_models.py), layer stacking (stacking.py) and concatenation (concat.py) differ in
which output tensors exist and where each one's inputs come from; they all describe each output tensor
as a ``TensorJob`` built here, so the checks on shapes, dtypes and parameters are written once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Protocol, Sequence

import torch

from ..dtypes import dtype_name, is_float8, itemsize
from ..errors import ModelError, SpecError
from ..sources.checkpoint import Checkpoint
from ..spec.references import ModelRef
from ..spec.schema import Parameters, Spec
from ..strategy import ParamProblem, Strategy
from .parameters import resolve, source_of


@dataclass(frozen=True, eq=False)
class Source:
    """One input tensor: which checkpoint, which name in it."""

    checkpoint: Checkpoint
    name: str

    @property
    def info(self):
        return self.checkpoint.tensors[self.name]

    def read(self, rows: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """The tensor (or the block of its rows [start, end)) as stored; a source transform overrides this."""
        return self.checkpoint.read(self.name, rows)

    def will_read(self, rows: Optional[tuple[int, int]] = None) -> None:
        """A hint that ``read(rows)`` comes soon (Checkpoint.will_read), where the checkpoint takes one and this
        source reads it as stored; a source transform reads its own way and is not hinted."""
        hint = getattr(self.checkpoint, "will_read", None)
        if hint is not None and type(self).read is Source.read:
            hint(self.name, rows)

    def fetch(self, rows: Optional[tuple[int, int]] = None) -> Any:
        """What ``read`` returns, or a deferred value whose ``resolve()`` returns it: a source transform that
        computes (a LoRA fold) reads its inputs here, and the merge loop resolves them on a merging thread."""
        fetch = getattr(self.checkpoint, "fetch", None)
        if fetch is None or type(self).read is not Source.read:   # a subclass that reads its own way
            return self.read(rows)
        return fetch(self.name, rows)


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
    strategy: Strategy                  # the merge's, or another (concat computes unwidened tensors with its fallback)
    copy: bool = False                  # non-float tensor (e.g. an int buffer): copied, after checking equality

    @property
    def nbytes(self) -> int:
        return itemsize(self.dtype) * numel(self.shape)

    @property
    def sources(self) -> tuple[Source, ...]:
        return self.inputs + ((self.base,) if self.base is not None else ())


@dataclass
class Input:
    """A model taking part in the merge (or in one slice of it), with its own parameter settings."""

    ref: ModelRef
    checkpoint: Checkpoint
    parameters: Parameters          # this model's own settings: models[i] or slices[i].sources[j]
    where: str                      # YAML path of the entry, for messages


def check_input_count(strategy: Strategy, count: int, has_base: bool, where: str,
                      file: Optional[str] = None) -> None:
    """The strategy's declared number of inputs, as a spec error at ``where``."""
    if count >= strategy.min_inputs and (strategy.max_inputs is None or count <= strategy.max_inputs):
        return
    wanted = (f"exactly {strategy.min_inputs}" if strategy.min_inputs == strategy.max_inputs
              else f"at least {strategy.min_inputs}" if strategy.max_inputs is None
              else f"{strategy.min_inputs} to {strategy.max_inputs}")
    plural = "" if strategy.min_inputs == strategy.max_inputs == 1 else "s"
    what = f"model{plural} besides the base" if has_base else f"model{plural}"
    raise SpecError(f"{strategy.name} takes {wanted} {what}, got {count}", where=where, file=file,
                    hint=f"see `merge methods {strategy.name}`")


def resolve_params(strategy: Strategy, shared: Sequence[Parameters], inputs: Sequence[Input], name: str, t: float,
                   input_names: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Every declared parameter of ``strategy`` for one output tensor (mergekit's precedence).

    ``shared`` are the levels above the models, highest first (a slice's parameters, then the top-level
    ones). Per-model parameters look at the model's own settings first, and their filters match the
    model's own tensor name (``input_names``, which differ from ``name`` when layers are renumbered), as in
    mergekit; shared parameters match the output name.
    """
    input_names = input_names or [name] * len(inputs)
    params: dict[str, Any] = {}
    for param in strategy.params:
        if param.per_model:
            params[param.name] = tuple(
                resolve(param, (m.parameters, *shared), own, t, f"tensor '{own}' of {m.where} ({m.checkpoint.label})")
                for m, own in zip(inputs, input_names))
        else:
            params[param.name] = resolve(param, tuple(shared), name, t, f"tensor '{name}'")
    if strategy.check is not None:
        problem = strategy.check(params)
        if isinstance(problem, ParamProblem):
            raise _located(problem, strategy, shared, inputs, input_names, name)
        if problem:
            raise SpecError(f"{problem} (tensor '{name}')", where="parameters",
                            hint=f"see `merge methods {strategy.name}`")
    return params


def _located(problem: ParamProblem, strategy: Strategy, shared: Sequence[Parameters], inputs: Sequence[Input],
             input_names: Sequence[str], name: str) -> SpecError:
    """The check's problem as a spec error at the YAML path of the first blamed parameter the spec sets."""
    if problem.model is None:   # a problem of the whole tensor: name every YAML path involved
        return SpecError(f"for tensor '{name}', {problem.message}",
                         where=_sources(strategy, problem.blame, shared, inputs, name, input_names),
                         hint=problem.hint or f"see `merge methods {strategy.name}`")
    model = inputs[problem.model]
    levels = (model.parameters,) + tuple(shared)
    where = next((level[p].where for p in problem.blame for level in levels if p in level), "parameters")
    return SpecError(f"{problem.message} for tensor '{input_names[problem.model]}' of {model.where} "
                     f"({model.checkpoint.label})", where=where,
                     hint=problem.hint or f"see `merge methods {strategy.name}`")


def _sources(strategy: Strategy, names: Sequence[str], shared: Sequence[Parameters], inputs: Sequence[Input],
             name: str, input_names: Sequence[str]) -> str:
    """The YAML paths that set parameters ``names`` for one tensor ('normalize (default)' when unset)."""
    paths: list[str] = []
    for param in (strategy.param(n) for n in names):
        if param is None:
            continue
        if param.per_model:
            found = [source_of(param.name, (m.parameters, *shared), own) for m, own in zip(inputs, input_names)]
        else:
            found = [source_of(param.name, shared, name)]
        default = str(param.default).lower() if param.type is bool else param.default
        paths += [path or f"{param.name} (default {default})" for path in found]
    return ", ".join(dict.fromkeys(paths))


def make_job(name: str, inputs: tuple[Source, ...], base: Optional[Source], first: Source, params: dict[str, Any],
             layer: Optional[int], t: float, load_dtype: Optional[torch.dtype], out_dtype: Optional[torch.dtype], *,
             strategy: Strategy, shape: Optional[tuple[int, ...]] = None) -> TensorJob:
    """Check one output tensor's sources against ``first`` (the reference model's) and fix its dtypes.

    Without ``shape``, every source must have ``first``'s shape and the output has it too; a layout that
    changes shapes (concat) checks its sources itself and passes the output ``shape``.
    """
    sources = inputs + ((base,) if base is not None else ())
    if shape is None:
        for source in sources:
            if source.info.shape != first.info.shape:
                raise ModelError(f"shape {list(source.info.shape)} != {list(first.info.shape)} in "
                                 f"{first.checkpoint.label}", where=f"tensor '{source.name}'",
                                 file=source.checkpoint.label,
                                 hint=shape_hint(name, source.info.shape, first.info.shape))
        shape = first.info.shape
    dtypes = {source.info.dtype for source in sources}
    if not all(d.is_floating_point for d in dtypes):
        if len(dtypes) > 1:
            raise ModelError(f"non-float tensor has different dtypes across models: "
                             f"{', '.join(sorted(map(dtype_name, dtypes)))}", where=f"tensor '{name}'")
        stored = first.info.dtype
        return TensorJob(name, shape, stored, stored, None, inputs, base, params, layer, t, strategy, copy=True)
    if len(dtypes) > 1 and load_dtype is None:
        raise ModelError(f"models store this tensor as {' and '.join(sorted(map(dtype_name, dtypes)))}",
                         where=f"tensor '{name}'",
                         hint="set dtype: (e.g. dtype: bfloat16) in the spec to say which precision to merge in")
    merge_dtype = load_dtype or first.info.dtype
    if is_float8(merge_dtype):   # read and merged in float32, never rounded to or written in float8
        if out_dtype is None:
            raise ModelError(f"stored as {dtype_name(merge_dtype)}: float8 weights are read and merged in float32, "
                             "but the output needs a dtype to be written in", where=f"tensor '{name}'",
                             file=first.checkpoint.label,
                             hint="set out_dtype: bfloat16 (or float16, float32) in the spec, or pass --out-dtype")
        merge_dtype = out_dtype
    return TensorJob(name, shape, out_dtype or merge_dtype, merge_dtype, load_dtype, inputs, base, params, layer, t,
                     strategy)


def shape_hint(name: str, got: tuple[int, ...], want: tuple[int, ...]) -> str:
    if ("embed" in name or "lm_head" in name or "wte" in name) and got[1:] == want[1:] and got[:1] != want[:1]:
        return (f"the vocabularies differ ({got[0]} vs {want[0]} tokens) and embeddings are merged row by row. "
                "Add tokenizer_source: union (or base, or a model) to line the rows up by token text, as "
                "mergekit does; or merge models that share a tokenizer")
    return "the models have different architectures or sizes; merge models of one architecture and size"


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


@dataclass(frozen=True)
class Dtypes:
    load: Optional[torch.dtype]      # inputs are rounded to this when read (spec `dtype` / --dtype)
    out: Optional[torch.dtype]       # written dtype (spec `out_dtype` / --out-dtype)


@dataclass
class Planned:
    """What a layout produces: the output tensors, the output config (before dtype and tying are set), and
    the model whose config, generation config and tokenizer the output takes by default."""

    jobs: list[TensorJob]
    config: dict[str, Any]
    reference: Checkpoint
    vocabulary: Any = None       # a tokenizer merge's output vocabulary (vocabulary.Vocabulary), when built


class Layout(Protocol):
    """Plans which output tensors exist and where each one's inputs come from.

    The default (whole_models.py) maps every tensor of the reference model to itself; layer stacking
    (stacking.py) renumbers layers; a strategy that changes shapes (``Strategy.changes_shapes``: concat)
    has a layout of its own (planner.OWN_LAYOUTS). Layouts read headers and configs only.
    """

    def companions(self, spec: Spec, extra: Sequence[Strategy]) -> list[Strategy]:
        """Other strategies whose parameters the spec may set (concat's fallback), checked with the merge's."""

    def plan(self, spec: Spec, strategy: Strategy, checkpoints: dict[ModelRef, Checkpoint], dtypes: Dtypes,
             extra: Sequence[Strategy]) -> Planned:
        """Every output tensor as a job, and the output config."""
