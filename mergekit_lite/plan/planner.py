"""Planning a merge from headers only: which output tensors, from which inputs, with which parameters.

Everything that can be wrong is found here, before a single byte of tensor data is read: the spec's
parameters against the strategy's declarations, the inputs' tensor names, shapes and dtypes, and every
parameter's value for every output tensor. The engine then only reads, computes and writes.

Which output tensors exist, and where each one's inputs come from, is a layout's job: whole models
(whole_models.py), stacked layer ranges (stacking.py), or a strategy's own layout when it changes shapes
(concat, concat.py). This module checks the parameter names, picks the layout and finishes the config.
"""

from __future__ import annotations

import logging
import math
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Iterable, Optional

import torch

from ..architecture import OUTPUT_EMBEDDING, TIED_OUTPUT_EMBEDDINGS
from ..dtypes import dtype_name, parse_dtype
from ..errors import SpecError, UsageError, did_you_mean, within
from ..sources.checkpoint import Checkpoint
from ..spec.problems import Problems, guard
from ..spec.references import ModelRef
from ..spec.schema import Parameters, Spec, SpecLike, load_spec
from ..strategies.registry import get_strategy, known_parameters
from ..strategy import Strategy
from .concat import ConcatLayout
from .configs import choose_config, refuse_unmergeable
from .inputs import open_inputs
from .jobs import Dtypes, Layout, TensorJob, check_input_count
from .modules import Modules
from .parameters import check_setting
from .stacking import Stacking
from .vocabulary import require_transformers
from .whole_models import WholeModels

log = logging.getLogger("mergekit_lite")


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
    allow_nonfinite: bool = False        # merge inputs holding NaN/Inf (and let the output hold them)
    config_from: Optional[str] = None    # YAML path of the model config.json comes from, when chosen (configs.py)
    vocabulary: Any = None               # a tokenizer merge's output tokenizer and maps (vocabulary.py)

    @property
    def total_bytes(self) -> int:
        return sum(job.nbytes for job in self.jobs)

    @cached_property
    def largest_numel(self) -> int:
        """Entries of the largest output tensor: the merge's memory peak is at the tensors of this size."""
        return max((math.prod(job.shape) for job in self.jobs), default=0)

    def close(self) -> None:
        for checkpoint in self.checkpoints.values():
            checkpoint.close()


def plan_merge(spec: Spec, *, strategies: Iterable[Strategy] = (), dtype: Optional[torch.dtype] = None,
               out_dtype: Optional[torch.dtype] = None, seed: int = 0, allow_pickle: bool = False,
               allow_nonfinite: bool = False, config_from: Optional[str] = None,
               provided: Optional[dict[ModelRef, Checkpoint]] = None) -> MergePlan:
    """Check the spec against its strategy and inputs and plan every output tensor. Reads headers only.

    ``allow_pickle``: models with pickle weights only are loaded with torch.load(weights_only=True);
    ``allow_nonfinite``: inputs holding NaN or Inf are merged (the output may hold them too);
    ``config_from``: the merged model whose config.json the output takes (as the spec writes it, or its YAML
    path), needed when the models disagree on a key that changes what the model computes (configs.py);
    ``provided``: inputs already opened, by reference (a fused stage: plan/stages.py)."""
    strategies = list(strategies)
    strategy = get_strategy(spec.merge_method, strategies, file=spec.file)
    layout = _layout(spec, strategy)
    require_transformers(spec)
    with within(spec.file, kinds=(SpecError,)):
        declared = [strategy, *layout.companions(spec, strategies)]
    warnings = _check_parameter_names(spec, declared, strategies)
    for message in warnings:
        log.warning(message)
    with ExitStack() as opened:   # every input is closed if planning fails
        checkpoints = open_inputs(spec, opened, allow_pickle, provided)
        refuse_unmergeable(spec, checkpoints)
        with within(spec.file, kinds=(SpecError,)):
            planned = layout.plan(spec, strategy, checkpoints,
                                  Dtypes(dtype or spec.dtype, out_dtype or spec.out_dtype), strategies)
        config, notes, config_where = choose_config(spec, checkpoints, planned, config_from,
                                                    per_layer=not isinstance(layout, Stacking))
        config, tying = _output_config(config, planned.reference, planned.jobs,
                                       out_dtype or spec.out_dtype or dtype or spec.dtype)
        notes += tying + (planned.vocabulary.notes if planned.vocabulary is not None else [])
        for message in notes:
            log.warning(message)
        warnings += notes
        if planned.vocabulary is None:
            _check_tokenizer_vocab(spec, checkpoints, planned.jobs)
        opened.pop_all()
    reference = planned.reference
    tokenizer = spec.tokenizer_source
    tokenizer_folder = checkpoints[tokenizer].folder if isinstance(tokenizer, ModelRef) else reference.folder
    if planned.vocabulary is not None:   # None: the built tokenizer is saved (companions.py)
        tokenizer_folder = planned.vocabulary.copy_from
    for checkpoint in checkpoints.values():   # e.g. a LoRA fold's notes (lora/source.py); already logged
        warnings += checkpoint.warnings
        notes += [note for note in checkpoint.card_notes if note not in notes]
    return MergePlan(spec, strategy, checkpoints, planned.jobs, config, reference, tokenizer_folder, seed, warnings,
                     card_notes=notes, allow_nonfinite=allow_nonfinite, config_from=config_where,
                     vocabulary=planned.vocabulary)


def check_spec(spec: Spec, strategies: Iterable[Strategy] = ()) -> list[str]:
    """What plan_merge checks before it opens an input, for `merge check`: the method, the layout, parameter
    names and the type and range of every value the spec writes, the number of inputs. Opens no model and
    needs no network. Returns the warnings; raises SpecProblems (spec/problems.py) with every problem found."""
    strategies = list(strategies)
    strategy = get_strategy(spec.merge_method, strategies, file=spec.file)
    problems, warnings = Problems(spec.file), []
    with problems.guard():
        layout = _layout(spec, strategy)
        with within(spec.file, kinds=(SpecError,)):
            declared = [strategy, *layout.companions(spec, strategies)]
        warnings = _check_parameter_names(spec, declared, strategies, problems)
    if strategy.base == "required" and spec.base_model is None and not any(s.base_model for s in spec.all_slices()):
        problems.report(spec.error(f"{strategy.name} needs a base_model", where="base_model",
                                   hint="add base_model: <the model the others were fine-tuned from>"))
    groups = [("models", [e.ref for e in spec.models], spec.base_model)] if spec.models else []
    groups += [(f"{m.where}.models", [e.ref for e in m.models], spec.base_model) for m in spec.modules or ()
               if m.slices is None]
    groups += [(f"{p.where}.sources", [s.ref for s in p.sources], p.base_model or spec.base_model)
               for p in spec.all_slices()]
    for where, refs, base in groups:
        if strategy.base == "input":
            count, has_base = len(refs) + (base is not None and base not in refs), False
        else:
            count, has_base = sum(ref != base for ref in refs), base is not None
        if not strategy.changes_shapes:
            with problems.guard():
                check_input_count(strategy, count, has_base, where, spec.file)
    if strategy.check is not None and not strategy.changes_shapes and not problems.found:
        with problems.guard(), within(spec.file, kinds=(SpecError,)):
            _probe_checks(spec, strategy)
    problems.raise_if_any(spec)
    return warnings


def _probe_checks(spec: Spec, strategy: Strategy) -> None:
    """The strategy's check of its resolved parameters (weights summing to 0, ...) without tensors: at the
    depths of the spec's gradient points, for a tensor matching each filter the spec writes and one matching
    none. A probe a required parameter has no value for is left to the planner, which knows the real names."""
    from types import SimpleNamespace

    from .jobs import Input, resolve_params

    filters = sorted({f for v in _settings_of(spec) for f in _filters(v)})
    names = ["<any tensor>"] + [f"<tensors matching '{f}'>" for f in filters]
    knots = {0.0, 1.0} | {i / (n - 1) for n in _gradient_lengths(spec) for i in range(n) if n > 1}
    groups = [((spec.parameters,), spec.models, spec.base_model)] if spec.models else []
    groups += [((piece.parameters, spec.parameters), piece.sources, piece.base_model or spec.base_model)
               for piece in spec.slices or ()]
    groups += [((piece.parameters, module.parameters, spec.parameters), piece.sources,
                piece.base_model or spec.base_model) for module in spec.modules or () for piece in module.slices or ()]
    for shared, entries, base in groups:
        inputs = [Input(e.ref, SimpleNamespace(label=str(e.ref)), e.parameters, e.where) for e in entries
                  if strategy.base == "input" or e.ref != base]
        for name in names:
            for t in sorted(knots):
                try:
                    resolve_params(strategy, shared, inputs, name, t)
                except SpecError as exc:
                    if not exc.what.startswith("required parameter"):
                        raise


def _settings_of(spec: Spec) -> list[Any]:
    levels = [spec.parameters] + [m.parameters for m in spec.modules or ()] + [e.parameters for e in spec.all_models()]
    for piece in spec.all_slices():
        levels += [piece.parameters] + [s.parameters for s in piece.sources]
    return [setting.raw for level in levels for setting in level.values()]


def _filters(raw: Any) -> list[str]:
    return [e["filter"] for e in _filters_entries(raw) if e.get("filter") not in (None, "*")]


def _gradient_lengths(spec: Spec) -> set[int]:
    found = set()
    for raw in _settings_of(spec):
        values = [e["value"] for e in _filters_entries(raw)] + [raw]
        found |= {len(v) for v in values if isinstance(v, list) and v and not isinstance(v[0], dict)}
    return found


def _filters_entries(raw: Any) -> list[dict]:
    return [raw] if isinstance(raw, dict) else raw if isinstance(raw, list) and raw and isinstance(raw[0], dict) else []


def _check_tokenizer_vocab(spec: Spec, checkpoints: dict[ModelRef, Checkpoint], jobs: list[TensorJob]) -> None:
    """A tokenizer copied from a model with more token embeddings than the output would emit ids the merged
    model cannot embed (an index error at inference, or a silently wrong token)."""
    source = spec.tokenizer_source
    if not isinstance(source, ModelRef):
        return
    output = _vocab_rows({job.name: job.shape for job in jobs})
    copied = _vocab_rows({name: info.shape for name, info in checkpoints[source].tensors.items()})
    if output is not None and copied is not None and copied > output:
        raise spec.error(f"{source} has {copied} token embeddings but the merged model has {output}, so its "
                         "tokenizer can produce ids the merged model cannot embed", where="tokenizer_source",
                         hint="use the tokenizer of a model with the merged models' vocabulary (tokenizer_source: "
                              "base, or one of them)")


def _vocab_rows(shapes: dict[str, tuple[int, ...]]) -> Optional[int]:
    """Rows of the token embedding (or of lm_head), when a known name is present."""
    for name in (*TIED_OUTPUT_EMBEDDINGS[OUTPUT_EMBEDDING], OUTPUT_EMBEDDING):
        if name in shapes and len(shapes[name]) == 2:
            return shapes[name][0]
    return None


# The layouts of strategies that change tensor shapes (``Strategy.changes_shapes``), by strategy name.
OWN_LAYOUTS: dict[str, Layout] = {"concat": ConcatLayout()}


def _layout(spec: Spec, strategy: Strategy) -> Layout:
    """Whole models, stacked layer ranges (slices), or the strategy's own layout (concat)."""
    tokenizer = spec.tokenizer
    if spec.modules is not None:
        if strategy.changes_shapes:
            raise spec.error(f"{strategy.name} changes tensor shapes; it cannot be used with modules",
                             where="merge_method", hint="merge the whole models with models:")
        return Modules()
    if tokenizer is not None and strategy.changes_shapes and (
            tokenizer.source == "union" or tokenizer.tokens or tokenizer.pad_to_multiple_of):
        raise spec.error(f"merging tokenizers (union, tokens:, pad_to_multiple_of) is not supported with "
                         f"{strategy.name} (mergekit has no {strategy.name} method, so it has no such merge either)",
                         where=tokenizer.where,
                         hint="use tokenizer_source: base or a model, which copies its tokenizer, or merge the "
                              "vocabularies in a linear merge first")
    if not strategy.changes_shapes:
        return WholeModels() if spec.slices is None else Stacking()
    if spec.slices is not None:
        raise spec.error(f"{strategy.name} merges whole models; it cannot be used with slices", where="slices",
                         hint="list the models under models:, or stack the concatenated model in a second merge")
    if strategy.name not in OWN_LAYOUTS:
        raise SpecError(f"{strategy.name} says it changes tensor shapes, but no layout plans its tensors",
                        where="merge_method", file=spec.file,
                        hint="a plugin strategy must keep tensor shapes (changes_shapes=False)")
    return OWN_LAYOUTS[strategy.name]


def _check_parameter_names(spec: Spec, declared: list[Strategy], extra: list[Strategy],
                           problems: Optional[Problems] = None) -> list[str]:
    """Unknown names are errors; names another method uses are one warning; values are type-checked.

    ``declared`` is the merge's strategy, then any companion whose parameters the spec may also set (concat's
    fallback); a value must suit every strategy that declares its name. With ``problems`` (`merge check`), each
    problem is recorded there and the next setting is checked.
    """
    strategy = declared[0]
    levels: list[tuple[Parameters, bool]] = [(spec.parameters, False)]
    for module in spec.modules or ():
        levels.append((module.parameters, False))
    levels += [(entry.parameters, True) for entry in spec.all_models()]
    for piece in spec.all_slices():
        levels.append((piece.parameters, False))
        levels += [(source.parameters, True) for source in piece.sources]
    others = known_parameters(extra)
    takes = list(dict.fromkeys(p.name for s in declared for p in s.params))
    ignored: list[str] = []
    warnings: list[str] = []
    for parameters, per_model_level in levels:
        for name, setting in parameters.items():
            with guard(problems):
                params = [p for p in (s.param(name) for s in declared) if p is not None]
                if not params:
                    if name in others:
                        ignored.append(setting.where)
                        continue
                    raise spec.error("unknown parameter." + did_you_mean(name, takes + list(others)),
                                     where=setting.where,
                                     hint=" and ".join(s.name for s in declared) + " take: " + ", ".join(takes)
                                     if len(declared) > 1 else f"{strategy.name} takes: " + ", ".join(takes))
                if per_model_level and not any(p.per_model for p in params):
                    warnings.append(f"{setting.where}: '{name}' is set once per merge, not per model; it is ignored "
                                    "here (as mergekit does). Move it to the top-level parameters.")
                    continue
                with within(spec.file, kinds=(SpecError,)):
                    for param in params:
                        check_setting(setting, param)
    if ignored:
        warnings.append(f"{strategy.name} does not use these parameters, so they are ignored: " + ", ".join(ignored))
    return warnings


def _output_config(config: dict[str, Any], reference: Checkpoint, jobs: list[TensorJob],
                   dtype: Optional[torch.dtype]) -> tuple[dict[str, Any], list[str]]:
    """The layout's config, with its dtype and tying updated to what is written; and notes on changes a
    user of the output should know about."""
    notes = []
    if dtype is not None:
        keys = [key for key in ("dtype", "torch_dtype") if key in config] or ["torch_dtype"]
        for key in keys:
            config[key] = dtype_name(dtype)
    writes_head = any(job.name == OUTPUT_EMBEDDING for job in jobs)
    if writes_head and OUTPUT_EMBEDDING not in reference.tensors and config.get("tie_word_embeddings", True):
        config["tie_word_embeddings"] = False
        notes.append(f"{reference.label} ties lm_head to its embeddings, but the output gets its own lm_head (an "
                     "input has one, or it comes from other models than the embeddings); it is written and "
                     "config.json says tie_word_embeddings: false.")
    if not writes_head and OUTPUT_EMBEDDING in reference.tensors and not config.get("tie_word_embeddings", True):
        config["tie_word_embeddings"] = True
        notes.append(f"{reference.label} has its own lm_head but the inputs the output head comes from tie it to "
                     "their embeddings; no lm_head is written and config.json says tie_word_embeddings: true.")
    return config, notes


def make_plan(spec: SpecLike, *, dtype: Optional[str] = None, out_dtype: Optional[str] = None, seed: int = 0,
              strategies: Iterable[Strategy] = (), allow_pickle: bool = False,
              allow_nonfinite: bool = False, config_from: Optional[str] = None) -> MergePlan:
    """Check a spec and plan the merge from the inputs' headers, without reading tensor data."""
    return plan_merge(load_spec(spec), strategies=strategies, dtype=dtype_setting(dtype, "dtype"),
                      out_dtype=dtype_setting(out_dtype, "out_dtype"), seed=seed, allow_pickle=allow_pickle,
                      allow_nonfinite=allow_nonfinite, config_from=config_from)


def dtype_setting(name: Optional[str], where: str) -> Optional[torch.dtype]:
    """A dtype setting's name (``dtype``, ``out_dtype``) as a torch dtype; a UsageError naming the setting."""
    if name is None:
        return None
    try:
        return parse_dtype(name)
    except ValueError as exc:
        raise UsageError(str(exc), where=where) from None
