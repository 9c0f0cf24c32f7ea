"""A PEFT adapter's ``adapter_config.json``: what it says about the fold, and what we refuse.

The config decides each module's scaling (``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA,
with per-module overrides in ``rank_pattern`` / ``alpha_pattern``), whether magnitudes (DoRA) or biases
take part, and which adapters cannot be folded into the original base at all: the ones whose
initialisation changed the base (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA) and the LoRA variants with other
math. peft 0.21.2 is the reference (shared/research/lora.md sections 1.2, 2.1, 2.10 and 5.6).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from ..errors import ModelError
from ..sources.checkpoint import contained_path
from ..sources.user_files import read_json_object
from .patterns import SUFFIX, Pattern

CONFIG_FILE = "adapter_config.json"

# Initialisations that rewrite the base weights when the adapter is created: training saw a residual base,
# so folding into the original base gives another model. peft re-runs them when loading (and subtracts the
# initial adapter from the base); we refuse and say how to convert.
CONVERTIBLE_INITS = ("pissa", "olora", "corda")
OTHER_MUTATING_INITS = {
    "loftq": "LoftQ trains against a quantised residual of the base, which the adapter does not record",
    "lora_ga": "LoRA-GA subtracts its initial adapter from the base, and even peft does not redo that on load",
}
CONVERT_HINT = ("convert it to a plain LoRA first: load it with peft (PeftModel.from_pretrained(base, adapter)) and "
                "save it with save_pretrained(dir, path_initial_model_for_weight_conversion=<the adapter as saved "
                "before training>); the converted adapter (rank doubled) folds into the original base")

# Config fields of LoRA variants whose merge is not the plain/DoRA formula, or that peft cannot merge at all.
UNSUPPORTED_FIELDS = {
    "target_parameters": "LoRA on raw parameters (MoE experts)",
    "layer_replication": "layer replication (it adds layers, so it cannot fold into the base layout)",
    "alora_invocation_tokens": "activated LoRA (aLoRA), which peft cannot merge",
    "arrow_config": "Arrow routing, which peft cannot merge",
    "use_bdlora": "block-diagonal LoRA",
    "kasa_config": "KaSA (it truncates the base's SVD)",
    "use_qalora": "QA-LoRA",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
    "trainable_token_indices": "trainable tokens",
    "megatron_config": "Megatron parallel layers",
}


@dataclass(frozen=True)
class LoraSettings:
    """The fields of a LoraConfig that change the folded weights."""

    r: int
    lora_alpha: float
    use_rslora: bool
    use_dora: bool
    lora_bias: bool
    mica: bool                          # MiCA rounds the delta to the weight's dtype before adding it
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    target_modules: Any                 # list of names, a regex string, or None
    base_model_name_or_path: Optional[str]
    revision: Optional[str]
    raw: dict
    # rank_pattern and alpha_pattern keys, compiled and time-bounded (patterns.py)
    keys: dict[str, dict[str, Pattern]] = field(default_factory=dict, repr=False, compare=False)

    def rank(self, module: str) -> int:
        return int(self.rank_pattern.get(self._key("rank_pattern", module), self.r))

    def alpha(self, module: str) -> float:
        return self.alpha_pattern.get(self._key("alpha_pattern", module), self.lora_alpha)

    def _key(self, field_name: str, module: str) -> str:
        patterns = self.keys.get(field_name)
        if patterns is None:
            return pattern_key(getattr(self, field_name), module)
        return next((key for key, pattern in patterns.items() if pattern.match(module)), module)

    def scaling(self, module: str) -> float:
        """peft's scaling of one module: a Python float, lora_alpha / r or lora_alpha / sqrt(r)."""
        r, alpha = self.rank(module), self.alpha(module)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def pattern_key(patterns: dict[str, Any], module: str) -> str:
    """The ``rank_pattern`` / ``alpha_pattern`` key that applies to ``module``, as peft (>= 0.15) picks it.

    Keys are tried in file order (peft writes them sorted) and the first that matches a dotted suffix of
    the module path as a regex wins (``q_proj``, ``layers.0.mlp.up_proj``, ``^model.layers.1.mlp.down_proj``).
    Without a match the module path itself is the key, which finds an exact full-path entry if there is one.
    """
    for key in patterns:
        if Pattern(key, "pattern key", None, SUFFIX).match(module):
            return key
    return module


def read_settings(folder: str, label: str) -> LoraSettings:
    """Read and check ``adapter_config.json``; refuse what cannot be folded faithfully."""
    if not os.path.lexists(os.path.join(folder, CONFIG_FILE)):
        raise ModelError(f"no {CONFIG_FILE}: this is not a PEFT adapter folder", file=label,
                         hint="give the folder that holds adapter_config.json and adapter_model.safetensors")
    raw = read_json_object(contained_path(folder, CONFIG_FILE, label), CONFIG_FILE, label,
                           "the file is corrupt; download the adapter again", nested="it is nested too deeply")
    _refuse_unsupported(raw, label)
    r, alpha = raw.get("r", 8), raw.get("lora_alpha", 8)
    if not _positive_int(r) or not _number(alpha):
        raise ModelError(f"r={_short(r)}, lora_alpha={_short(alpha)} are not a positive rank and a finite number",
                         file=label, hint=f"fix {CONFIG_FILE}")
    rank_pattern, alpha_pattern = raw.get("rank_pattern") or {}, raw.get("alpha_pattern") or {}
    if not (isinstance(rank_pattern, dict) and all(_positive_int(v) for v in rank_pattern.values())):
        raise ModelError("rank_pattern is not a map of module pattern -> rank", file=label)
    if not (isinstance(alpha_pattern, dict) and all(_number(v) for v in alpha_pattern.values())):
        raise ModelError("alpha_pattern is not a map of module pattern -> finite alpha", file=label)
    keys = {name: {key: Pattern(key, f"{name} key", label, SUFFIX) for key in table}
            for name, table in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern))}
    targets = _check_module_lists(raw, label)
    return LoraSettings(
        r=r, lora_alpha=alpha, use_rslora=bool(raw.get("use_rslora")), use_dora=bool(raw.get("use_dora")),
        lora_bias=bool(raw.get("lora_bias")), mica=str(raw.get("init_lora_weights")).lower() == "mica",
        rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
        target_modules=targets, base_model_name_or_path=raw.get("base_model_name_or_path") or None,
        revision=raw.get("revision") or None, raw=raw, keys=keys)


def _refuse_unsupported(raw: dict, label: str) -> None:
    peft_type = raw.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise ModelError(f"peft_type is {peft_type}; only LoRA adapters (peft_type LORA) can be folded", file=label,
                         hint=f"{peft_type} adapters use other math; merge them with peft's merge_and_unload()")
    for name, what in UNSUPPORTED_FIELDS.items():
        if raw.get(name) not in (None, False, [], {}):
            raise ModelError(f"the adapter uses {what} ({name}), which cannot be folded here", file=label,
                             hint="fold it with peft's merge_and_unload(), where peft supports merging it")
    init = raw.get("init_lora_weights", True)
    name = init.lower() if isinstance(init, str) else ""
    if name.startswith(CONVERTIBLE_INITS):
        raise ModelError(f"init_lora_weights is '{init}': the adapter was trained on a base changed by its "
                         "initialisation, so folding it into the original base would give another model", file=label,
                         hint=CONVERT_HINT)
    if name in OTHER_MUTATING_INITS:
        raise ModelError(f"init_lora_weights is '{init}': {OTHER_MUTATING_INITS[name]}", file=label,
                         hint="fold it into the residual base saved when the adapter was initialised, after setting "
                              f"\"init_lora_weights\": true in {CONFIG_FILE}")


def _positive_int(value: Any) -> bool:
    return type(value) is int and value > 0


def _number(value: Any) -> bool:
    """A finite number whose scalings stay finite in float32 (an alpha of 1e300 would make every fold Inf)."""
    return type(value) in (int, float) and math.isfinite(value) and abs(value) < 1e30


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_module_lists(raw: dict, label: str) -> Any:
    """``target_modules`` and ``exclude_modules`` are a regex (a string) or a list of module names;
    ``modules_to_save`` names modules that peft puts into a regex. Refuse what peft would: a value of another
    type, a list entry that is not a string, a pattern that does not compile. Returns target_modules, with a
    string compiled into a time-bounded Pattern."""
    for name in ("target_modules", "exclude_modules", "modules_to_save"):
        value = raw.get(name)
        if value is None or (isinstance(value, str) and name != "modules_to_save"):
            continue
        if not isinstance(value, list):
            raise ModelError(f"{name} is {_short(value)}, not a list of module names"
                             + ("" if name == "modules_to_save" else " or a regular expression"), file=label,
                             hint=f"fix {CONFIG_FILE}")
        for i, entry in enumerate(value):
            if not isinstance(entry, str):
                raise ModelError(f"{name}[{i}] is {_short(entry)}, not a module name", file=label,
                                 hint=f"fix {CONFIG_FILE}")
            if name == "modules_to_save":   # peft: re.match(rf"(^|.*\.){m}($|\..*)", key)
                Pattern(entry, f"{name}[{i}]", label, r"(^|.*\.){}($|\..*)")
    if isinstance(raw.get("exclude_modules"), str):
        Pattern(raw["exclude_modules"], "exclude_modules", label)
    targets = raw.get("target_modules")
    return Pattern(targets, "target_modules", label) if isinstance(targets, str) and targets != "all-linear" else targets
