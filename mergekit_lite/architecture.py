"""What tensor names and config keys mean, for any transformer layout: the one table of names.

mergekit keeps one JSON file per architecture and fails on anything new ("No JSON architecture found" is
among its most reported issues). Merging needs much less: which layer a tensor belongs to (for gradients
and layer stacking), which tensor stands in for a missing tied ``lm_head``, which config keys hold the
layer count and the widths, which modules are an MLP's or attention's projections, and which model types
store linear weights transposed (transformers' Conv1D). Those follow a handful of naming conventions, all
listed here, so the planner, the LoRA fold and validation cannot drift apart.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Optional

# `model.layers.3.mlp.up_proj.weight`, `transformer.h.3.attn.c_attn.weight`, `encoder.layer.3....`,
# `blocks.3....`: a container name, then the layer number as its own dotted component.
LAYER_PATTERN = re.compile(r"(^|\.)(layers|h|layer|blocks)\.(\d+)\.")

OUTPUT_EMBEDDING = "lm_head.weight"
# Output-embedding names, each with the input embeddings a tied checkpoint uses instead (in the order tried).
TIED_OUTPUT_EMBEDDINGS: dict[str, tuple[str, ...]] = {
    "lm_head.weight": (
        "model.embed_tokens.weight", "transformer.wte.weight", "model.decoder.embed_tokens.weight",
        "gpt_neox.embed_in.weight", "transformer.word_embeddings.weight", "model.embed_in.weight",
        "transformer.embd.wte.weight", "model.language_model.embed_tokens.weight",
        "model.text_model.embed_tokens.weight", "embed_tokens.weight", "wte.weight",
    ),
}

INPUT_EMBEDDINGS = TIED_OUTPUT_EMBEDDINGS[OUTPUT_EMBEDDING]
FINAL_NORMS = ("model.norm.weight", "transformer.ln_f.weight", "model.final_layernorm.weight",
               "gpt_neox.final_layer_norm.weight", "model.language_model.norm.weight", "norm.weight")

# Config keys of the model's widths, by quantity, most common first (within one config section).
WIDTH_KEYS: dict[str, tuple[str, ...]] = {
    "hidden": ("hidden_size", "n_embd", "d_model"),
    "vocab": ("vocab_size",),
    "intermediate": ("intermediate_size", "n_inner", "ffn_dim", "d_ff", "ffn_hidden_size"),
    "heads": ("num_attention_heads", "n_head", "num_heads"),
    "kv_heads": ("num_key_value_heads", "num_kv_heads", "n_head_kv"),
    "head_dim": ("head_dim",),
}
# Where multimodal configs keep the text model's keys.
TEXT_SECTION = "text_config."
# Multimodal configs keep one sub-config per sub-model, and each describes only the tensors under its
# prefixes: transformers >= 4.52 holds `model.language_model.*` and `model.vision_tower.*` in memory, while
# older checkpoints (and transformers 5's save_pretrained) write `language_model.model.*` and `vision_tower.*`.
# A top-level lm_head is the text model's. A tensor under none of them (a projector) has no sub-config.
SUB_CONFIGS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("text_config", ("model.language_model.", "language_model.", "model.text_model.", "text_model.", "lm_head.")),
    ("vision_config", ("model.vision_tower.", "vision_tower.", "model.vision_model.", "vision_model.",
                       "model.visual.", "visual.")),
    ("audio_config", ("model.audio_tower.", "audio_tower.")),
)
# Architectures that read an added `head_dim` from config.json (transformers 5 modeling code), so heads can be
# added without making them narrower even when their config.json has no head_dim.
READS_HEAD_DIM = ("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "gemma", "gemma2", "gemma3",
                  "starcoder2", "olmo", "olmo2", "granite", "cohere", "stablelm", "phi3", "smollm3")
# transformers' Conv1D (weight stored (in, out)) by model_type: the layer names that are Conv1D. The names
# matter only for square weights, where the shape cannot tell (GPT-2's attn.c_proj); peft's saved
# fan_in_fan_out is not reliable (it holds whatever the last adapted module set it to).
CONV1D_LAYERS: dict[str, frozenset[str]] = {
    "gpt2": frozenset({"c_attn", "c_proj", "c_fc", "q_attn"}), "openai-gpt": frozenset({"c_attn", "c_proj", "c_fc"}),
    "imagegpt": frozenset({"c_attn", "c_proj", "c_fc", "q_attn"}),
    "decision_transformer": frozenset({"c_attn", "c_proj", "c_fc", "q_attn"}), "clvp": frozenset({"c_fc", "c_proj"}),
}

# Module names of a layer's MLP and attention blocks, and of their projections: the input projections with
# the number of projections fused in each, and the output projection.
MLP_BLOCKS = ("mlp", "feed_forward", "ffn")
ATTENTION_BLOCKS = ("self_attn", "attn", "attention", "self_attention")
MLP_IN = {"gate_proj": 1, "up_proj": 1, "c_fc": 1, "fc1": 1, "w1": 1, "w3": 1, "dense_h_to_4h": 1,
          "gate_up_proj": 2}
MLP_OUT = ("down_proj", "c_proj", "fc2", "w2", "dense_4h_to_h")
ATTENTION_IN = {"q_proj": 1, "k_proj": 1, "v_proj": 1}
ATTENTION_OUT = ("o_proj", "out_proj")

# Config keys holding the number of layers, most common first; dotted keys are nested.
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "text_config.num_hidden_layers",
                    "language_config.num_hidden_layers", "llm_config.num_hidden_layers")

# Config lists with one entry per layer (next to the layer count key): re-sliced when layers are stacked.
PER_LAYER_KEYS = ("layer_types", "layers_block_type", "no_rope_layers")

# config.json keys that change what a model computes without changing any tensor's shape (transformers'
# configs): inputs that disagree on one cannot be merged into one config.json without choosing. Looked up at the
# top level and in TEXT_SECTION. Not here: tie_word_embeddings (decided by which tensors the output writes,
# planner._output_config), widths and layer counts (the tensors' shapes check those), training-only keys
# (dropout, initializer_range), token ids (they go with the tokenizer).
BEHAVIOUR_KEYS = (
    # positions
    "rope_theta", "rope_scaling", "partial_rotary_factor", "rotary_pct", "rotary_emb_base", "rope_local_base_freq",
    "max_position_embeddings", "position_embedding_type",
    # activations and norms
    "hidden_act", "hidden_activation", "activation_function", "rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon",
    "norm_epsilon",
    # attention
    "head_dim", "sliding_window", "use_sliding_window", "max_window_layers", "sliding_window_pattern",
    "attention_bias", "attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar",
    "attention_multiplier", "use_qk_norm", "qk_layernorm", "clip_qkv", "layer_types",
    # MLP, residual stream, logits
    "mlp_bias", "use_parallel_residual", "parallel_attn", "residual_multiplier", "embedding_multiplier",
    "logits_scaling", "logit_scale", "scale_embedding",
    # mixture-of-experts routing
    "num_experts_per_tok", "norm_topk_prob",
)


def behaviour_settings(config: dict[str, Any], per_layer: bool = True) -> dict[str, Any]:
    """The BEHAVIOUR_KEYS a config sets (dotted for TEXT_SECTION), comparable across transformers versions:
    transformers 5's ``rope_parameters`` is read as ``rope_theta`` plus ``rope_scaling`` (without the default
    rope type); an absent ``head_dim`` is hidden_size / num_attention_heads; ``layer_types`` of full attention
    only is the same as none; ``use_sliding_window: false`` is the same as no window keys at all. ``per_layer``:
    include PER_LAYER_KEYS (not when layers are stacked: those lists are re-sliced per slice)."""
    found: dict[str, Any] = {}
    sections = [""] + ([TEXT_SECTION] if isinstance(config.get(TEXT_SECTION[:-1]), dict) else [])
    for section in sections:
        node = get_config_value(config, section[:-1]) if section else config
        for key in BEHAVIOUR_KEYS:
            value = _rope(node, key) if key in ("rope_theta", "rope_scaling") else node.get(key)
            if key == "head_dim" and value is None:
                hidden, heads = node.get("hidden_size"), node.get("num_attention_heads")
                value = hidden // heads if isinstance(hidden, int) and isinstance(heads, int) and heads > 0 else None
            if key == "layer_types" and isinstance(value, list) and all(v == "full_attention" for v in value):
                value = None
            if key in ("sliding_window", "max_window_layers", "use_sliding_window") and \
                    node.get("use_sliding_window") is False:   # off: as if the model had no such keys
                value = None
            if value is not None and (per_layer or key not in PER_LAYER_KEYS):
                found[section + key] = value
    return found


def _rope(node: dict[str, Any], key: str) -> Any:
    parameters = node.get("rope_parameters") if isinstance(node.get("rope_parameters"), dict) else {}
    scaling = node.get("rope_scaling") if isinstance(node.get("rope_scaling"), dict) else {}
    if key == "rope_theta":
        return parameters.get("rope_theta", node.get("rope_theta"))
    merged = {("rope_type" if k == "type" else k): v for k, v in {**scaling, **parameters}.items() if k != "rope_theta"}
    if not merged and node.get("rope_scaling") is not None and not scaling:
        return node.get("rope_scaling")     # not a mapping: compared as it is
    return None if merged in ({}, {"rope_type": "default"}) else merged


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


def stack_layers(names: Iterable[str]) -> dict[str, int]:
    """Number of layers of each stack of layers (by layer_stack): a VLM's vision tower and language model
    count their layers apart, so a gradient spans each one (mergekit: one module per layer prefix)."""
    counts: dict[str, int] = {}
    for name in names:
        match = LAYER_PATTERN.search(name)
        if match:
            stack = name[:match.start(3)]
            counts[stack] = max(counts.get(stack, 0), int(match.group(3)) + 1)
    return counts


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


# mergekit's module names (``modules:``) of multimodal models, from its modular architecture JSONs (mistral3,
# gemma3vl, llama4, qwen2_vl...), with the tensor prefixes of each in both layouts; checked in this order (a
# Qwen2-VL projector, ``visual.merger.``, sits inside the vision prefix). Architectures without a JSON get
# mergekit's inferred modules instead: one per stack of layers, named by its prefix
# (``model.language_model.layers``), and ``default`` for every tensor outside the stacks (module_of).
NAMED_MODULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("multi_modal_projector", ("model.multi_modal_projector.", "multi_modal_projector.", "model.visual.merger.",
                               "visual.merger.")),
    ("text_decoder", dict(SUB_CONFIGS)["text_config"] + ("model.embed_tokens.", "model.layers.", "model.norm.")),
    ("vision_tower", dict(SUB_CONFIGS)["vision_config"]),
    ("vision_model", dict(SUB_CONFIGS)["vision_config"]),
)
DEFAULT_MODULE = "default"


def module_of(name: str, named: bool) -> str:
    """The mergekit module a tensor belongs to: by NAMED_MODULES (``named``; "" when none fits) or as
    mergekit infers them (its stack of layers' prefix, else DEFAULT_MODULE)."""
    if named:
        return next((module for module, prefixes in NAMED_MODULES if name.startswith(prefixes)), "")
    match = LAYER_PATTERN.search(name)
    return name[:match.start(3) - 1] if match else DEFAULT_MODULE


def sub_config(name: str, config: dict[str, Any]) -> Optional[tuple[str, str]]:
    """For a tensor of a multimodal model: (the sub-config key that describes it, its name inside that
    sub-model, e.g. ``model.language_model.layers.0...`` -> ``layers.0...``); None when the config has no
    sub-config for it."""
    for key, prefixes in SUB_CONFIGS:
        if isinstance(config.get(key), dict):
            for prefix in prefixes:
                if name.startswith(prefix):
                    return key, name if prefix == "lm_head." else name[len(prefix):]
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
