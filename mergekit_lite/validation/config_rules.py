"""Do the tensors' shapes agree with config.json? Generic rules over common config keys and tensor names.

A model loads by building modules from config.json and then filling them with tensors, so a hidden size,
layer count, vocabulary, MLP width or head count in the config that contradicts the tensors makes the
output unloadable (or, worse, loadable with silently re-initialised weights). There is no architecture
table here: each rule names the config keys it reads (the first one present wins) and the tensor-name
suffixes it applies to, so it covers Llama, Mistral, Qwen, Gemma, Phi-3 and GPT-2-style layouts and stays
silent on anything it does not recognise. A multimodal model's sub-configs (text_config, vision_config) each
describe their own sub-model's tensors only (architecture.SUB_CONFIGS).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from ..architecture import (
    FINAL_NORMS,
    INPUT_EMBEDDINGS,
    LAYER_PATTERN,
    TEXT_SECTION,
    WIDTH_KEYS,
    get_config_value,
    layer_count_key,
    layer_index,
    sub_config,
)
from ..dtypes import dtype_name
from .report import Finding

# The first key present wins; multimodal configs keep the text model's keys in text_config.
KEYS = {dim: (*keys, TEXT_SECTION + keys[0]) for dim, keys in WIDTH_KEYS.items()}
# (suffix after "layers.N.", the dimensions it uses, expected shape); only exact suffixes, so MoE experts
# and shared experts (whose widths come from other keys) are left alone.
HIDDEN, ATTENTION, MLP = ("hidden",), ("hidden", "heads", "kv_heads", "head_dim"), ("hidden", "intermediate")
LAYER_RULES: tuple[tuple[str, tuple[str, ...], Callable[["Dims"], Optional[tuple]]], ...] = (
    ("input_layernorm.weight", HIDDEN, lambda d: (d.hidden,)),
    ("post_attention_layernorm.weight", HIDDEN, lambda d: (d.hidden,)),
    ("ln_1.weight", HIDDEN, lambda d: (d.hidden,)),
    ("ln_2.weight", HIDDEN, lambda d: (d.hidden,)),
    ("self_attn.q_proj.weight", ATTENTION, lambda d: (d.q_width, d.hidden)),
    ("self_attn.k_proj.weight", ATTENTION, lambda d: (d.kv_width, d.hidden)),
    ("self_attn.v_proj.weight", ATTENTION, lambda d: (d.kv_width, d.hidden)),
    ("self_attn.o_proj.weight", ATTENTION, lambda d: (d.hidden, d.q_width)),
    ("self_attn.qkv_proj.weight", ATTENTION,
     lambda d: (d.q_width + 2 * d.kv_width, d.hidden) if d.q_width and d.kv_width else None),
    ("mlp.gate_proj.weight", MLP, lambda d: (d.intermediate, d.hidden)),
    ("mlp.up_proj.weight", MLP, lambda d: (d.intermediate, d.hidden)),
    ("mlp.down_proj.weight", MLP, lambda d: (d.hidden, d.intermediate)),
)


@dataclass(frozen=True)
class Dims:
    """The dimensions config.json declares (None: not declared, so not checked)."""

    hidden: Optional[int]
    vocab: Optional[int]
    intermediate: Optional[int]
    heads: Optional[int]
    kv_heads: Optional[int]
    head_dim: Optional[int]
    layers: Optional[int]
    layers_key: Optional[str]
    keys: dict[str, str]        # which key each dimension came from, for messages

    @property
    def q_width(self) -> Optional[int]:
        return self.heads * self.head_dim if self.heads and self.head_dim else None

    @property
    def kv_width(self) -> Optional[int]:
        return self.kv_heads * self.head_dim if self.kv_heads and self.head_dim else None


def config_dims(config: dict[str, Any], section: str = "") -> Dims:
    """The dimensions ``config`` declares; ``section`` ("vision_config.") names a sub-config in messages."""
    found: dict[str, Optional[int]] = {}
    keys: dict[str, str] = {}
    for dim, candidates in KEYS.items():
        found[dim] = None
        for key in candidates:
            value = get_config_value(config, key)
            if type(value) is int and value > 0:
                found[dim], keys[dim] = value, section + key
                break
    if found["kv_heads"] is None and found["heads"] is not None:
        found["kv_heads"], keys["kv_heads"] = found["heads"], keys["heads"]   # no GQA: as many kv heads as heads
    if found["head_dim"] is None and found["hidden"] and found["heads"] and found["hidden"] % found["heads"] == 0:
        found["head_dim"] = found["hidden"] // found["heads"]
        keys["head_dim"] = f"{keys['hidden']}/{keys['heads']}"
    layers_key = layer_count_key(config)
    layers = get_config_value(config, layers_key) if layers_key else None
    return Dims(**found, layers=layers, layers_key=section + layers_key if layers_key else None, keys=keys)


def check_config(config: dict[str, Any], shapes: dict[str, tuple[int, ...]],
                 dtypes: Optional[dict[str, torch.dtype]] = None) -> tuple[int, list[Finding]]:
    """Check tensor shapes (and, when ``dtypes`` is given, float dtypes) against config.json.

    In a multimodal config each sub-config (text_config, vision_config) is checked against its own
    sub-model's tensors only (architecture.SUB_CONFIGS); the rest against the top level.
    Returns (number of rules applied, findings)."""
    if not config:
        return 0, []
    groups: dict[str, dict[str, str]] = {}     # sub-config key ("" for the top level) -> {inner name: name}
    for name in shapes:
        section, inner = sub_config(name, config) or ("", name)
        groups.setdefault(section, {})[inner] = name
    applied = 0
    findings: list[Finding] = []
    for section, names in groups.items():
        node = config[section] if section else config
        dims = config_dims(node, section + "." if section else "")
        applied += _check_shapes(dims, node, {inner: shapes[name] for inner, name in names.items()}, names, findings)
    applied += _check_dtypes(config, dtypes, findings)
    return applied, findings


def _check_shapes(dims: Dims, config: dict[str, Any], shapes: dict[str, tuple[int, ...]], names: dict[str, str],
                  findings: list[Finding]) -> int:
    """The width and layer-count rules over one (sub-)model's tensors, by their names inside it; findings
    name the tensors by their full names (``names``: inner -> full)."""
    applied = 0

    def expect(name: str, want: Optional[tuple], dims_used: tuple[str, ...]) -> None:
        nonlocal applied
        if want is None or any(d is None for d in want):
            return
        applied += 1
        if tuple(shapes[name]) != tuple(want):
            said = ", ".join(f"{dims.keys.get(d, d)} {getattr(dims, d)}" for d in dims_used
                             if getattr(dims, d, None) is not None)
            findings.append(Finding(f"shape {list(shapes[name])} contradicts config.json ({said}: {list(want)})",
                                    tensor=names[name]))

    for name in shapes:
        if name in INPUT_EMBEDDINGS or name == "lm_head.weight":
            width = dims.hidden if "embedding_size" not in config else None   # ALBERT-style factorised embeddings
            expect(name, (dims.vocab, width) if width else (dims.vocab, shapes[name][-1]), ("vocab", "hidden"))
        elif name in FINAL_NORMS:
            expect(name, (dims.hidden,), ("hidden",))
        elif layer_index(name) is not None:
            suffix = name[LAYER_PATTERN.search(name).end():]
            for rule_suffix, used, rule in LAYER_RULES:
                if suffix == rule_suffix:
                    expect(name, rule(dims), used)
    return applied + _check_layer_count(dims, shapes, names, findings)


def _check_layer_count(dims: Dims, shapes: dict[str, tuple[int, ...]], names: dict[str, str],
                       findings: list[Finding]) -> int:
    if dims.layers is None:
        return 0
    indices = {i for i in map(layer_index, shapes) if i is not None}
    if not indices:
        return 0
    missing = sorted(set(range(dims.layers)) - indices)
    extra = sorted(i for i in indices if i >= dims.layers)
    if missing or extra:
        parts = ([f"no tensors for layer(s) {_ranges(missing)}"] if missing else []) + \
                ([f"tensors for layer(s) {_ranges(extra)} beyond it"] if extra else [])
        first = next((names[n] for n in shapes if layer_index(n) == extra[0]), None) if extra else None
        findings.append(Finding(f"{dims.layers_key} is {dims.layers} but the output has " + " and ".join(parts),
                                tensor=first, file="config.json"))
    return 1


def _check_dtypes(config: dict[str, Any], dtypes: Optional[dict[str, torch.dtype]], findings: list[Finding]) -> int:
    declared = config.get("torch_dtype", config.get("dtype"))
    if dtypes is None or not isinstance(declared, str):
        return 0
    wrong = {n: d for n, d in dtypes.items() if d.is_floating_point and dtype_name(d) != declared}
    for name, dtype in list(wrong.items())[:20]:
        findings.append(Finding(f"is stored as {dtype_name(dtype)} but config.json says {declared}", tensor=name))
    return 1


def _ranges(values: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    runs: list[list[int]] = []
    for value in values:
        if runs and value == runs[-1][-1] + 1:
            runs[-1].append(value)
        else:
            runs.append([value])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)
