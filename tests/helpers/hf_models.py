"""Tiny transformers models of several layouts (Llama, Qwen2 with layer_types, GPT-2 Conv1D, Phi-3 fused MLP).

Built with ``from_config`` and ``save_pretrained`` in several shards, so they are exactly what transformers
writes; used where a real forward pass is the point (stacking and concatenation).
"""

from __future__ import annotations

from pathlib import Path

import torch

LAYERS = 4
HIDDEN = 64
VOCAB = 256
SHARD = "100KB"   # every model is split over several shards


def configs() -> dict:
    from transformers import GPT2Config, LlamaConfig, Phi3Config, Qwen2Config

    return {
        "llama": LlamaConfig(hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=VOCAB),
        # Sliding-window layers from layer 2 on: layer_types is ["full", "full", "sliding", "sliding"].
        "qwen2": Qwen2Config(hidden_size=HIDDEN, intermediate_size=96, num_hidden_layers=LAYERS, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=VOCAB, use_sliding_window=True, sliding_window=4,
                             max_window_layers=2),
        "gpt2": GPT2Config(n_embd=HIDDEN, n_layer=LAYERS, n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=0,
                           eos_token_id=0),
        "phi3": Phi3Config(hidden_size=HIDDEN, intermediate_size=96, num_hidden_layers=LAYERS, num_attention_heads=4,
                           num_key_value_heads=4, vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2),
        # Another width, and another query/key-value head ratio, for the errors.
        "llama-wide": LlamaConfig(hidden_size=96, intermediate_size=128, num_hidden_layers=LAYERS,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB),
        "llama-mha": LlamaConfig(hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=LAYERS,
                                 num_attention_heads=4, num_key_value_heads=4, vocab_size=VOCAB),
    }


def build(root: Path) -> dict[str, Path]:
    """Two differently initialised models ("<family>-a", "<family>-b") of each family (and "llama-c", a third
    Llama to serve as a base), saved under ``root``."""
    from transformers import AutoModelForCausalLM

    paths = {}
    for family, config in configs().items():
        for variant, seed in (("a", 1), ("b", 2), ("c", 3)):
            if (family.startswith("llama-") and variant != "a") or (family != "llama" and variant == "c"):
                continue
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config)
            path = root / f"{family}-{variant}"
            model.save_pretrained(path, max_shard_size=SHARD)
            assert len(list(path.glob("*.safetensors"))) >= 2
            paths[f"{family}-{variant}"] = path
    return paths


def load(path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def layers(model) -> torch.nn.ModuleList:
    return model.transformer.h if hasattr(model, "transformer") else model.model.layers


def tokens(seed: int = 0, length: int = 12) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(seed))
