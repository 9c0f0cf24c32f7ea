"""Which strategies exist: one explicit list of built-ins, plus third-party entry points.

No registration by import side effect. A third-party package exposes a ``Strategy`` object under the
entry-point group ``mergekit_lite.strategies``; they are loaded only when a name is not built in or when
all methods are listed, so ``import mergekit_lite`` stays fast.
"""

from __future__ import annotations

from importlib import import_module
from typing import Iterable, Optional

from ..errors import SpecError, did_you_mean
from ..strategy import Strategy

ENTRY_POINT_GROUP = "mergekit_lite.strategies"
BUILTIN_MODULES = (
    "linear",
    "task_arithmetic",      # and ties, dare_*, breadcrumbs*, della*: presets of one function
    "slerp",
    "nuslerp",
    "model_stock",
    "passthrough",
    "concat",
    "sce",
    "multislerp",
    "karcher",
    "nearswap",
    "ram",                  # and ramplus_tl
    "arcee_fusion",
)


def builtins() -> list[Strategy]:
    found: list[Strategy] = []
    for module in BUILTIN_MODULES:
        mod = import_module(f"mergekit_lite.strategies.{module}")
        found += list(getattr(mod, "STRATEGIES", None) or [mod.STRATEGY])
    return found


def plugins() -> list[Strategy]:
    from importlib.metadata import entry_points

    loaded = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        obj = ep.load()
        if not isinstance(obj, Strategy):
            raise SpecError(f"entry point '{ep.name}' ({ep.value}) is not a mergekit_lite Strategy",
                            hint="a plugin must expose a mergekit_lite.strategy.Strategy object")
        loaded.append(obj)
    return loaded


def all_strategies(extra: Iterable[Strategy] = ()) -> dict[str, Strategy]:
    """Every strategy by name; duplicates are an error rather than a silent override."""
    table: dict[str, Strategy] = {}
    for strategy in [*builtins(), *extra, *plugins()]:
        if strategy.name in table and table[strategy.name] is not strategy:
            raise SpecError(f"two strategies are named '{strategy.name}'",
                            hint="rename the plugin or the strategy passed to run_merge")
        table[strategy.name] = strategy
    return table


def get_strategy(name: str, extra: Iterable[Strategy] = (), where: str = "merge_method",
                 file: Optional[str] = None) -> Strategy:
    extra = list(extra)
    for strategy in [*extra, *builtins()]:
        if strategy.name == name:
            return strategy
    table = all_strategies(extra)
    if name not in table and name in MERGEKIT_METHODS:
        raise SpecError(f"`{name}` is a mergekit method that mergekit_lite does not support yet; supported: "
                        + ", ".join(sorted(table)), where=where, file=file,
                        hint="choose a supported method, or run this spec with mergekit itself")
    if name not in table:
        raise SpecError(f"unknown merge method '{name}'." + did_you_mean(name, table), where=where, file=file,
                        hint="`merge methods` lists the methods: " + ", ".join(sorted(table)))
    return table[name]


# Every method name mergekit knows (0.1.5's registry; the git main snapshot and the research notes name no
# other), so a name we have not implemented gets its own message rather than "unknown ... did you mean".
MERGEKIT_METHODS = frozenset({
    "arcee_fusion", "breadcrumbs", "breadcrumbs_ties", "dare_linear", "dare_ties", "della", "della_linear",
    "karcher", "linear", "model_stock", "multislerp", "nearswap", "nuslerp", "passthrough", "ram", "ramplus_tl",
    "sce", "slerp", "task_arithmetic", "ties",
})


# Parameters of mergekit 0.1.5's methods. mergekit configs often carry parameters of another method (a
# `density` left in a linear merge); those get a warning, while a name nobody knows is an error.
MERGEKIT_PARAMETERS = {
    "weight": "linear, task arithmetic family", "normalize": "linear, task arithmetic family",
    "density": "ties, dare, breadcrumbs, della", "gamma": "breadcrumbs", "epsilon": "della, ram",
    "lambda": "task arithmetic family", "rescale": "dare, della", "int8_mask": "ties family, sce",
    "t": "slerp, nearswap", "nuslerp_flatten": "nuslerp", "nuslerp_row_wise": "nuslerp",
    "filter_wise": "model_stock", "scale": "passthrough", "select_topk": "sce", "normalize_weights": "multislerp",
    "eps": "multislerp", "max_iter": "karcher", "tol": "karcher", "r": "ramplus_tl", "alpha": "ramplus_tl",
}


def known_parameters(extra: Iterable[Strategy] = ()) -> dict[str, list[str]]:
    """Parameter name -> the strategies that declare it (for 'ignored by this method' warnings)."""
    names: dict[str, list[str]] = {name: [f"mergekit: {users}"] for name, users in MERGEKIT_PARAMETERS.items()}
    for strategy in all_strategies(extra).values():
        for param in strategy.params:
            names.setdefault(param.name, []).append(strategy.name)
    return names
