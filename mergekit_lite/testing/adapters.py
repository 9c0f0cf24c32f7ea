"""Small PEFT LoRA adapters for the synthetic Llama models, written without peft: the demo's adapters.

The files are what peft's ``save_pretrained`` writes (shared/research/lora.md 1.1-1.3): an
``adapter_config.json`` with the LoraConfig fields, and one ``adapter_model.safetensors`` whose keys are
``base_model.model.<module>.lora_A.weight`` (r, in) and ``...lora_B.weight`` (out, r), plus
``...lora_magnitude_vector`` (out,) for DoRA. Values are deterministic in (seed, key), and B is non-zero
(a trained adapter), so folding one visibly changes the model.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Optional

import torch

from ..lora.adapter import PREFIX, WEIGHTS_FILE
from ..lora.config import CONFIG_FILE
from ..output.writer import ShardWriter
from ..plan.shards import Entry
from .synthetic import DEMO_SHAPE, LlamaShape, model_tensor, tensor_shapes
from .synthetic import _generator as seeded


@dataclass(frozen=True)
class AdapterShape:
    """What a synthetic adapter adapts, and its LoraConfig."""

    targets: tuple[str, ...] = ("q_proj", "v_proj")
    r: int = 8
    lora_alpha: float = 16
    use_rslora: bool = False
    use_dora: bool = False
    scale: float = 0.01        # std of lora_B: how far the adapter moves the base


# The adapters the example specs in merge_configs/ refer to (demo/adapters/<name>).
DEMO_ADAPTERS = {
    "chat": AdapterShape(("q_proj", "v_proj"), r=8, lora_alpha=16),
    "code": AdapterShape(("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), r=16,
                         lora_alpha=32, use_rslora=True),
    "style": AdapterShape(("q_proj", "v_proj", "down_proj"), r=4, lora_alpha=8, use_dora=True),
}


def write_adapter(folder: str, base: LlamaShape, adapter: AdapterShape = AdapterShape(), *, seed: int = 0,
                  base_seed: int = 0, base_model: Optional[str] = None) -> str:
    """Write a LoRA adapter for the synthetic Llama ``base`` (written with ``base_seed``) into ``folder``."""
    os.makedirs(folder, exist_ok=True)
    modules = [(name[: -len(".weight")], dims) for name, dims in tensor_shapes(base)
               if name.endswith(".weight") and name.split(".")[-2] in adapter.targets]
    scaling = adapter.lora_alpha / (math.sqrt(adapter.r) if adapter.use_rslora else adapter.r)
    tensors: dict[str, torch.Tensor] = {}
    for module, (out_features, in_features) in modules:
        key = PREFIX + module
        down = torch.randn(adapter.r, in_features, generator=_generator(seed, key + ".A")) / math.sqrt(in_features)
        up = torch.randn(out_features, adapter.r, generator=_generator(seed, key + ".B")) * adapter.scale
        tensors[key + ".lora_A.weight"], tensors[key + ".lora_B.weight"] = down, up
        if adapter.use_dora:
            # A trained magnitude: peft starts it at the row norms of W + s*B@A; training moves it.
            weight = model_tensor(module + ".weight", (out_features, in_features), base_seed, None, 0.0)
            norm = torch.linalg.norm(weight + scaling * (up @ down), dim=1)
            noise = torch.randn(out_features, generator=_generator(seed, key + ".m"))
            tensors[key + ".lora_magnitude_vector"] = norm * (1 + 0.05 * noise)
    _write_tensors(os.path.join(folder, WEIGHTS_FILE), tensors)
    with open(os.path.join(folder, CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(_config(adapter, base_model), f, indent=2, sort_keys=True)
    return folder


def write_demo_adapters(root: str, base: LlamaShape = DEMO_SHAPE, base_model: str = "demo/models/base"
                        ) -> dict[str, str]:
    """The adapters of the examples, for the demo base model (``write_demo_models``'s ``base``)."""
    return {name: write_adapter(os.path.join(root, name), base, shape, seed=i + 1, base_model=base_model)
            for i, (name, shape) in enumerate(DEMO_ADAPTERS.items())}


def _config(adapter: AdapterShape, base_model: Optional[str]) -> dict:
    """The LoraConfig fields peft writes (the ones that matter for a fold, and the usual rest)."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, "revision": None,
        "r": adapter.r, "lora_alpha": adapter.lora_alpha, "lora_dropout": 0.0, "target_modules": list(adapter.targets),
        "use_rslora": adapter.use_rslora, "use_dora": adapter.use_dora, "fan_in_fan_out": False, "bias": "none",
        "lora_bias": False, "init_lora_weights": True, "modules_to_save": None, "rank_pattern": {},
        "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None, "exclude_modules": None,
        "inference_mode": True,
    }


def _write_tensors(path: str, tensors: dict[str, torch.Tensor]) -> None:
    entries = [Entry(name, t.dtype, tuple(t.shape)) for name, t in sorted(tensors.items())]
    writer = ShardWriter(path, entries)
    for name, tensor in tensors.items():
        writer.write(name, tensor.contiguous())
    writer.close()


def _generator(seed: int, key: str) -> torch.Generator:
    return seeded(seed, "adapter:" + key)   # keyed apart from the synthetic models' own tensors
