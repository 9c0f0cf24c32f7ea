"""Reading a mergekit-moe file strictly (mergekit/moe/config.py's MoEMergeConfig and is_bad_config).

A MoE file builds a mixture of experts from dense models: attention, norms and embeddings from
``base_model``, each layer's MLP from every expert's, and a router per layer from prompts. mergekit ignores
unknown keys; here every key and value is checked and a mistake names its YAML path. `merge check` and
`merge moe` share this reader.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from ..errors import SpecError, did_you_mean
from .problems import Problems, misspelled
from .references import ModelRef, parse_reference

MOE_KEYS = ("base_model", "experts", "gate_mode", "dtype", "experts_per_token", "shared_experts", "architecture",
            "tokenizer_source", "tokenizer", "chat_template", "name")
EXPERT_KEYS = ("source_model", "positive_prompts", "negative_prompts", "noise_scale", "residual_scale")
GATE_MODES = ("hidden", "cheap_embed", "random", "uniform_random")
PROMPTED = ("hidden", "cheap_embed")       # gate modes that read the prompts
ARCHITECTURES = ("mixtral", "deepseek", "qwen", "qwen3")   # mergekit-moe's `architecture:` prefixes
# mergekit-moe has no tokenizer settings (its pydantic model drops these keys): the base model's is copied.
NOT_IN_MOE = ("tokenizer_source", "tokenizer", "chat_template")


def is_moe(data: Any) -> bool:
    """A mergekit-moe document rather than a merge spec."""
    return isinstance(data, dict) and ("experts" in data or "gate_mode" in data)


@dataclass(frozen=True)
class Expert:
    ref: ModelRef
    where: str                                   # YAML path, e.g. experts[1]
    positive_prompts: tuple[str, ...] = ()
    negative_prompts: tuple[str, ...] = ()
    noise_scale: Optional[float] = None
    residual_scale: Optional[float] = None


@dataclass(frozen=True)
class MoESpec:
    base_model: ModelRef
    experts: tuple[Expert, ...]
    gate_mode: str = "hidden"
    dtype: Optional[torch.dtype] = None
    experts_per_token: int = 2
    shared_experts: tuple[Expert, ...] = ()
    architecture: Optional[str] = None
    text: str = ""
    file: Optional[str] = None
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    def references(self) -> list[tuple[ModelRef, str]]:
        """Every model with the YAML path where it first appears, base first."""
        found = {self.base_model: "base_model"}
        for expert in self.experts + self.shared_experts:
            found.setdefault(expert.ref, f"{expert.where}.source_model")
        return list(found.items())

    def error(self, what: str, where: Optional[str] = None, hint: Optional[str] = None) -> SpecError:
        return SpecError(what, where=where, hint=hint, file=self.file)


def parse_moe(data: Any, text: str = "", file: Optional[str] = None) -> MoESpec:
    """Check a MoE document's keys and values; raises SpecProblems (every problem, the first one's message)."""
    from ..dtypes import parse_dtype

    fail = Problems(file)
    if not isinstance(data, dict):
        raise SpecError(f"a MoE file must be a YAML mapping, got {type(data).__name__}", file=file)
    _keys(data, MOE_KEYS, "", fail, shown=tuple(k for k in MOE_KEYS if k not in NOT_IN_MOE))
    for key in NOT_IN_MOE:
        if key in data:
            fail.report(fail("not a mergekit-moe setting: the base model's tokenizer is copied, as mergekit-moe "
                             "does", key, "remove it; to change the tokenizer, merge the base model first with "
                             "`merge run`"))
    base = None
    with fail.guard():
        if data.get("base_model") is None and not misspelled(data, "base_model", MOE_KEYS):   # else said as an unknown key
            raise fail("base_model is missing", "base_model",
                       "a MoE merge starts from base_model: <folder or org/name>")
        base = parse_reference(data["base_model"], "base_model") if data.get("base_model") is not None else None
    experts: tuple[Expert, ...] = ()
    with fail.guard():
        if data.get("experts") is not None or not misspelled(data, "experts", MOE_KEYS):
            experts = _experts(data.get("experts"), "experts", fail)
    shared: tuple[Expert, ...] = ()
    with fail.guard():
        shared = _experts(data["shared_experts"], "shared_experts", fail) if data.get("shared_experts") is not None \
            else ()
    gate = data.get("gate_mode", "hidden")
    if gate not in GATE_MODES:
        fail.report(fail(f"unknown gate_mode {gate!r}." + did_you_mean(str(gate), GATE_MODES), "gate_mode",
                         "one of: " + ", ".join(GATE_MODES)))
    per_token = data.get("experts_per_token", 2)
    written = len(data["experts"]) if isinstance(data.get("experts"), list) else 0   # experts read or not
    if type(per_token) is not int or per_token < 1 or (written and per_token > written):
        fail.report(fail(f"experts_per_token must be an integer from 1 to the number of experts "
                         f"({written}), got {per_token!r}", "experts_per_token"))
    dtype = None
    if data.get("dtype") is not None:
        try:
            dtype = parse_dtype(str(data["dtype"]))
        except ValueError as exc:
            fail.report(fail(str(exc), "dtype"))
    architecture = data.get("architecture")
    if architecture is not None and (not isinstance(architecture, str) or not architecture
                                     or not any(a.startswith(architecture.lower()) for a in ARCHITECTURES)):
        fail.report(fail(f"unknown architecture {architecture!r}." + did_you_mean(str(architecture), ARCHITECTURES),
                         "architecture", "one of: " + ", ".join(ARCHITECTURES) + " (or leave it out: chosen from "
                         "the models)"))
    spec = MoESpec(base, experts, gate, dtype, per_token, shared, architecture, text, file, data)
    if experts and gate in GATE_MODES:
        with fail.guard():
            _check_prompts(spec, fail)
    fail.raise_if_any()
    return spec


def _check_prompts(spec: MoESpec, fail) -> None:
    """mergekit's is_bad_config: routers from prompts need prompts, and prompts that tell the experts apart."""
    if spec.gate_mode not in PROMPTED:
        return
    for expert in spec.experts:
        if not expert.positive_prompts:
            raise fail(f"gate_mode {spec.gate_mode} routes by prompts, and this expert has none",
                       f"{expert.where}.positive_prompts",
                       "give each expert positive_prompts: [example prompts it should receive], or use "
                       "gate_mode: random")
    first = spec.experts[0]
    if len(spec.experts) > 1 and all((e.positive_prompts, e.negative_prompts)
                                     == (first.positive_prompts, first.negative_prompts) for e in spec.experts):
        raise fail("every expert has the same prompts, so the router cannot tell them apart", "experts",
                   "give each expert prompts that show what should be routed to it")


def _experts(node: Any, key: str, fail) -> tuple[Expert, ...]:
    if not isinstance(node, list) or not node:
        raise fail("expected a non-empty list of experts", key, "each expert: {source_model: ..., positive_prompts: [...]}")
    experts = []
    for i, entry in enumerate(node):
        with fail.guard():
            experts += [e for e in (_expert(entry, f"{key}[{i}]", fail),) if e is not None]
    return tuple(experts)


def _expert(entry: Any, where: str, fail: Problems) -> Optional[Expert]:
    if not isinstance(entry, dict):
        raise fail("expected a mapping", where)
    _keys(entry, EXPERT_KEYS, where, fail)
    if entry.get("source_model") is None and not misspelled(entry, "source_model", EXPERT_KEYS):
        raise fail("'source_model' is missing", where, "each expert needs source_model: <folder or org/name>")
    if entry.get("source_model") is None:
        return None   # misspelled: reported once, as an unknown key
    ref = parse_reference(entry["source_model"], f"{where}.source_model")
    prompts = {}
    for name in ("positive_prompts", "negative_prompts"):
        value = entry.get(name)
        if value is not None and not (isinstance(value, list) and all(isinstance(p, str) for p in value)):
            raise fail("expected a list of strings", f"{where}.{name}", "quote prompts that YAML would read as "
                       "numbers, booleans or mappings")
        prompts[name] = tuple(value or ())
    numbers = {}
    for name in ("noise_scale", "residual_scale"):
        value = entry.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise fail(f"expected a number, got {value!r}", f"{where}.{name}")
        numbers[name] = None if value is None else float(value)
    return Expert(ref, where, **prompts, **numbers)


def _keys(node: dict, allowed: tuple[str, ...], where: str, fail, shown: tuple[str, ...] = ()) -> None:
    for key in node:
        if key not in allowed:
            shown = shown or allowed
            fail.report(fail("unknown key." + did_you_mean(str(key), shown), f"{where}.{key}" if where else str(key),
                       "allowed here: " + ", ".join(shown)))


def load_moe(path: str) -> MoESpec:
    """Read and check a MoE file."""
    from .safe_yaml import load_yaml, read_spec_file

    text = read_spec_file(path)
    return parse_moe(load_yaml(text, path), text=text, file=path)
