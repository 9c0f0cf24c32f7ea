"""The output's config.json: which input it comes from, and the inputs' configs checked against each other.

A merged model is run with one config.json. Inputs that agree on every tensor shape can still disagree on
how those tensors are used: the rotary base (``rope_theta``), the context length, the activation, the norm
epsilon, sliding windows, soft-capping (architecture.BEHAVIOUR_KEYS). mergekit writes the base model's config
(else the first model's) and says nothing; here the merge is refused, naming every differing key and each
model's value, unless the user names the model whose config.json the output takes (``config_from``,
``--config-from``). A key that one model sets and another does not counts as a difference: its absent value
is whatever default that architecture's code has, which may not be the other model's value.

Quantized inputs (``quantization_config``: fp8 with block scales, GPTQ, AWQ, bitsandbytes) are refused here
too: their stored values are not the weights, so no element-wise merge of them means anything.

Everything here reads configs only, before any tensor data.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any, Optional

from ..architecture import BEHAVIOUR_KEYS, TEXT_SECTION, behaviour_settings, get_config_value
from ..errors import ModelError, UsageError, did_you_mean
from ..sources.checkpoint import Checkpoint
from ..spec.references import ModelRef
from ..spec.schema import Spec
from .jobs import Planned

CONFIG_FROM_HINT = "--config-from MODEL (config_from= in run_merge)"


def merged_models(spec: Spec, checkpoints: dict[ModelRef, Checkpoint]) -> dict[ModelRef, str]:
    """The references whose tensors are merged (not one used only for its tokenizer), with their YAML paths."""
    return {ref: where for ref, where in spec.references() if not where.startswith("tokenizer") and ref in checkpoints}


def refuse_unmergeable(spec: Spec, checkpoints: dict[ModelRef, Checkpoint]) -> None:
    """Inputs no merge can take, found from configs and headers: quantized models, and tensors with a zero-size
    dimension (no values: the checkpoint is broken, and an empty weight loads as a randomly initialised one)."""
    for ref, where in merged_models(spec, checkpoints).items():
        checkpoint = checkpoints[ref]
        for name, info in checkpoint.tensors.items():
            if 0 in info.shape:
                raise ModelError(f"has a zero-size dimension (shape {list(info.shape)}): it holds no values",
                                 where=f"tensor '{name}'", file=checkpoint.label,
                                 hint="the checkpoint is broken or was cut down; download it again, or merge a "
                                      "complete one")
        for key in ("quantization_config", TEXT_SECTION + "quantization_config"):
            found = get_config_value(checkpoint.config, key)
            if found is None:
                continue
            method = found.get("quant_method") if isinstance(found, dict) else None
            raise ModelError(f"is quantized (config.json has {key}{f', quant_method {method}' if method else ''}): "
                             "its stored values are not the weights, so merging them would give wrong numbers",
                             file=checkpoint.label, where=where,
                             hint="merge the unquantized release of this model (e.g. its bfloat16 weights), or "
                                  "dequantize it first")


def choose_config(spec: Spec, checkpoints: dict[ModelRef, Checkpoint], planned: Planned, config_from: Optional[str],
                  per_layer: bool) -> tuple[dict[str, Any], list[str], Optional[str]]:
    """(the output config before dtype and tying, notes for the card, the YAML path of ``config_from``'s model).

    Refuses inputs that disagree on a behaviour key unless ``config_from`` names the model to take it from."""
    merged = merged_models(spec, checkpoints)
    used = {id(source.checkpoint) for job in planned.jobs for source in job.sources}
    models = [(ref, where) for ref, where in merged.items() if id(checkpoints[ref]) in used]
    chosen = _chosen(spec, merged, config_from) if config_from is not None else None
    differences = _differences([checkpoints[ref] for ref, _ in models], per_layer)
    if differences and chosen is None:
        other = next(ref for ref, _ in models if checkpoints[ref] is not planned.reference)
        raise ModelError("the models' config.json disagree on settings that change what the model computes: "
                         f"{_describe(differences)}; the output would silently take {planned.reference.label}'s",
                         file=spec.file,
                         hint="merge models of one configuration; or, if that is intended, say whose config.json "
                              f"the output takes with {CONFIG_FROM_HINT}, e.g. --config-from {other}")
    if chosen is None:
        return planned.config, [], None
    ref, where = chosen
    config = planned.config
    if checkpoints[ref] is not planned.reference:
        config = _with_layout_edits(checkpoints[ref].config, planned.reference.config, planned.config)
    notes = [f"config.json is {ref}'s (--config-from); the models disagree on {_describe(differences)}."
             ] if differences else []
    return config, notes, where


def _chosen(spec: Spec, merged: dict[ModelRef, str], config_from: str) -> tuple[ModelRef, str]:
    """The merged model ``config_from`` names: as written in the spec, its folder, or its YAML path."""
    wanted = config_from.strip()
    for ref, where in merged.items():
        local = ref.model.revision is None and not ref.adapters
        if wanted in (str(ref), str(ref.model), where, where.removesuffix(".model")) or (
                local and os.path.abspath(wanted) == os.path.abspath(ref.model.path)):
            return ref, where
    names = [str(ref) for ref in merged]
    raise UsageError(f"'{config_from}' is not one of the models the spec merges." + did_you_mean(wanted, names),
                     where="config_from", hint="give one as the spec writes it: " + ", ".join(names))


def _differences(models: list[Checkpoint], per_layer: bool) -> dict[str, list[tuple[str, Any]]]:
    """{key: [(model label, value or None), ...]} for every behaviour key the models do not all agree on.
    A model without a config.json says nothing, so it is left out."""
    settings = [(m.label, behaviour_settings(m.config, per_layer)) for m in models if m.config]
    order = {key: i for i, key in enumerate(section + k for section in ("", TEXT_SECTION) for k in BEHAVIOUR_KEYS)}
    keys = sorted({key for _, found in settings for key in found}, key=order.__getitem__)
    differing = {}
    for key in keys:
        values = [(label, found.get(key)) for label, found in settings]
        if any(value != values[0][1] for _, value in values):
            differing[key] = values
    return differing


def _describe(differences: dict[str, list[tuple[str, Any]]]) -> str:
    """'rope_theta (./a: 10000.0, ./b: 500000.0); hidden_act (...)'."""
    return "; ".join(f"{key} (" + ", ".join(f"{label}: {_value(value)}" for label, value in values) + ")"
                     for key, values in differences.items())


def _value(value: Any) -> str:
    return "not set" if value is None else json.dumps(value, separators=(", ", ": "), sort_keys=True)


def _with_layout_edits(chosen: dict[str, Any], before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """``chosen``'s config with the layout's own edits (what turned ``before``, the reference model's config, into
    ``after``: a stacked layer count, re-sliced per-layer lists, concat's widths) applied to it."""
    config = copy.deepcopy(chosen)
    _apply_edits(config, before, after)
    return config


def _apply_edits(config: dict[str, Any], before: dict[str, Any], after: dict[str, Any]) -> None:
    for key in list(dict.fromkeys([*before, *after])):
        if key not in after:
            config.pop(key, None)
        elif key not in before:
            config[key] = copy.deepcopy(after[key])
        elif isinstance(before[key], dict) and isinstance(after[key], dict) and isinstance(config.get(key), dict):
            _apply_edits(config[key], before[key], after[key])
        elif before[key] != after[key]:
            config[key] = copy.deepcopy(after[key])
