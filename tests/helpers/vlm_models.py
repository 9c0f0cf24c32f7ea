"""Tiny LLaVA models, as mergekit's tests build them (make_picoLlaVa: a CLIP vision tower of 32 px images,
patch 4, 2 layers, hidden 64, and a Llama text model of vocab 64, hidden 32, 16 heads, 2 layers), randomly
initialised by transformers and saved in several safetensors shards.

transformers 5's save_pretrained writes the legacy names (``language_model.model.*``, ``vision_tower.*``);
``modern`` renames them to the names transformers holds in memory (``model.language_model.*``,
``model.vision_tower.*``, ``lm_head.weight``), the layout of checkpoints saved by transformers 4.52+ and the
one mergekit 0.1.5 merges (given the legacy names it silently drops the language model).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SHARD = "50KB"
RENAMES = (("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
           ("vision_tower.", "model.vision_tower."), ("multi_modal_projector.", "model.multi_modal_projector."))


def config(vision_layers: int = 2):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    text = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_attention_heads=16,
                       num_hidden_layers=2)
    vision = CLIPVisionConfig(image_size=32, patch_size=4, num_hidden_layers=vision_layers, hidden_size=64,
                              intermediate_size=128, num_attention_heads=4, projection_dim=32)
    return LlavaConfig(vision_config=vision, text_config=text, image_seq_length=64)


def write_llava(path: Path, seed: int, vision_layers: int = 2, legacy: bool = False) -> Path:
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    LlavaForConditionalGeneration(config(vision_layers)).save_pretrained(path, max_shard_size=SHARD)
    assert len(list(path.glob("*.safetensors"))) >= 2
    if not legacy:
        modern(path)
    return path


def modern(path: Path) -> None:
    from safetensors.torch import load_file, save_file

    index_file = path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    for shard in sorted(set(index["weight_map"].values())):
        tensors = load_file(path / shard)
        save_file({_renamed(k): v for k, v in tensors.items()}, path / shard, metadata={"format": "pt"})
    index["weight_map"] = {_renamed(k): v for k, v in index["weight_map"].items()}
    index_file.write_text(json.dumps(index))


def _renamed(name: str) -> str:
    for old, new in RENAMES:
        if name.startswith(old):
            return new + name[len(old):]
    return name


def write_mistral3(path: Path, seed: int) -> Path:
    """A tiny Mistral3 (Pixtral vision tower, Mistral text model), in transformers 5's saved layout
    (``language_model.model.*``, ``vision_tower.*``), which is the layout of mergekit's mistral3 architecture
    file: its modules are text_decoder, vision_tower and multi_modal_projector."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig

    torch.manual_seed(seed)
    text = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_attention_heads=4,
                         num_key_value_heads=2, num_hidden_layers=2, head_dim=8)
    vision = PixtralVisionConfig(image_size=32, patch_size=4, num_hidden_layers=2, hidden_size=32,
                                 intermediate_size=64, num_attention_heads=2, head_dim=16)
    model = Mistral3ForConditionalGeneration(Mistral3Config(vision_config=vision, text_config=text,
                                                            spatial_merge_size=2))
    model.save_pretrained(path, max_shard_size=SHARD)
    assert len(list(path.glob("*.safetensors"))) >= 2
    return path
