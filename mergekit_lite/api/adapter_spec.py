"""A merge spec with ``output: adapter``: its ``base+adapter`` inputs combined into one LoRA adapter.

Every model is ``BASE+ADAPTER`` with one base, so merging the models is merging the adapters' changes
``dW_i``; the spec's method maps onto peft's ``add_weighted_adapter`` combination that does the same to the
changes (docs/adapters.md has the table and its limits):

| spec method | combination | what the new adapter applies |
| --- | --- | --- |
| linear (normalize: true, the default) | cat, weights w_i / sum w | exactly sum w_i dW_i / sum w |
| task_arithmetic | cat, weights lambda * w_i | exactly lambda * sum w_i dW_i |
| ties, dare_ties, dare_linear | ties_svd, dare_ties_svd, dare_linear_svd | peft's variant on the full changes, then SVD |
| a peft combination type (cat, svd, ...) | itself | as ``merge adapters`` |

Other methods are refused: they are not a function of the changes alone (slerp and friends interpolate on a
sphere of whole weights, model_stock and karcher need the weights themselves, breadcrumbs/della/sce/
arcee_fusion/ram have no peft counterpart). Parameters must be one number each (no per-layer gradients or
filters: an adapter combination takes one value), ``density`` the same for every model.
"""

from __future__ import annotations

from typing import Any

from ..errors import UsageError, did_you_mean
from ..lora.combine import COMBINATIONS
from ..spec.schema import Spec

MAPPED = {"linear": "cat", "task_arithmetic": "cat", "ties": "ties_svd", "dare_ties": "dare_ties_svd",
          "dare_linear": "dare_linear_svd"}
WHY_NOT = {
    "slerp": "it interpolates whole weights on a sphere, which is not a function of the adapters' changes",
    "nuslerp": "it interpolates whole weights on a sphere, which is not a function of the adapters' changes",
    "multislerp": "it interpolates whole weights on a sphere, which is not a function of the adapters' changes",
    "karcher": "it averages whole weights on a sphere, which is not a function of the adapters' changes",
    "model_stock": "it needs the angles between whole fine-tuned weights",
    "passthrough": "it copies one model; fold that adapter with `merge fold` instead",
}
SETTINGS = {"cat": ("weight",), "ties_svd": ("weight", "density", "lambda", "normalize"),
            "dare_ties_svd": ("weight", "density", "lambda", "normalize"),
            "dare_linear_svd": ("weight", "density", "lambda", "normalize")}
SPEC_KEYS_REFUSED = ("slices", "modules", "tokenizer", "tokenizer_source", "chat_template", "dtype", "out_dtype")
# `merge run` options (MergeSettings fields) that change nothing of an adapter output, by their flag: refused when
# set. Those that apply: --seed, --overwrite, --dry-run, --allow-pickle, --no-validate (the adapter is validated by
# default, on the CPU), -q; --no-copy-tokenizer asks for what an adapter output does anyway (it has no tokenizer).
NOT_FOR_ADAPTERS = {"max_shard_size": "--max-shard-size", "dtype": "--dtype", "out_dtype": "--out-dtype",
                    "device": "--device", "allow_nonfinite": "--allow-nonfinite", "push_to_hub": "--push-to-hub",
                    "private": "--private", "license": "--license", "base_models": "--base-model",
                    "resume": "--resume", "executor": "--executor", "ray_address": "--ray-address",
                    "config_from": "--config-from", "write_model_card": "--no-write-model-card",
                    "allow_crimes": "--allow-crimes", "trust_remote_code": "--trust-remote-code",
                    "num_threads": "--num-threads"}


def refuse_settings(run: Any) -> None:
    """A UsageError naming every option set (``run``: MergeSettings) that an adapter output would ignore."""
    default = type(run)()
    given = [name for name in NOT_FOR_ADAPTERS if getattr(run, name) != getattr(default, name)]
    if given:
        flags = ", ".join(NOT_FOR_ADAPTERS[name] for name in given)
        raise UsageError(f"{flags} {'does' if len(given) == 1 else 'do'} not apply to an adapter output "
                         "(output: adapter)",
                         hint="an adapter output is one float32 adapter_model.safetensors with its adapter_config.json "
                              "and card, made on the CPU; drop the option, or use output: model for a merged model")


def adapter_combination(spec: Spec) -> tuple[list[str], dict[str, Any]]:
    """The adapters (as written) and ``merge_adapters`` keyword arguments of an ``output: adapter`` spec."""
    for key in SPEC_KEYS_REFUSED:
        if spec.raw.get(key) is not None:
            raise spec.error(f"{key} has no meaning for an adapter output", where=key,
                             hint="an adapter holds low-rank changes only (float32); drop the key or use output: model")
    method = spec.merge_method
    combination = MAPPED.get(method, method if method in COMBINATIONS else None)
    if combination is None:
        why = WHY_NOT.get(method, "peft's add_weighted_adapter has no combination that does what it does")
        raise spec.error(f"{method} cannot make an adapter: {why}", where="merge_method",
                         hint="use linear, task_arithmetic, ties, dare_ties or dare_linear (or a combination type: "
                              + ", ".join(COMBINATIONS) + "), or output: model")
    adapters, base = _adapters(spec)
    if spec.base_model is not None and (spec.base_model.adapters or spec.base_model.model != base):
        raise spec.error(f"base_model is '{spec.base_model}', but the adapters are of '{base}'", where="base_model",
                         hint="base_model must be the models' common base (or be left out)")
    values = _parameters(spec, method, combination)
    weights = values["weight"]
    if method == "linear":
        total = sum(weights)
        if values.get("normalize", True) is False and abs(total - 1) > 1e-6:
            raise spec.error("linear with normalize: false also scales the base by the sum of the weights "
                             f"({total:g}), which no adapter can do", where="parameters.normalize",
                             hint="make the weights sum to 1, or drop normalize")
        if abs(total) < 1e-8:
            raise spec.error("the weights sum to 0, so normalize cannot divide by them", where="parameters")
        weights = [w / total for w in weights]
    elif method in MAPPED:
        scale = values.get("lambda", 1.0)
        if values.get("normalize", False) and method == "task_arithmetic":
            scale /= sum(weights)
        weights = [scale * w for w in weights]
    kwargs: dict[str, Any] = {"combination_type": combination, "weights": weights}
    for name in ("density", "svd_rank", "svd_clamp", "majority_sign_method"):
        if name in values:
            kwargs[name] = values[name]
    return adapters, kwargs


def _adapters(spec: Spec) -> tuple[list[str], Any]:
    adapters, bases = [], set()
    for entry in spec.models or ():
        ref = entry.ref
        if len(ref.adapters) != 1:
            raise spec.error(f"'{ref}' is not one base+adapter", where=f"{entry.where}.model",
                             hint="with output: adapter every model is BASE+ADAPTER (one adapter), of one base")
        bases.add(ref.model)
        adapters.append(str(ref.adapters[0].path))
    if len(bases) > 1:
        listed = ", ".join(sorted(map(str, bases)))
        raise spec.error(f"the adapters are of different bases ({listed})", where="models",
                         hint="an adapter output combines adapters of one base")
    return adapters, next(iter(bases))


def _parameters(spec: Spec, method: str, combination: str) -> dict[str, Any]:
    """One value per parameter: weights per model, the rest the same for every model."""
    allowed = SETTINGS.get(combination, ("weight", "density", "svd_rank", "svd_clamp", "majority_sign_method"))
    if method in ("linear", "task_arithmetic"):
        allowed = ("weight", "normalize") + (("lambda",) if method == "task_arithmetic" else ())
    shared: dict[str, Any] = {name: _scalar(spec, s.raw, s.where) for name, s in spec.parameters.items()}
    weights = []
    per_model: dict[str, set] = {}
    for entry in spec.models or ():
        values = {**shared, **{n: _scalar(spec, s.raw, s.where) for n, s in entry.parameters.items()}}
        for name in values:
            if name not in allowed:
                raise spec.error(f"{name} has no meaning for an adapter made with {combination}."
                                 + did_you_mean(name, allowed), where=f"{entry.where}.parameters.{name}",
                                 hint="allowed: " + ", ".join(allowed))
        weight = values.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            where = f"{entry.where}.parameters.weight" if "weight" in entry.parameters else "parameters.weight"
            raise spec.error(f"weight must be a number, got {weight!r}", where=where, hint="e.g. weight: 0.5")
        weights.append(float(weight))
        for name, value in values.items():
            if name != "weight":
                per_model.setdefault(name, set()).add(value)
    result: dict[str, Any] = {"weight": weights}
    for name, found in per_model.items():
        if len(found) > 1:
            raise spec.error(f"{name} differs between models ({', '.join(map(str, sorted(found)))}), but an adapter "
                             "combination takes one value", where="models", hint=f"give one {name} under parameters:")
        result[name] = found.pop()
    return result


def _scalar(spec: Spec, value: Any, where: str) -> Any:
    if isinstance(value, (bool, int, float, str)):
        return value
    raise spec.error("per-layer values (gradients, filters) have no adapter equivalent", where=where,
                     hint="give one number")


def run_adapter_spec(spec: Spec, out: str, run: Any, result_class: Any) -> Any:
    """``run_merge`` of an ``output: adapter`` spec: the adapter folder, described as a MergeResult."""
    from .adapters import merge_adapters

    refuse_settings(run)
    adapters, kwargs = adapter_combination(spec)
    result = merge_adapters(adapters, out, seed=run.seed, overwrite=run.overwrite, dry_run=run.dry_run,
                            allow_pickle=run.allow_pickle, spec_text=spec.text, validate=False, **kwargs)
    # stages: the line `merge run` prints instead of "Merged N tensors" (what was written is an adapter)
    merged = result_class(out, 2 * result.modules, result.bytes, result.seconds, shards=1, dry_run=run.dry_run,
                          summary=str(result), stages=(str(result),))
    if run.validate and not run.dry_run:   # as run_merge: ValidationFailed (strict) or a warning
        from .adapter_checks import validated

        return validated(merged, "cpu", run.strict, "run_merge")
    return merged
