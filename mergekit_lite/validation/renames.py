"""The names transformers gives a checkpoint's tensors when it loads them, so that a model saved under other names
streams layer by layer (streamed.py) instead of being loaded whole.

Many checkpoints on the Hub name their tensors otherwise than the modules of transformers' model: the legacy
layout of vision-language models (``language_model.model.*``, ``vision_tower.*``; LLaVA, Mistral3, Gemma3, as
transformers 5 itself still saves them), GPT-NeoX's ``embed_out``, a base model saved without its
``model.`` prefix. transformers renames them while loading, by rules it keeps per model type
(``conversion_mapping``), and we apply the very same rules through its own functions rather than a copy of
them, which would fall behind each release. Only renames count here: a tensor that transformers builds from
several (per-expert MoE weights fused into one) has no single file tensor to read, so such a model still loads
whole. Before transformers 5 these functions do not exist and nothing is renamed.
"""

from __future__ import annotations

import torch


def loaded_names(model: torch.nn.Module, stored: list[str]) -> dict[str, str]:
    """{name transformers loads a stored tensor under: its stored name}, for the stored names it renames (none
    for names it keeps, or fuses with others). ``model``: the skeleton, before peft wraps it."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, rename_source_key
    except ImportError:   # transformers 4: no per-model renaming rules to read
        return {}
    try:
        transforms = get_model_conversion_mapping(model)
    except Exception:   # noqa: BLE001 - a rule transformers cannot build for this model: it loads whole, as before
        return {}
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    params = dict(model.named_parameters(remove_duplicate=False))
    prefix = getattr(model, "base_model_prefix", None) or None
    renamed: dict[str, str] = {}
    for name in stored:
        loaded, fused = rename_source_key(name, renamings, converters, prefix, params)
        if fused is None and loaded != name:
            renamed.setdefault(loaded, name)
    return renamed
