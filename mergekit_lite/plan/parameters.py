"""Resolving a parameter for one tensor: filters, gradients, precedence, defaults (mergekit's rules).

A setting is a scalar, a gradient (a list of values spread evenly over the depth and interpolated
piecewise-linearly), or a list of ``{filter, value}`` entries where the first entry whose filter is a
substring of the tensor name wins (an entry without filter, or with ``"*"``, matches everything). When
nothing matches, the next level of precedence is asked: per-model, then slice, then top-level
``parameters``, then the strategy's default.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from ..errors import SpecError
from ..spec.schema import Parameters, Setting
from ..strategy import Param


def evaluate(raw: Any, tensor_name: str, t: float, param: Param, where: str) -> Optional[Any]:
    """The value of one setting for a tensor at depth ``t`` (0..1), or None when no filter matches."""
    found = _select(raw, tensor_name, where)
    if found is None:
        return None
    value, path = found
    return _gradient(value, t, param, path) if isinstance(value, list) else param.coerce(value, path)


def _select(raw: Any, tensor_name: str, where: str) -> Optional[tuple[Any, str]]:
    """(the scalar or gradient a setting gives this tensor, its YAML path), or None when no filter matches."""
    if isinstance(raw, dict):
        entries = [(raw, f"{where}.value")]
    elif isinstance(raw, list) and raw and isinstance(raw[0], dict):
        entries = [(entry, f"{where}[{i}].value") for i, entry in enumerate(raw)]
    else:
        return raw, where
    for entry, path in entries:
        flt = entry["filter"]
        if flt is None or flt == "*" or flt in tensor_name:
            return entry["value"], path
    return None


def source_of(name: str, levels: Sequence[Parameters], tensor_name: str) -> Optional[str]:
    """The YAML path of the setting that gives parameter ``name`` its value for a tensor (None: the default)."""
    for level in levels:
        setting = level.get(name)
        found = _select(setting.raw, tensor_name, setting.where) if setting is not None else None
        if found is not None:
            return found[1]
    return None


def _gradient(values: list, t: float, param: Param, where: str) -> Any:
    points = [param.coerce(v, f"{where}[{i}]") for i, v in enumerate(values)]
    if param.type in (bool, str):  # discrete values step rather than interpolate
        return points[int(t * (len(points) - 1))]
    scaled = t * (len(points) - 1)
    i0 = int(scaled)
    i1 = min(len(points) - 1, i0 + 1)
    frac = scaled - i0
    # The exact expression mergekit uses, so interpolated weights are the same doubles.
    value = (1 - frac) * points[i0] + frac * points[i1]
    return param.coerce(value, where) if param.type is int else value


def check_setting(setting: Setting, param: Param) -> None:
    """Check every literal value of a setting against the parameter's type and range, with its YAML path."""
    raw = setting.raw
    entries = [raw] if isinstance(raw, dict) else raw if isinstance(raw, list) and raw and isinstance(raw[0], dict) \
        else None
    if entries is None:
        values = raw if isinstance(raw, list) else [raw]
        paths = [f"{setting.where}[{i}]" for i in range(len(values))] if isinstance(raw, list) else [setting.where]
    else:
        values, paths = [], []
        for i, entry in enumerate(entries):
            inner = entry["value"]
            base = f"{setting.where}[{i}].value" if isinstance(raw, list) else f"{setting.where}.value"
            values += inner if isinstance(inner, list) else [inner]
            paths += [f"{base}[{j}]" for j in range(len(inner))] if isinstance(inner, list) else [base]
    for value, path in zip(values, paths):
        param.coerce(value, path)


def resolve(param: Param, levels: Sequence[Parameters], tensor_name: str, t: float,
            missing: str) -> Any:
    """Walk the precedence levels (highest first); fall back to the default; else a SpecError.

    ``missing`` describes the tensor and model for the error message.
    """
    for level in levels:
        setting = level.get(param.name)
        if setting is not None:
            value = evaluate(setting.raw, tensor_name, t, param, setting.where)
            if value is not None:
                return value
    if param.required:
        where = next((lvl[param.name].where for lvl in levels if param.name in lvl), None)
        raise SpecError(f"required parameter '{param.name}' has no value for {missing}", where=where,
                        hint=f"set {param.name} for it, or add a fallback entry without filter "
                             f"(- value: ...) to the filter list ({param.description})")
    return param.default
