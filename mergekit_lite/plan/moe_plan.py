"""Planning `merge moe` from headers and configs: checks every expert against the base, then one job per
output tensor (the layout of moe.py). Nothing is read but headers; the routers are computed afterwards
(engine/router.py), before the first byte is written."""

from __future__ import annotations

import copy
import dataclasses
from contextlib import ExitStack
from typing import Any, Optional

import torch

from ..architecture import layer_count_key
from ..errors import ModelError
from ..sources.checkpoint import Checkpoint
from ..spec.moe import Expert, MoESpec
from ..spec.schema import InputModel, Spec
from ..strategies.passthrough import STRATEGY as PASSTHROUGH
from .jobs import Source, TensorJob
from .moe import (
    MLP,
    OUTPUTS,
    PROJECTIONS,
    ExpertSource,
    MoEPlan,
    RouterSource,
    StackedSource,
    ZeroSource,
    choose_output,
    open_moe_inputs,
    output_dtype,
)

MOE_STRATEGY = dataclasses.replace(PASSTHROUGH, name="moe", title="Mixture of experts (mergekit-moe)")


def plan_moe(spec: MoESpec, *, seed: int = 0, allow_pickle: bool = False, allow_all_same: bool = False) -> MoEPlan:
    """Check the MoE file against its models and plan every output tensor. Reads headers only."""
    if not allow_all_same and len(spec.experts) > 1 and all(e.ref == spec.experts[0].ref for e in spec.experts):
        raise spec.error("every expert is the same model: the MoE would compute exactly what that model computes, "
                         "at a higher cost", where="experts",
                         hint="name different models, or pass --i-understand-this-is-not-useful-without-training "
                              "(as mergekit-moe) to build it anyway, e.g. to train it further")
    with ExitStack() as opened:
        checkpoints = open_moe_inputs(spec, opened, allow_pickle)
        base = checkpoints[spec.base_model]
        model_type = base.config.get("model_type")
        layers = _check_experts(spec, checkpoints, model_type)
        output = choose_output(spec, model_type)
        dtype = output_dtype(spec, base.config)
        routers: dict = {}
        jobs = _jobs(spec, checkpoints, output, layers, dtype, routers, seed)
        config = moe_config(base.config, output, spec, dtype)
        opened.pop_all()
    plain = Spec("moe", tuple(InputModel(e.ref, {}, e.where) for e in spec.experts + spec.shared_experts), None,
                 spec.base_model, {}, text=spec.text, file=spec.file)
    return MoEPlan(plain, MOE_STRATEGY, checkpoints, jobs, config, base, base.folder, seed, moe=spec, output=output,
                   routers=routers, layers=layers)


def _check_experts(spec: MoESpec, checkpoints: dict, model_type: Optional[str]) -> int:
    """Every expert of the base's model type, layer count and MLP shapes (mergekit requires one architecture)."""
    base = checkpoints[spec.base_model]
    key = layer_count_key(base.config)
    layers = base.config.get(key) if key else None
    if not isinstance(layers, int) or key != "num_hidden_layers":
        raise ModelError("config.json has no num_hidden_layers", file=base.label,
                         hint="merge moe builds Mixtral/Qwen MoE models from Llama, Mistral, Qwen2 or Qwen3 models")
    wanted = {n: base.tensors[n].shape for n in _mlp_names(layers) if n in base.tensors}
    for expert in spec.experts + spec.shared_experts:
        found = checkpoints[expert.ref]
        other = found.config.get("model_type")
        if other != model_type:
            raise ModelError(f"model_type {other!r} != base model's {model_type!r}", where=expert.where,
                             file=found.label, hint="every expert must have the base model's architecture")
        for name in _mlp_names(layers):
            if name not in found.tensors:
                raise ModelError("tensor missing from this expert", where=f"tensor '{name}'", file=found.label,
                                 hint="experts need the base model's dense MLPs (gate_proj, up_proj, down_proj) in "
                                      "every layer")
            shape = found.tensors[name].shape
            if name in wanted and shape != wanted[name]:
                raise ModelError(f"shape {list(shape)} != base {list(wanted[name])}", where=f"tensor '{name}'",
                                 file=found.label, hint="every expert must have the base model's size")
    return layers


def _mlp_names(layers: int) -> list[str]:
    return [f"model.layers.{i}.mlp.{p}.weight" for i in range(layers) for p in PROJECTIONS]


def _jobs(spec: MoESpec, checkpoints: dict, output: str, layers: int, dtype: Optional[torch.dtype],
          routers: dict, seed: int) -> list[TensorJob]:
    base = checkpoints[spec.base_model]
    hidden = base.config["hidden_size"]
    jobs = [_copy(name, Source(base, name), dtype) for name in base.tensors if not MLP.match(name)]
    if output == "qwen":
        jobs += _zero_biases(base, layers, dtype)
    for i in range(layers):
        prefix = f"model.layers.{i}.mlp"
        if output == "qwen":
            jobs += _per_expert(spec, checkpoints, prefix, dtype, seed)
        else:
            jobs += _stacked(spec, checkpoints, prefix, dtype, seed)
        kinds = [("gate.weight", "experts", len(spec.experts))]
        if output == "qwen":
            kinds.append(("shared_expert_gate.weight", "shared", 1))
        for suffix, kind, rows in kinds:
            name = f"{prefix}.{suffix}"
            jobs.append(_copy(name, RouterSource(base, name, routers, kind, i, (rows, hidden)), dtype))
    return jobs


def _copy(name: str, source: Source, dtype: Optional[torch.dtype]) -> TensorJob:
    info = source.info
    stored = info.dtype
    if not stored.is_floating_point:
        return TensorJob(name, info.shape, stored, stored, None, (source,), None, {"scale": (None,)}, None, 0.0,
                         PASSTHROUGH, copy=True)
    return TensorJob(name, info.shape, dtype or stored, stored, None, (source,), None, {"scale": (None,)}, None, 0.0,
                     PASSTHROUGH)


def _stacked(spec: MoESpec, checkpoints: dict, prefix: str, dtype, seed: int) -> list[TensorJob]:
    """Mixtral / Qwen3-MoE: the fused expert tensors."""
    def parts(expert: Expert, projections: tuple[str, ...]) -> tuple[Source, ...]:
        return tuple(Source(checkpoints[expert.ref], f"{prefix}.{p}.weight") for p in projections)

    jobs = []
    for name, projections, residual in (("gate_up_proj", ("gate_proj", "up_proj"), False),
                                        ("down_proj", ("down_proj",), True)):
        out = f"{prefix}.experts.{name}"
        source = StackedSource(checkpoints[spec.base_model], out, tuple(parts(e, projections) for e in spec.experts),
                               spec.experts, residual, seed, dtype)
        jobs.append(_copy(out, source, dtype))
    return jobs


def _per_expert(spec: MoESpec, checkpoints: dict, prefix: str, dtype, seed: int) -> list[TensorJob]:
    """Qwen2-MoE: each expert's projections, then the shared expert's."""
    targets = [(f"experts.{i}", e) for i, e in enumerate(spec.experts)] + [("shared_expert", spec.shared_experts[0])]
    jobs = []
    for projection in PROJECTIONS:
        for target, expert in targets:
            out = f"{prefix}.{target}.{projection}.weight"
            source = ExpertSource(checkpoints[expert.ref], f"{prefix}.{projection}.weight", expert,
                                  projection == "down_proj", seed, out)
            jobs.append(_copy(out, source, dtype))
    return jobs


def _zero_biases(base: Checkpoint, layers: int, dtype) -> list[TensorJob]:
    """Qwen2-MoE has q/k/v biases; a Llama/Mistral base has none: zeros (mergekit's choice)."""
    config = base.config
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    jobs = []
    for i in range(layers):
        for proj, heads in (("q_proj", "num_attention_heads"), ("k_proj", "num_key_value_heads"),
                            ("v_proj", "num_key_value_heads")):
            name = f"model.layers.{i}.self_attn.{proj}.bias"
            if name not in base.tensors:
                count = config.get(heads) or config["num_attention_heads"]
                jobs.append(_copy(name, ZeroSource(base, name, (count * head_dim,)),
                                  dtype or base.tensors[f"model.layers.{i}.self_attn.{proj}.weight"].dtype))
    return jobs


def moe_config(base: dict[str, Any], output: str, spec: MoESpec, dtype: Optional[torch.dtype]) -> dict[str, Any]:
    """The base config with mergekit's MoE settings (mergekit/moe/*.py _generate_config)."""
    from ..dtypes import dtype_name

    config = copy.deepcopy(base)
    model_type, architecture, _ = OUTPUTS[output]
    config.update(model_type=model_type, architectures=[architecture], num_experts_per_tok=spec.experts_per_token)
    if output == "mixtral":
        config.update(num_local_experts=len(spec.experts), sliding_window=None)
    else:
        config.update(num_experts=len(spec.experts), decoder_sparse_step=1, norm_topk_prob=True,
                      moe_intermediate_size=config["intermediate_size"])
    if output == "qwen":
        config.update(sliding_window=None, use_sliding_window=False,
                      shared_expert_intermediate_size=config["intermediate_size"])
    if dtype is not None:
        for key in [k for k in ("dtype", "torch_dtype") if k in config] or ["torch_dtype"]:
            config[key] = dtype_name(dtype)
    return config
