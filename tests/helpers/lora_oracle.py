"""peft as the oracle of a LoRA fold: tiny transformers models, adapters made by peft, merge_and_unload().

Bases are built with transformers and saved in several shards; adapters are made with
``get_peft_model(..., init_lora_weights=False)`` so that B != 0, and what training would change (DoRA
magnitudes, trained biases, modules_to_save copies) is perturbed. The reference is peft's own merge, saved
with save_pretrained and read back from the files, exactly what a user of peft gets on disk.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from .models import read_folder

LLAMA = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)
GPT2 = dict(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64)
SHARD = "60KB"   # every tiny base is written in several shards


def llama(tied: bool = False, **extra):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**LLAMA, tie_word_embeddings=tied, **extra)).eval()


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(**GPT2)).eval()


def save_base(model, folder: Path, dtype: torch.dtype) -> Path:
    copy.deepcopy(model).to(dtype).save_pretrained(folder, max_shard_size=SHARD)
    assert (folder / "model.safetensors.index.json").exists(), "the base should be sharded"
    return folder


def make_adapter(model, folder: Path, seed: int = 1, perturb: Optional[Callable] = None,
                 autocast_adapter_dtype: bool = True, **config) -> Path:
    """An adapter as training would leave it: random A and B, moved magnitudes and trained copies."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(init_lora_weights=False, **config),
                                autocast_adapter_dtype=autocast_adapter_dtype)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            trained = "modules_to_save" in name or name.endswith(".bias")   # copies, biases, lora_B biases
            if "lora_magnitude_vector" in name or (trained and param.requires_grad):
                param.mul_(1 + 0.2 * torch.randn_like(param)).add_(0.01 * torch.randn_like(param))
        if perturb is not None:
            perturb(peft_model)
    peft_model.save_pretrained(folder)
    return folder


def peft_merge(base_dir: Path, adapters: Sequence[Path], dtype: torch.dtype, out: Path,
               weights: Optional[Sequence[float]] = None, model_class=None,
               prepare: Optional[Callable] = None) -> tuple[dict, dict]:
    """peft's result with all ``adapters`` active (each scaled by its weight), as saved files and config."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = (model_class or AutoModelForCausalLM).from_pretrained(base_dir, dtype=dtype)
    if prepare is not None:
        prepare(model)
    names = [f"a{i}" for i in range(len(adapters))]
    peft_model = PeftModel.from_pretrained(model, adapters[0], adapter_name=names[0])
    for name, folder in zip(names[1:], adapters[1:]):
        peft_model.load_adapter(folder, adapter_name=name)
    peft_model.base_model.set_adapter(names)
    for name, weight in zip(names, weights or [1.0] * len(names)):
        for module in peft_model.modules():
            scaling = getattr(module, "scaling", None)   # a LoRA layer's {adapter: scaling}
            if isinstance(scaling, dict) and name in scaling and weight != 1:
                scaling[name] *= weight                  # peft's scale_layer, for one adapter
    peft_model.merge_and_unload().save_pretrained(out)
    return read_folder(out), json.loads((out / "config.json").read_text())


def assert_same_tensors(got: dict, expected: dict, base: dict) -> int:
    """Bit-for-bit equality of every tensor; returns how many differ from the base (so a no-op fold fails)."""
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, name
        diff = (got[name].double() - tensor.double()).abs().max().item()
        assert torch.equal(got[name], tensor), f"{name}: max |diff| {diff:.3g}"
    changed = sum(not (name in base and torch.equal(base[name], tensor)) for name, tensor in got.items())
    assert changed > 0
    return changed


def logits(folder_or_model, tokens: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = folder_or_model
    if isinstance(folder_or_model, (str, Path)):
        model = AutoModelForCausalLM.from_pretrained(folder_or_model, dtype=dtype)
    with torch.no_grad():
        return model.eval()(tokens).logits.float()
