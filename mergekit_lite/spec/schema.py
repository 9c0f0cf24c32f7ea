"""The merge spec: mergekit's YAML, read strictly.

Every key is checked against what we know, so a typo is an error naming its YAML path with a suggestion,
instead of being silently dropped (mergekit's pydantic models ignore unknown keys). This module checks the
*structure* of the spec; parameter names and values are checked against the chosen strategy by the planner,
which knows which strategy declares what.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
import yaml

from ..dtypes import parse_dtype
from ..errors import SpecError, did_you_mean
from .problems import Problems, misspelled
from .references import ModelPath, ModelRef, parse_reference
from .safe_yaml import HINT, load_yaml, read_spec_file
from .tokenizer import TokenizerSpec, parse_chat_template, parse_tokenizer

TOP_LEVEL_KEYS = ("merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype",
                  "tokenizer_source", "tokenizer", "chat_template", "modules", "name", "output")
OUTPUTS = ("model", "adapter")   # output: adapter combines base+adapter inputs into one adapter (docs/adapters.md)
# mergekit keys we parse but do not implement yet: refusing them is better than a different output.
UNSUPPORTED_KEYS: dict[str, str] = {}
MODEL_KEYS = ("model", "parameters")
MODULE_KEYS = ("models", "slices", "parameters")
SLICE_KEYS = ("sources", "parameters", "base_model", "residual_weight")
SOURCE_KEYS = ("model", "layer_range", "parameters")
SETTING_KEYS = ("filter", "value")

Scalar = Union[bool, int, float, str]


@dataclass(frozen=True)
class Setting:
    """A parameter value as written: scalar, gradient (list of scalars), or list of {filter, value}."""

    raw: Any
    where: str


Parameters = dict[str, Setting]


@dataclass(frozen=True)
class InputModel:
    ref: ModelRef
    parameters: Parameters
    where: str  # YAML path of this entry, e.g. "models[1]"


@dataclass(frozen=True)
class SliceSource:
    ref: ModelRef
    layer_range: tuple[int, int]
    parameters: Parameters
    where: str


@dataclass(frozen=True)
class Slice:
    sources: tuple[SliceSource, ...]
    parameters: Parameters
    base_model: Optional[ModelRef]
    where: str


@dataclass(frozen=True)
class Module:
    """One entry of ``modules:`` (mergekit's multi-module merges): the models merged into that module's tensors
    (or its ``slices``: layer stacking inside the module), and parameters between theirs and the top-level ones."""

    name: str
    models: tuple[InputModel, ...]
    parameters: Parameters
    where: str  # "modules.text_decoder"
    slices: Optional[tuple[Slice, ...]] = None


@dataclass(frozen=True)
class Spec:
    merge_method: str
    models: Optional[tuple[InputModel, ...]]
    slices: Optional[tuple[Slice, ...]]
    base_model: Optional[ModelRef]
    parameters: Parameters
    dtype: Optional[torch.dtype] = None
    out_dtype: Optional[torch.dtype] = None
    tokenizer_source: Union[str, ModelRef, None] = None   # None or "base" mean the base (or first) model
    tokenizer: Optional[TokenizerSpec] = None            # tokenizer_source or tokenizer: (spec/tokenizer.py)
    chat_template: Optional[str] = None
    text: str = ""                                       # the spec as the user wrote it
    file: Optional[str] = None                           # where it came from, for error messages
    raw: dict = field(default_factory=dict, compare=False, repr=False)
    modules: Optional[tuple[Module, ...]] = None

    def all_models(self) -> tuple[InputModel, ...]:
        """The models entries, those of every module included (models: or modules:)."""
        return tuple(self.models or ()) + tuple(m for module in self.modules or () for m in module.models)

    def all_slices(self) -> tuple[Slice, ...]:
        """The slices entries, those of every module included (slices: or modules.NAME.slices:)."""
        return tuple(self.slices or ()) + tuple(p for module in self.modules or () for p in module.slices or ())

    def references(self) -> list[tuple[ModelRef, str]]:
        """Every model reference with the YAML path where it first appears, base first."""
        found: dict[ModelRef, str] = {}
        if self.base_model is not None:
            found[self.base_model] = "base_model"
        for entry in self.all_models():
            found.setdefault(entry.ref, f"{entry.where}.model")
        for piece in self.all_slices():
            if piece.base_model is not None:
                found.setdefault(piece.base_model, f"{piece.where}.base_model")
            for source in piece.sources:
                found.setdefault(source.ref, f"{source.where}.model")
        for ref, where in self.tokenizer.references() if self.tokenizer is not None else ():
            found.setdefault(ref, where)
        return list(found.items())

    def error(self, what: str, where: Optional[str] = None, hint: Optional[str] = None) -> SpecError:
        return SpecError(what, where=where, hint=hint, file=self.file)


SpecLike = Union[str, os.PathLike, dict, Spec]   # what load_spec and run_merge take


def load_spec(source: Union[str, os.PathLike, dict, Spec]) -> Spec:
    """Read a spec from a YAML file path, a YAML string, a dict, or pass a Spec through."""
    if isinstance(source, Spec):
        return source
    if isinstance(source, dict):
        try:
            text = yaml.safe_dump(source, sort_keys=False)
        except yaml.YAMLError as exc:
            raise SpecError(f"the spec cannot be written as YAML: {exc}", hint=HINT) from None
        return parse_spec(source, text=text, file=None)
    text_or_path = os.fspath(source)
    if "\n" not in text_or_path and (os.path.exists(text_or_path) or text_or_path.endswith((".yaml", ".yml"))):
        text = read_spec_file(text_or_path)
        return parse_spec(load_yaml(text, text_or_path), text=text, file=text_or_path)
    return parse_spec(load_yaml(text_or_path, None), text=text_or_path, file=None)


def parse_spec(data: Any, *, text: str = "", file: Optional[str] = None) -> Spec:
    """Read a spec strictly. Every problem is collected (spec/problems.py): a SpecProblems is raised with the
    first one's message, all of them and what could be read (for `merge check`)."""
    fail = Problems(file)
    if not isinstance(data, dict):
        raise fail(f"the spec must be a YAML mapping, got {type(data).__name__}",
                   hint="start from an example in merge_configs/")
    _check_keys(data, TOP_LEVEL_KEYS, "", fail)
    for key, why in UNSUPPORTED_KEYS.items():
        if key in data:
            fail.report(fail(why.split(";")[0], where=key, hint=why.split("; ", 1)[-1]))
    if data.get("output", "model") not in OUTPUTS:
        output = str(data.get("output"))
        fail.report(fail(f"unknown output '{output}'." + did_you_mean(output, OUTPUTS), where="output",
                         hint="output: model (the default, a merged model) or output: adapter (a LoRA adapter)"))
    method = data.get("merge_method")
    if (not isinstance(method, str) or not method) and not misspelled(data, "merge_method", TOP_LEVEL_KEYS):
        fail.report(fail("merge_method is missing" if method is None else "merge_method must be a string",
                         where="merge_method", hint="e.g. merge_method: linear (see `merge methods`)"))
    present = [key for key in ("models", "slices", "modules") if data.get(key) is not None]
    if len(present) != 1 and (present or not any(misspelled(data, key, TOP_LEVEL_KEYS) for key in ("models", "slices", "modules"))):
        fail.report(fail("exactly one of 'models', 'slices' or 'modules' must be given" if present else
                         "no models to merge", where=None, hint="list the inputs under models: (whole models), "
                         "slices: (layer ranges) or modules: (per module of a VLM)"))
    one = present[0] if len(present) == 1 else None
    base = _read(fail, None, _reference, data, "base_model", "base_model", fail)
    models = _read(fail, None, _models, data["models"], fail) if one == "models" else None
    slices = _read(fail, None, _slices, data["slices"], fail) if one == "slices" else None
    tokenizer = _read(fail, None, parse_tokenizer, data, fail, _check_keys)
    spec = Spec(
        merge_method=method if isinstance(method, str) else "", models=models, slices=slices, base_model=base,
        parameters=_parameters(data.get("parameters"), "parameters", fail),
        dtype=_read(fail, None, _dtype, data, "dtype", fail),
        out_dtype=_read(fail, None, _dtype, data, "out_dtype", fail),
        tokenizer_source=tokenizer.source if tokenizer is not None else None, tokenizer=tokenizer,
        chat_template=_read(fail, None, parse_chat_template, data.get("chat_template"), fail), text=text, file=file,
        raw=data, modules=_read(fail, None, _modules, data["modules"], fail) if one == "modules" else None,
    )
    fail.raise_if_any(spec if one and isinstance(method, str) and method else None)   # None: too broken to check
    return spec


def _read(fail: Problems, default: Any, read, *args: Any) -> Any:
    """``read(*args)``; on a SpecError the problem is recorded and ``default`` stands for what it would read."""
    with fail.guard():
        return read(*args)
    return default


def _unread(where: str) -> ModelRef:
    """Stands for a model reference that could not be read, so the number of inputs stays what was written."""
    return ModelRef(ModelPath(f"<{where}.model>"))


def _check_keys(node: dict, allowed: tuple[str, ...], where: str, fail: Problems) -> None:
    for key in node:
        if key not in allowed:
            path = f"{where}.{key}" if where else str(key)
            fail.report(fail("unknown key." + did_you_mean(str(key), allowed), where=path,
                             hint="allowed here: " + ", ".join(allowed)))


def _reference(node: dict, key: str, where: str, fail) -> Optional[ModelRef]:
    if node.get(key) is None:
        return None
    try:
        return parse_reference(node[key], where)
    except SpecError as exc:
        raise fail(exc.what, where=exc.where, hint=exc.hint) from None


def _model(entry: dict, where: str, fail) -> ModelRef:
    """The ``model:`` of a models entry or a slice source: required, and not null (``model: ~``)."""
    if "model" not in entry:
        if misspelled(entry, "model", SOURCE_KEYS):   # said once, as an unknown key
            return _unread(where)
        raise fail("'model' is missing", where=where, hint="each entry needs model: <folder or org/name>")
    if entry["model"] is None:
        raise fail("the model is empty (null)", where=f"{where}.model",
                   hint="give a local folder or a Hub repo id such as org/name")
    reference = _reference(entry, "model", f"{where}.model", fail)
    assert reference is not None
    return reference


def _mapping(node: Any, where: str, fail) -> dict:
    if not isinstance(node, dict):
        raise fail(f"expected a mapping, got {'nothing (null)' if node is None else type(node).__name__}",
                   where=where)
    return node


def _list(node: Any, where: str, fail) -> list:
    if not isinstance(node, list) or not node:
        raise fail("expected a non-empty list", where=where)
    return node


def _models(node: Any, fail, at: str = "models") -> tuple[InputModel, ...]:
    entries = []
    for i, entry in enumerate(_list(node, at, fail)):
        where = f"{at}[{i}]"
        if isinstance(entry, str):  # shorthand some configs use: "- org/model"
            entry = {"model": entry}
        entry = _read(fail, None, _mapping, entry, where, fail)
        if entry is None:
            entries.append(InputModel(_unread(where), {}, where))
            continue
        _check_keys(entry, MODEL_KEYS, where, fail)
        entries.append(InputModel(_read(fail, _unread(where), _model, entry, where, fail),
                                  _parameters(entry.get("parameters"), f"{where}.parameters", fail), where))
    return tuple(entries)


def _modules(node: Any, fail) -> tuple[Module, ...]:
    modules, listed = [], _mapping(node, "modules", fail)
    for name, entry in listed.items():
        where = f"modules.{name}"
        entry = _read(fail, None, _mapping, entry, where, fail)
        if entry is None:
            continue
        _check_keys(entry, MODULE_KEYS, where, fail)
        if (entry.get("models") is None) == (entry.get("slices") is None):
            raise fail("the module must list either models or slices" if entry.get("models") is None else
                       "the module lists both models and slices", where=where,
                       hint="give the module models: [...] (merged whole) or slices: [...] (layers stacked)")
        slices = _read(fail, (), _slices, entry["slices"], fail, f"{where}.") if entry.get("slices") else None
        modules.append(Module(str(name), _read(fail, (), _models, entry["models"], fail, f"{where}.models")
                              if slices is None else (),
                              _parameters(entry.get("parameters"), f"{where}.parameters", fail), where, slices))
    if not listed:
        raise fail("no modules listed", where="modules", hint="e.g. modules: {text_decoder: {models: [...]}}")
    return tuple(modules)


def _slices(node: Any, fail, within: str = "") -> tuple[Slice, ...]:
    slices = []
    for i, entry in enumerate(_list(node, f"{within}slices", fail)):
        where = f"{within}slices[{i}]"
        entry = _read(fail, {}, _mapping, entry, where, fail)
        _check_keys(entry, SLICE_KEYS, where, fail)
        sources = []
        for j, source in enumerate(_read(fail, [], _list, entry.get("sources"), f"{where}.sources", fail)
                                   if entry else []):
            swhere = f"{where}.sources[{j}]"
            source = _read(fail, None, _mapping, source, swhere, fail)
            if source is None:
                sources.append(SliceSource(_unread(swhere), (0, 1), {}, swhere))
                continue
            _check_keys(source, SOURCE_KEYS, swhere, fail)
            sources.append(SliceSource(_read(fail, _unread(swhere), _model, source, swhere, fail),
                                       _read(fail, (0, 1), _layer_range, source.get("layer_range"),
                                             f"{swhere}.layer_range", fail),
                                       _parameters(source.get("parameters"), f"{swhere}.parameters", fail), swhere))
        slices.append(Slice(tuple(sources), _parameters(entry.get("parameters"), f"{where}.parameters", fail),
                            _read(fail, None, _reference, entry, "base_model", f"{where}.base_model", fail), where))
    return tuple(slices)


def _layer_range(node: Any, where: str, fail) -> tuple[int, int]:
    if not (isinstance(node, list) and len(node) == 2 and all(type(v) is int for v in node)):
        raise fail("layer_range must be two integers [start, end)", where=where,
                   hint="ranges are half-open: [0, 8] means layers 0..7")
    start, end = node
    if start < 0 or end <= start:
        raise fail(f"layer_range [{start}, {end}) is empty or negative", where=where,
                   hint="write [start, end) with 0 <= start < end; ranges are half-open")
    return start, end


def _parameters(node: Any, where: str, fail) -> Parameters:
    if node is None:
        return {}
    node = _read(fail, {}, _mapping, node, where, fail)
    read = {str(name): _read(fail, None, _setting, value, f"{where}.{name}", fail) for name, value in node.items()}
    return {name: Setting(value, f"{where}.{name}") for name, value in read.items() if value is not None}


def _setting(value: Any, where: str, fail) -> Any:
    """Check a setting's structure; values are checked against the parameter's type later."""
    if _is_scalar(value):
        return value
    if isinstance(value, dict):
        _check_keys(value, SETTING_KEYS, where, fail)
        if "value" not in value:
            raise fail("a conditional setting needs 'value'", where=where,
                       hint="write - filter: mlp\n  value: 0.5 (an entry without filter is the fallback)")
        flt = value.get("filter")
        if flt is not None and not isinstance(flt, str):
            raise fail("filter must be a string (a substring of tensor names)", where=f"{where}.filter")
        inner = value["value"]
        if not (_is_scalar(inner) or _is_gradient(inner)):
            raise fail("value must be a number, a boolean, a string or a list of those (a gradient)",
                       where=f"{where}.value")
        return {"filter": flt, "value": inner}
    if isinstance(value, list):
        if not value:
            raise fail("empty list", where=where, hint="give a value, a gradient list, or filter entries")
        if _is_gradient(value):
            return value
        if all(isinstance(item, dict) for item in value):
            return [_setting(item, f"{where}[{i}]", fail) for i, item in enumerate(value)]
        raise fail("a list must be all values (a gradient) or all {filter, value} entries", where=where)
    raise fail(f"unsupported value of type {type(value).__name__}", where=where)


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (bool, int, float, str))


def _is_gradient(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(_is_scalar(v) for v in value)


def _dtype(node: dict, key: str, fail) -> Optional[torch.dtype]:
    if node.get(key) is None:
        return None
    if not isinstance(node[key], str):
        raise fail(f"{key} must be a name such as bfloat16, got {type(node[key]).__name__}", where=key)
    try:
        return parse_dtype(node[key])
    except ValueError as exc:
        raise fail(str(exc), where=key) from None
