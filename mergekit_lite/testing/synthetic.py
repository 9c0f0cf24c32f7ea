"""Synthetic Llama-shaped checkpoints, for the demo, the tests and the benchmarks. No network, no transformers.

Weights are deterministic functions of (seed, tensor name), so a test can recompute any tensor without
keeping models in memory. A "fine-tune" is the base plus a small random delta drawn from its own seed.
Tensors are generated and written one at a time, so a 1B-parameter model needs little memory.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from ..dtypes import dtype_name
from ..output.writer import INDEX_NAME, ShardWriter
from ..plan.shards import Entry, plan_shards, shard_filenames


@dataclass(frozen=True)
class LlamaShape:
    hidden: int = 64
    intermediate: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    vocab: int = 256
    tied: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


# About 1B parameters (Llama-3.2-1B-like widths, untied 32k vocab): the benchmark's model.
BENCH_1B = LlamaShape(hidden=2048, intermediate=8192, layers=14, heads=32, kv_heads=8, vocab=32000)


def tensor_shapes(shape: LlamaShape) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes in the order transformers writes a Llama checkpoint."""
    h, kv = shape.hidden, shape.kv_heads * shape.head_dim
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (shape.vocab, h))]
    for i in range(shape.layers):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (h,)),
                (p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
                (p + "post_attention_layernorm.weight", (h,)),
                (p + "mlp.gate_proj.weight", (shape.intermediate, h)), (p + "mlp.up_proj.weight", (shape.intermediate, h)),
                (p + "mlp.down_proj.weight", (h, shape.intermediate))]
    out.append(("model.norm.weight", (h,)))
    if not shape.tied:
        out.append(("lm_head.weight", (shape.vocab, h)))
    return out


def llama_config(shape: LlamaShape, dtype: torch.dtype) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": shape.hidden, "intermediate_size": shape.intermediate,
        "num_hidden_layers": shape.layers, "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads, "head_dim": shape.head_dim, "vocab_size": shape.vocab,
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
        "initializer_range": 0.02, "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": shape.tied,
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": dtype_name(dtype), "use_cache": True,
    }


def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"synthetic:{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def base_tensor(seed: int, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A plausible float32 weight: norms near 1, matrices ~ N(0, 0.02)."""
    noise = torch.randn(shape, generator=_generator(seed, name))
    return 1.0 + 0.05 * noise if len(shape) == 1 else noise.mul_(0.02)


def model_tensor(name: str, shape: tuple[int, ...], seed: int, delta_seed: Optional[int],
                 delta_scale: float) -> torch.Tensor:
    """The float32 value of a tensor of a synthetic model (base, or base + delta for a fine-tune)."""
    tensor = base_tensor(seed, name, shape)
    if delta_seed is not None:
        tensor.add_(torch.randn(shape, generator=_generator(1_000_003 * (delta_seed + 1), name)), alpha=delta_scale)
    return tensor


def write_model(folder: str, shape: LlamaShape = LlamaShape(), *, dtype: torch.dtype = torch.float32, seed: int = 0,
                delta_seed: Optional[int] = None, delta_scale: float = 0.002, max_shard_size: int = 2**62,
                tokenizer: bool = True) -> str:
    """Write a synthetic Llama checkpoint (sharded when it exceeds ``max_shard_size``) to ``folder``."""
    os.makedirs(folder, exist_ok=True)
    entries = [Entry(name, dtype, dims) for name, dims in tensor_shapes(shape)]
    shards = plan_shards(entries, max_shard_size)
    files = shard_filenames(len(shards))
    for filename, shard in zip(files, shards):
        writer = ShardWriter(os.path.join(folder, filename), shard)
        for entry in shard:
            writer.write(entry.name, model_tensor(entry.name, entry.shape, seed, delta_seed, delta_scale).to(dtype))
        writer.close()
    if len(files) > 1:
        index = {"metadata": {"total_size": sum(e.nbytes for e in entries)},
                 "weight_map": {e.name: files[i] for i, shard in enumerate(shards) for e in shard}}
        _write_json(os.path.join(folder, INDEX_NAME), index)
    _write_json(os.path.join(folder, "config.json"), llama_config(shape, dtype))
    _write_json(os.path.join(folder, "generation_config.json"), {"bos_token_id": 1, "eos_token_id": 2})
    if tokenizer:
        write_tokenizer(folder, shape.vocab)
    return folder


def iter_model(shape: LlamaShape, seed: int = 0, delta_seed: Optional[int] = None,
               delta_scale: float = 0.002) -> Iterator[tuple[str, torch.Tensor]]:
    """The float32 tensors of a synthetic model, recomputed (what write_model wrote, before the cast)."""
    for name, dims in tensor_shapes(shape):
        yield name, model_tensor(name, dims, seed, delta_seed, delta_scale)


def write_tokenizer(folder: str, vocab: int) -> None:
    """A word-level tokenizer over made-up words, so the output folder is complete (and loadable)."""
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    words = specials + [f"w{i}" for i in range(max(0, vocab - len(specials)))]
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for i, t in enumerate(specials)],
        "normalizer": None, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None,
        "model": {"type": "WordLevel", "vocab": {w: i for i, w in enumerate(words[:vocab])}, "unk_token": "<unk>"},
    }
    _write_json(os.path.join(folder, "tokenizer.json"), tokenizer)
    _write_json(os.path.join(folder, "tokenizer_config.json"), {
        "tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>", "bos_token": "<s>",
        "eos_token": "</s>", "pad_token": "<pad>", "model_max_length": 2048})


def parameter_count(shape: LlamaShape) -> int:
    return sum(math.prod(dims) for _, dims in tensor_shapes(shape))


def _write_json(path: str, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)


# The models the examples in merge_configs/ refer to (as demo/models/<name>, relative to the repo root).
DEMO_SHAPE = LlamaShape(hidden=256, intermediate=704, layers=6, heads=8, kv_heads=4, vocab=1024)
DEMO_MODELS = {"base": None, "ft-a": 1, "ft-b": 2, "ft-c": 3}


def write_demo_models(root: str, shape: LlamaShape = DEMO_SHAPE, dtype: torch.dtype = torch.bfloat16,
                      max_shard_size: int = 4_000_000) -> dict[str, str]:
    """A base and three fine-tunes of it, each in several shards: the inputs of every example spec."""
    return {name: write_model(os.path.join(root, name), shape, dtype=dtype, seed=0, delta_seed=delta,
                              delta_scale=0.004, max_shard_size=max_shard_size)
            for name, delta in DEMO_MODELS.items()}
