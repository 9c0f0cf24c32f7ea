"""Checking LoRA adapters before combining them into one, and planning the new adapter (headers only).

What ``add_weighted_adapter`` accepts and does (peft 0.21.2, ``_check_add_weighted_adapter``), made into
errors that name the adapters and the fix:

- the new rank: ``linear``, ``ties``, ``dare_*`` and ``magnitude_prune`` need every adapter to have the same
  rank (the largest of ``r`` and its ``rank_pattern``), which is the new rank; ``cat`` sums them; the ``*svd``
  methods use ``svd_rank`` or the largest. With ``rank_pattern`` a module of a lower rank would give peft an
  adapter that does not load: refused.
- ``target_modules`` of the new adapter: the union of the lists, or the regexes joined with ``|``; a mix of
  both is refused, as peft does.
- the new config is adapters[0]'s with ``r = lora_alpha = new rank`` and no rank/alpha patterns. peft also
  keeps adapters[0]'s ``use_rslora`` before 0.22, which makes its scaling sqrt(r) instead of 1 (a bug, fixed
  upstream by huggingface/peft#3449): we write ``use_rslora: false``, so the new adapter applies what the
  factors hold.
- refused, because peft would drop them silently: DoRA magnitudes, ``lora_B`` biases, full-tensor
  replacements (``modules_to_save``, trained biases, saved embedding copies).
- every adapter must adapt the same base: the same module has the same kind and input/output sizes in each,
  and the configs name the same base model (unless ``check_base`` is off).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

from ..errors import ModelError, UsageError, did_you_mean
from .adapter import PREFIX, Adapter
from .combine import COMBINATIONS, DENSITY_METHODS, SAME_RANK_METHODS, SIGN_METHODS, Combination

Tensor = tuple[str, tuple[int, ...]]   # a float32 tensor of the new adapter: its key and shape


@dataclass(frozen=True)
class ModulePlan:
    """One module of the new adapter: which sources adapt it, its kind and the new factors' names/shapes."""

    name: str
    kind: str                          # linear, embedding or conv
    sources: tuple[int, ...]           # indexes of the adapters that adapt it, in order
    down: Tensor
    up: Tensor


@dataclass(frozen=True)
class CombinationPlan:
    combo: Combination
    combination_type: str              # after peft's rule "one adapter: linear"
    new_rank: int
    modules: tuple[ModulePlan, ...]
    config: dict[str, Any]

    @property
    def tensors(self) -> list[Tensor]:
        return [t for m in self.modules for t in (m.down, m.up)]


def check_combination(combo: Combination, count: int) -> None:
    """The parameters on their own (before any adapter is opened)."""
    method = combo.combination_type
    if method not in COMBINATIONS:
        raise UsageError(f"unknown combination type '{method}'." + did_you_mean(method, COMBINATIONS),
                         where="--method", hint="one of " + ", ".join(COMBINATIONS))
    if len(combo.weights) != count:
        raise UsageError(f"{len(combo.weights)} weight(s) for {count} adapter(s)", where="--weights",
                         hint="give one weight per adapter, in the same order (e.g. --weights 0.7,0.3), or none")
    if any(not math.isfinite(w) for w in combo.weights):
        raise UsageError("weights must be finite numbers", where="--weights")
    if method in DENSITY_METHODS and combo.density is None:
        raise UsageError(f"{method} needs a density", where="--density",
                         hint="the fraction of entries kept, in (0, 1], e.g. --density 0.5")
    if combo.density is not None:
        if method not in DENSITY_METHODS:
            raise UsageError(f"{method} does not prune, so a density means nothing to it", where="--density",
                             hint="leave --density out, or use one of " + ", ".join(DENSITY_METHODS))
        if not (0 < combo.density <= 1):
            raise UsageError(f"density {combo.density:g} is outside (0, 1]", where="--density",
                             hint="the fraction of entries kept: 1 keeps all, 0.2 keeps a fifth")
    if combo.majority_sign_method not in ("total", "frequency"):
        raise UsageError(f"unknown majority_sign_method '{combo.majority_sign_method}'", where="--majority-sign-method",
                         hint="total (sign of the summed values) or frequency (sign of the most values)")
    if combo.majority_sign_method != "total" and method not in SIGN_METHODS:
        raise UsageError(f"{method} elects no sign", where="--majority-sign-method",
                         hint="use it with " + ", ".join(SIGN_METHODS))
    _check_svd(combo)


def _check_svd(combo: Combination) -> None:
    method = combo.combination_type
    for name, value in (("svd_rank", combo.svd_rank), ("svd_clamp", combo.svd_clamp),
                        ("svd_driver", combo.svd_driver)):
        if value is not None and not method.endswith("svd"):
            raise UsageError(f"{method} does not use {name}", where=f"--{name.replace('_', '-')}",
                             hint="it applies to svd, ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd")
    if not combo.svd_full_matrices and not method.endswith("svd"):
        raise UsageError(f"{method} does not use svd_full_matrices", where="--svd-reduced")
    if combo.svd_rank is not None and combo.svd_rank < 1:
        raise UsageError(f"svd_rank {combo.svd_rank} is not a positive rank", where="--rank")
    if combo.svd_clamp is not None and not (0 <= combo.svd_clamp <= 1):
        raise UsageError(f"svd_clamp {combo.svd_clamp:g} is not a quantile in [0, 1]", where="--svd-clamp",
                         hint="e.g. 0.99 clamps the factors to the 99th percentile of their values")
    if combo.svd_driver is not None:
        raise UsageError("svd_driver chooses a cuSOLVER routine and only applies on CUDA; adapters are combined "
                         "on the CPU", where="--svd-driver", hint="leave it out")


def plan_combination(adapters: list[Adapter], combo: Combination, check_base: bool = True) -> CombinationPlan:
    """Check the adapters against each other and plan every tensor of the new adapter (headers only)."""
    check_combination(combo, len(adapters))
    for adapter in adapters:
        _refuse_uncombinable(adapter)
    if check_base:
        _check_same_base(adapters)
    method = "linear" if len(adapters) == 1 else combo.combination_type   # peft: one adapter merges linearly
    ranks = [max([a.settings.r, *a.settings.rank_pattern.values()]) for a in adapters]
    if method in SAME_RANK_METHODS and len(set(ranks)) != 1:
        listed = ", ".join(f"{a.label} r={r}" for a, r in zip(adapters, ranks))
        raise ModelError(f"{method} combines the factors entry by entry, so all adapters need the same rank "
                         f"({listed})", hint="use cat (exact, rank = sum) or svd (--rank R) for adapters of "
                                             "different ranks")
    new_rank = sum(ranks) if method == "cat" else (combo.svd_rank or max(ranks)) if method.endswith("svd") \
        else ranks[0]
    modules = tuple(_plan_module(name, adapters, method, new_rank) for name in _module_order(adapters))
    if not modules:
        raise ModelError("the adapters adapt no module", file=adapters[0].label)
    return CombinationPlan(combo, method, new_rank, modules, _config(adapters, new_rank))


def _refuse_uncombinable(adapter: Adapter) -> None:
    settings = adapter.settings
    if settings.use_dora or any(m.magnitude for m in adapter.modules.values()):
        raise ModelError("DoRA adapters cannot be combined: peft's add_weighted_adapter drops their learned "
                         "magnitudes (the new adapter starts from fresh ones)", file=adapter.label,
                         hint="fold each DoRA adapter into the base with `merge fold` and merge the models instead")
    if any(m.up_bias for m in adapter.modules.values()):
        raise ModelError("the adapter has lora_B biases (lora_bias), which add_weighted_adapter does not combine",
                         file=adapter.label, hint="fold it with `merge fold` instead")
    if adapter.replacements:
        first = sorted(adapter.replacements)[0]
        raise ModelError(f"the adapter replaces whole tensors ('{first}': modules_to_save, trained biases or a "
                         "saved embedding copy), which a combined LoRA adapter cannot hold", file=adapter.label,
                         hint="fold the adapters into the base with `merge fold`, or retrain without modules_to_save")


def _check_same_base(adapters: list[Adapter]) -> None:
    named = [(a, a.settings.base_model_name_or_path) for a in adapters if a.settings.base_model_name_or_path]
    for adapter, base in named[1:]:
        if base.rstrip("/").lower() != named[0][1].rstrip("/").lower():
            raise ModelError(f"the adapters were made for different base models: {named[0][0].label} for "
                             f"'{named[0][1]}', {adapter.label} for '{base}'",
                             hint="combine adapters of one base; if these bases are the same model under two names "
                                  "(same shapes), pass --no-check-base")


def _module_order(adapters: list[Adapter]) -> list[str]:
    """Every adapted module, layers in numeric order (layers.2 before layers.10)."""
    names = {name for a in adapters for name in a.modules}
    return sorted(names, key=lambda n: [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in n.split(".")])


def _plan_module(name: str, adapters: list[Adapter], method: str, new_rank: int) -> ModulePlan:
    sources = tuple(i for i, a in enumerate(adapters) if name in a.modules)
    shapes = []
    for i in sources:
        module = adapters[i].modules[name]
        down, up = adapters[i].info(module.down).shape, adapters[i].info(module.up).shape
        kind = "embedding" if module.is_embedding else "conv" if len(down) > 2 else "linear"
        shapes.append((kind, tuple(down[1:]), up[0], tuple(up[2:]), down[0], adapters[i].label))
    first = shapes[0]
    for other in shapes[1:]:
        if other[:4] != first[:4]:
            raise ModelError(f"module '{name}' is a {first[0]} {_dims(first)} in {first[5]} but a {other[0]} "
                             f"{_dims(other)} in {other[5]}: the adapters were made for different base models",
                             hint="combine adapters trained on the same base model")
    kind = first[0]
    if method in SAME_RANK_METHODS and any(s[4] != new_rank for s in shapes):
        low = next(s for s in shapes if s[4] != new_rank)
        raise ModelError(f"module '{name}' has rank {low[4]} in {low[5]} (rank_pattern), but {method} makes a "
                         f"rank-{new_rank} adapter from the factors themselves; peft would write an adapter that "
                         "does not load", hint="use cat or svd for adapters with rank_pattern")
    if method.endswith("svd") and new_rank > min(first[2], math.prod(first[1])):
        raise ModelError(f"svd_rank {new_rank} is larger than module '{name}' allows "
                         f"({min(first[2], math.prod(first[1]))})", hint="choose a smaller --rank")
    down_shape = (new_rank, *first[1])
    up_shape = (first[2], new_rank, *first[3])
    suffix = ("lora_embedding_A", "lora_embedding_B") if kind == "embedding" else ("lora_A.weight", "lora_B.weight")
    return ModulePlan(name, kind, sources, (f"{PREFIX}{name}.{suffix[0]}", down_shape),
                      (f"{PREFIX}{name}.{suffix[1]}", up_shape))


def _dims(shape: tuple) -> str:
    return f"{shape[2]}x{'x'.join(map(str, shape[1]))}"


def _config(adapters: list[Adapter], new_rank: int) -> dict[str, Any]:
    raw = dict(adapters[0].settings.raw)
    raw.update(r=new_rank, lora_alpha=new_rank, rank_pattern={}, alpha_pattern={}, use_rslora=False,
               use_dora=False, target_modules=_targets(adapters))
    raw.pop("peft_version", None)
    return raw


def _targets(adapters: list[Adapter]) -> Any:
    values = [a.settings.raw.get("target_modules") for a in adapters]
    strings = [isinstance(v, str) for v in values]
    if all(strings):
        return values[0] if len(set(values)) == 1 else "|".join(f"({v})" for v in values)
    if any(strings):
        mixed = ", ".join(f"{a.label}: {'a regex' if s else 'a list'}" for a, s in zip(adapters, strings))
        raise ModelError(f"target_modules is a regex in some adapters and a list in others ({mixed}); peft refuses "
                         "to combine them", hint="write the regex adapter's target_modules as a list of module "
                                                 "names in its adapter_config.json")
    names = {str(n) for v in values if v for n in v}
    return sorted(names) or None


def module_seed(seed: int, module: str) -> int:
    """The seed of one module's random masks: from the run seed and a stable hash of the module name, so a
    module gets the same masks whatever else is combined (STYLE.md: no global RNG)."""
    digest = hashlib.sha256(f"{seed}:{module}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def combine_planned(plan: CombinationPlan, adapters: list[Adapter], module: ModulePlan, seed: int):
    """The new (down, up) factors of one planned module, read from ``adapters`` and combined as peft does, with
    the DARE masks of ``module_seed(seed, name)``: what `merge adapters` writes and its validation recomputes."""
    import torch

    from .combine import RANDOM_METHODS, Factors, combine_module

    sources = []
    for i in module.sources:
        parts = adapters[i].modules[module.name]
        sources.append(Factors(adapters[i].read(parts.down), adapters[i].read(parts.up),
                               adapters[i].settings.scaling(module.name), plan.combo.weights[i]))
    generator = None
    if plan.combination_type in RANDOM_METHODS:
        generator = torch.Generator().manual_seed(module_seed(seed, module.name))
    down, up = combine_module(module.kind, sources, plan.combo, plan.new_rank, generator)
    return down.contiguous(), up.contiguous()
