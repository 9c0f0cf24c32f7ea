"""The concat layout: which tensors are widened along which axis, the output shapes, and the config.

Concatenation changes tensor shapes, so it plans its own jobs (a ``Layout`` on the concat strategy):
- an MLP's input projections (gate_proj, up_proj, c_fc, fc1, ...) are joined along their output axis,
  its output projection (down_proj, c_proj, fc2, ...) along its input axis, scaled by the weights, and that
  projection's bias becomes the weighted sum of the biases;
- with ``attention: true``, q/k/v the same way by heads, o_proj like down_proj;
- every other tensor is a job of the ``fallback`` strategy, planned as ``models:`` mode would plan it.
Everything that would make the result wrong is refused before any tensor is read: different hidden sizes
or depths, attention that cannot be split by heads (the error names the config key or tensor that blocks
it), MLP tensors we do not recognise.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from ..architecture import (
    ATTENTION_BLOCKS,
    ATTENTION_IN,
    ATTENTION_OUT,
    CONV1D_LAYERS,
    LAYER_PATTERN,
    MLP_BLOCKS,
    MLP_IN,
    MLP_OUT,
    READS_HEAD_DIM,
    WIDTH_KEYS,
    count_layers,
    get_config_value,
    layer_count_key,
    layer_index,
    layer_position,
    set_config_value,
)
from ..errors import ModelError, SpecError
from ..sources.checkpoint import Checkpoint
from ..spec.references import ModelRef
from ..spec.schema import Spec
from ..strategies.registry import get_strategy
from ..strategy import Strategy
from .jobs import Dtypes, Input, Planned, Source, TensorJob, make_job, resolve_params
from .whole_models import output_names, source_name, whole_model_inputs, whole_model_job

HIDDEN_SIZE_KEYS, INTERMEDIATE_KEYS, HEADS_KEYS, KV_HEADS_KEYS = (
    WIDTH_KEYS[quantity] for quantity in ("hidden", "intermediate", "heads", "kv_heads"))
WHY = "concat joins the models' layers side by side"
ATTENTION_OFF = "set attention: false in parameters to widen only the MLPs (attention is then merged by the fallback)"
DENSE_ONLY = ("concat widens dense MLPs (mlp.gate_proj/up_proj/down_proj, mlp.c_fc/c_proj, mlp.fc1/fc2); "
              "mixture-of-experts and other layouts are not supported")


@dataclass(frozen=True)
class Widening:
    """How one tensor is joined: along ``axis`` (None: weighted sum), scaled or not, in ``chunks`` parts."""

    block: str                    # "mlp" or "attention"
    axis: Optional[int]
    scaled: bool
    chunks: int = 1
    input_projection: bool = False   # joined along its output axis: its size there is the block's width


@dataclass(frozen=True)
class Family:
    """The config values of one model that widening depends on."""

    model: Input
    section: str                  # "" or "text_config." etc.: where the layer count key lives
    hidden: int
    hidden_key: str
    conv1d: bool


class ConcatLayout:
    """The Layout of ``merge_method: concat``."""

    def companions(self, spec: Spec, extra: Sequence[Strategy]) -> list[Strategy]:
        return [_fallback(spec, extra)]

    def plan(self, spec: Spec, strategy: Strategy, checkpoints: dict[ModelRef, Checkpoint], dtypes: Dtypes,
             extra: Sequence[Strategy]) -> Planned:
        fallback = _fallback(spec, extra)
        inputs, _, lead = whole_model_inputs(spec, strategy, checkpoints)
        fb_inputs, fb_base, fb_lead = whole_model_inputs(spec, fallback, checkpoints)
        families = [_family(spec, m) for m in inputs]
        _check_same_size(spec, families)
        attention = _setting(spec, strategy, "attention")
        heads = _check_heads(spec, families) if attention else None
        reference = lead.checkpoint
        models = inputs + [m for m in fb_inputs + ([fb_base] if fb_base else []) if m not in inputs]
        names = output_names(reference, models)
        num_layers = count_layers(names)
        widened: dict[str, Widening] = {}
        for name in sorted(names, key=lambda n: (layer_index(n) or 0, n)):   # errors name the first layer's
            shape = reference.tensors[name].shape if name in reference.tensors else None   # None: a tied lm_head
            widening = _widening(name, shape, families[0], attention)
            if widening is not None:
                widened[name] = widening
        jobs = [_widened_job(spec, strategy, inputs, name, num_layers, widened[name], dtypes) if name in widened
                else whole_model_job(spec, fallback, fb_inputs, fb_base, fb_lead, name, num_layers, dtypes)
                for name in names]
        _check_every_layer_widened(widened, names, num_layers, families[0])
        config = _widened_config(reference, families[0], [j for j in jobs if j.name in widened], widened, heads)
        return Planned(jobs, config, reference)



def _widened_job(spec: Spec, strategy: Strategy, inputs: list[Input], name: str, num_layers: int,
                 widening: Widening, dtypes: Dtypes) -> TensorJob:
    layer = layer_index(name)
    t = layer_position(layer, num_layers)
    own = resolve_params(strategy, (spec.parameters,), inputs, name, t)
    params = {"weight": own["weight"], "normalize": own["normalize"], "axis": widening.axis,
              "scaled": widening.scaled, "chunks": widening.chunks}
    sources = tuple(Source(m.checkpoint, source_name(m, name)) for m in inputs)
    return make_job(name, sources, None, sources[0], params, layer, t, dtypes.load, dtypes.out,
                    strategy=strategy, shape=_joined_shape(sources, widening))


def _fallback(spec: Spec, extra: Sequence[Strategy]) -> Strategy:
    setting = spec.parameters.get("fallback")
    if setting is None:
        return get_strategy("linear", extra)
    if not isinstance(setting.raw, str):
        raise SpecError("fallback must be one method name (not a list or a filter)", where=setting.where,
                        file=spec.file, hint="e.g. fallback: linear")
    fallback = get_strategy(setting.raw, extra, where=setting.where, file=spec.file)
    if fallback.changes_shapes:
        raise SpecError(f"{fallback.name} cannot be the fallback: it changes tensor shapes itself",
                        where=setting.where, file=spec.file, hint="use a method that merges tensor by tensor")
    return fallback


def _setting(spec: Spec, strategy: Strategy, name: str) -> Any:
    """A parameter that must be one value for the whole merge (it decides the config: head counts)."""
    param = strategy.param(name)
    setting = spec.parameters.get(name)
    if setting is None:
        return param.default
    if isinstance(setting.raw, (list, dict)):
        raise SpecError(f"{name} must be one value for the whole merge (not a gradient or a filter list)",
                        where=setting.where, file=spec.file,
                        hint="the output config has one head count and one MLP width for all layers")
    return param.coerce(setting.raw, setting.where)


def _family(spec: Spec, model: Input) -> Family:
    config = model.checkpoint.config
    count_key = layer_count_key(config)
    section = count_key.rsplit(".", 1)[0] + "." if count_key and "." in count_key else ""
    hidden_key = next((section + k for k in HIDDEN_SIZE_KEYS if get_config_value(config, section + k) is not None),
                      None)
    if hidden_key is None:
        raise SpecError(f"config.json of {model.checkpoint.label} has no hidden size "
                        f"({', '.join(HIDDEN_SIZE_KEYS)})", where=model.where, file=spec.file,
                        hint=f"{WHY}, so it must know and compare their hidden sizes")
    model_type = get_config_value(config, section + "model_type") or config.get("model_type")
    return Family(model, section, get_config_value(config, hidden_key), hidden_key,
                  model_type in CONV1D_LAYERS)


def _check_same_size(spec: Spec, families: list[Family]) -> None:
    first = families[0]
    first_layers = count_layers(first.model.checkpoint.tensors)
    for family in families[1:]:
        if family.hidden != first.hidden:
            raise SpecError(f"hidden size {family.hidden} ({family.hidden_key}) differs from {first.hidden} in "
                            f"{first.model.where} ({first.model.checkpoint.label})", where=family.model.where,
                            file=spec.file, hint=f"{WHY}, so every model must have the same hidden size")
        layers = count_layers(family.model.checkpoint.tensors)
        if layers != first_layers:
            raise SpecError(f"{layers} layers, but {first.model.where} ({first.model.checkpoint.label}) has "
                            f"{first_layers}", where=family.model.where, file=spec.file,
                            hint=f"{WHY}, so every model must have the same number of layers")


@dataclass(frozen=True)
class Heads:
    heads_key: str
    heads: int
    kv_key: Optional[str]         # None: no key/value head count in the config (as many as query heads)
    kv: int
    head_dim: int


def _check_heads(spec: Spec, families: list[Family]) -> list[Heads]:
    """Each model's head counts, if the models' attention can be joined by heads; else the blocking key."""
    found: list[Heads] = []
    for family in families:
        config, section = family.model.checkpoint.config, family.section

        def blocked(what: str) -> SpecError:
            return SpecError(f"attention cannot be widened by heads: {what}", where=family.model.where,
                             file=spec.file, hint=ATTENTION_OFF)

        heads_key = next((section + k for k in HEADS_KEYS if get_config_value(config, section + k)), None)
        if heads_key is None:
            raise blocked(f"config.json has no head count ({', '.join(HEADS_KEYS)})")
        heads = get_config_value(config, heads_key)
        kv_key = next((section + k for k in KV_HEADS_KEYS if get_config_value(config, section + k)), None)
        kv = get_config_value(config, kv_key) if kv_key else heads
        head_dim = get_config_value(config, section + "head_dim")
        model_type = get_config_value(config, section + "model_type") or config.get("model_type")
        if head_dim is None and model_type not in READS_HEAD_DIM:
            raise blocked(f"{heads_key} ({model_type} has no head_dim in config.json, so its heads are "
                          f"{family.hidden_key} / {heads_key} wide and more heads would make them narrower)")
        found.append(Heads(heads_key, heads, kv_key, kv, head_dim or family.hidden // heads))
        first, this = found[0], found[-1]
        if this.head_dim != first.head_dim:
            raise blocked(f"head_dim is {this.head_dim} here but {first.head_dim} in {families[0].model.where}")
        if this.heads * first.kv != first.heads * this.kv:
            raise blocked(f"{kv_key or heads_key}: {heads} query heads share {kv} key/value heads here, but "
                          f"{first.heads} share {first.kv} in {families[0].model.where}, so joined heads would "
                          "pair queries with the wrong keys")
    return found


def _widening(name: str, shape: Optional[tuple[int, ...]], family: Family, attention: bool) -> Optional[Widening]:
    """How ``name`` is widened, or None for the fallback. Shapes are checked against the hidden size."""
    match = LAYER_PATTERN.search(name)
    if match is None or shape is None:
        return None
    inner = name[match.end():].split(".")       # e.g. ["mlp", "down_proj", "weight"]
    block = "mlp" if inner[0] in MLP_BLOCKS else "attention" if inner[0] in ATTENTION_BLOCKS else None
    if block is None or (block == "attention" and not attention):
        return None
    projections = MLP_IN if block == "mlp" else ATTENTION_IN       # joined along their output axis
    outputs = MLP_OUT if block == "mlp" else ATTENTION_OUT         # joined along their input axis, scaled
    module = inner[1] if len(inner) == 3 else None
    if module not in projections and module not in outputs:
        if block == "attention":
            raise SpecError(f"attention cannot be widened by heads: concat does not know how to join tensor "
                            f"'{name}'", where=family.model.where, hint=ATTENTION_OFF)
        raise ModelError("the MLP cannot be widened: concat does not know how to join this tensor",
                         where=f"tensor '{name}'", file=family.model.checkpoint.label, hint=DENSE_ONLY)
    if inner[-1] == "bias":   # (out,): joined like its weight's rows, or summed after a join along the input
        return Widening(block, 0, False, projections[module], True) if module in projections \
            else Widening(block, None, True)
    if len(shape) != 2:
        raise ModelError(f"expected a matrix, got shape {list(shape)}", where=f"tensor '{name}'",
                         file=family.model.checkpoint.label, hint=DENSE_ONLY)
    # nn.Linear stores (out, in); Conv1D stores (in, out). The residual-stream side has the hidden size.
    out_axis, in_axis = (1, 0) if family.conv1d else (0, 1)
    hidden_axis = in_axis if module in projections else out_axis
    if shape[hidden_axis] != family.hidden:
        raise ModelError(f"shape {list(shape)} has no hidden size {family.hidden} on axis {hidden_axis}, where a "
                         f"{'Conv1D (in, out)' if family.conv1d else 'Linear (out, in)'} layout puts it",
                         where=f"tensor '{name}'", file=family.model.checkpoint.label,
                         hint="concat cannot tell how this tensor is laid out, so it cannot widen it")
    if module in projections:
        return Widening(block, out_axis, False, projections[module], True)
    return Widening(block, in_axis, True)


def _joined_shape(sources: Sequence[Source], widening: Widening) -> tuple[int, ...]:
    """All dimensions but the joined one must agree; the joined one adds up."""
    first = sources[0].info.shape
    for source in sources:
        shape = source.info.shape
        same = len(shape) == len(first) and all(a == b for i, (a, b) in enumerate(zip(shape, first))
                                                if i != widening.axis)
        if not same or (widening.axis is not None and shape[widening.axis] % widening.chunks):
            along = "" if widening.axis is None else f" except along axis {widening.axis}"
            raise ModelError(f"shape {list(shape)} does not match {list(first)} in {sources[0].checkpoint.label}"
                             f"{along}", where=f"tensor '{source.name}'", file=source.checkpoint.label,
                             hint="the models have different architectures; concatenate models of one family")
    if widening.axis is None:
        return first
    return tuple(sum(s.info.shape[i] for s in sources) if i == widening.axis else d for i, d in enumerate(first))


def _check_every_layer_widened(widened: dict[str, Widening], names: list[str], num_layers: int,
                               family: Family) -> None:
    """An MLP we did not recognise would be averaged silently: every layer must have its MLP widened."""
    for layer in range(num_layers):
        kinds = {w.input_projection for n, w in widened.items() if w.block == "mlp" and layer_index(n) == layer}
        if kinds != {True, False}:
            example = next((n for n in names if layer_index(n) == layer), f"layer {layer}")
            raise ModelError(f"found no MLP to widen in layer {layer} (e.g. '{example}')",
                             file=family.model.checkpoint.label, hint=DENSE_ONLY)


def _widened_config(reference: Checkpoint, family: Family, jobs: list[TensorJob], widened: dict[str, Widening],
                    heads: Optional[list[Heads]]) -> dict:
    """The reference config with the MLP width and the head counts set to the joined ones."""
    config = copy.deepcopy(reference.config)
    if not config:
        return config
    section = family.section
    widths = {job.shape[widened[job.name].axis] // widened[job.name].chunks for job in jobs
              if widened[job.name].block == "mlp" and widened[job.name].input_projection}
    key = next((section + k for k in INTERMEDIATE_KEYS if _has(config, section + k)), None)
    if key is None:
        raise ModelError(f"config.json has no MLP width key ({', '.join(INTERMEDIATE_KEYS)})",
                         file=reference.label, hint="the output's config.json must say how wide the MLPs are")
    if len(widths) != 1:
        raise ModelError(f"the joined MLPs have different widths {sorted(widths)}, which one {key} cannot describe",
                         file=reference.label, hint="concatenate models whose layers all have one MLP width")
    set_config_value(config, key, widths.pop())
    if heads:
        set_config_value(config, heads[0].heads_key, sum(h.heads for h in heads))
        if heads[0].kv_key is not None:
            set_config_value(config, heads[0].kv_key, sum(h.kv for h in heads))
        set_config_value(config, section + "head_dim", heads[0].head_dim)   # no longer hidden / heads
    return config


def _has(config: dict, dotted: str) -> bool:
    """Whether the key exists, even with a null value (GPT-2's n_inner: null means 4 * n_embd)."""
    *parents, last = dotted.split(".")
    node: Any = config
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
    return isinstance(node, dict) and last in node
