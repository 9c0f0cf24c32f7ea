"""What tensor names and config keys mean, for any transformer layout, without architecture tables.

mergekit keeps one JSON file per architecture and fails on anything new ("No JSON architecture found" is
among its most reported issues). Merging needs much less: which layer a tensor belongs to (for gradients
and layer stacking), which tensor stands in for a missing tied ``lm_head``, and which config keys hold the
layer count. Those follow a handful of naming conventions, listed here.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Optional

# `model.layers.3.mlp.up_proj.weight`, `transformer.h.3.attn.c_attn.weight`, `encoder.layer.3....`,
# `blocks.3....`: a container name, then the layer number as its own dotted component.
LAYER_PATTERN = re.compile(r"(^|\.)(layers|h|layer|blocks)\.(\d+)\.")

# Output-embedding names, each with the input embeddings a tied checkpoint uses instead (in the order tried).
TIED_OUTPUT_EMBEDDINGS: dict[str, tuple[str, ...]] = {
    "lm_head.weight": (
        "model.embed_tokens.weight", "transformer.wte.weight", "model.decoder.embed_tokens.weight",
        "gpt_neox.embed_in.weight", "transformer.word_embeddings.weight", "model.embed_in.weight",
        "transformer.embd.wte.weight", "model.language_model.embed_tokens.weight",
        "model.text_model.embed_tokens.weight", "embed_tokens.weight", "wte.weight",
    ),
}

# Config keys holding the number of layers, most common first; dotted keys are nested.
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "text_config.num_hidden_layers",
                    "language_config.num_hidden_layers", "llm_config.num_hidden_layers")

# Config lists with one entry per layer (next to the layer count key): re-sliced when layers are stacked.
PER_LAYER_KEYS = ("layer_types", "layers_block_type", "no_rope_layers")

# Tensors outside the numbered layers, by a dotted component's start: before the layers (embeddings) or
# after them (final norm, head). Checked in this order, so `word_embeddings_layernorm` is before the layers.
BEFORE_LAYERS = ("embed_tokens", "embed_in", "embed_positions", "embeddings", "word_embeddings", "wte", "wpe")
AFTER_LAYERS = ("lm_head", "embed_out", "norm", "ln_f", "final_layernorm", "final_layer_norm", "score")


def layer_index(name: str) -> Optional[int]:
    """The layer a tensor belongs to, or None for embeddings, final norms, heads."""
    match = LAYER_PATTERN.search(name)
    return int(match.group(3)) if match else None


def layer_stack(name: str) -> Optional[str]:
    """The name up to the layer number (``model.layers.``): tensors of one stack of layers share it."""
    match = LAYER_PATTERN.search(name)
    return name[:match.start(3)] if match else None


def outside_position(name: str) -> Optional[str]:
    """For a tensor outside the layers: "before" (embeddings) or "after" (final norm, head); None if unknown."""
    parts = name.split(".")
    for position, starts in (("before", BEFORE_LAYERS), ("after", AFTER_LAYERS)):
        if any(part.startswith(start) for part in parts for start in starts):
            return position
    return None


def rename_layer(name: str, index: int) -> str:
    """The same tensor name in another layer: used when layers are stacked and renumbered."""
    match = LAYER_PATTERN.search(name)
    if match is None:
        raise ValueError(f"'{name}' is not a layer tensor")
    return f"{name[:match.start(3)]}{index}{name[match.end(3):]}"


def count_layers(names: Iterable[str]) -> int:
    """Number of layers as seen in tensor names (highest index + 1; 0 when there are none)."""
    indices = [i for i in map(layer_index, names) if i is not None]
    return max(indices) + 1 if indices else 0


def layer_position(index: Optional[int], num_layers: int) -> float:
    """Where a tensor sits in depth, 0..1, for gradients: mergekit's rule.

    Layer i of L gets i/(L-1) (1 when L == 1); embeddings, final norm and lm_head get 0, i.e. the first
    value of a gradient.
    """
    if index is None:
        return 0.0
    return index / (num_layers - 1) if num_layers > 1 else 1.0


def tied_source(name: str, available: Iterable[str]) -> Optional[str]:
    """For a missing output embedding (``lm_head.weight``), the input embedding a tied model uses."""
    present = set(available)
    for candidate in TIED_OUTPUT_EMBEDDINGS.get(name, ()):
        if candidate in present:
            return candidate
    return None


def get_config_value(config: dict[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def set_config_value(config: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = config
    for part in parents:
        node = node[part]
    node[last] = value


def layer_count_key(config: dict[str, Any]) -> Optional[str]:
    """The config key that holds the layer count, or None if the config has none we know."""
    for key in LAYER_COUNT_KEYS:
        value = get_config_value(config, key)
        if isinstance(value, int) and not isinstance(value, bool):
            return key
    return None


def sibling_key(dotted: str, name: str) -> str:
    """``name`` in the same (possibly nested) section of the config as ``dotted``."""
    return dotted.rsplit(".", 1)[0] + "." + name if "." in dotted else name
