"""The showcase's measurements of a model folder: recall of each fact set and fluency on ordinary text; and how
much the two fine-tunes' task vectors overlap (used by scripts/showcase.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from showcase_inputs import FACT_SETS

# Ordinary text for fluency: plain sentences in no training set.
PLAIN_TEXT = [
    "The train was late this morning, so I walked to the office and bought a coffee on the way.",
    "Water boils at one hundred degrees Celsius at sea level, but at a lower temperature on a high mountain.",
    "She opened the window, looked at the garden, and decided that the roses needed more water.",
    "Most birds build their nests in the spring, when there is plenty of food for their young.",
    "The library closes at six o'clock on weekdays and is open only in the morning on Saturdays.",
    "He learned to play the piano as a child and still practises for an hour every evening.",
]


@dataclass
class Score:
    label: str
    recall: dict[str, float]                    # fact set -> fraction recalled
    loss: float                                 # plain-text loss, nats per token
    answers: dict[str, list[str]] = field(default_factory=dict)   # fact set -> greedy completions
    validation: Optional[str] = None            # passed | FAILED | None (not an output of ours)

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    def misses(self) -> list[str]:
        """The facts not recalled, with what the model said instead."""
        return [f"{prompt} {answer} (said: {' '.join(said.split()) or 'nothing'})"
                for name, facts in FACT_SETS.items()
                for (prompt, answer), said in zip(facts, self.answers[name]) if not recalled(said, answer)]


def recalled(said: str, answer: str) -> bool:
    return said.strip().startswith(answer)


def score(folder: str, label: str) -> Score:
    """Fact recall by greedy completion, and the loss on the plain sentences (weights as stored, float32 compute)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    recall, answers = {}, {}
    with torch.no_grad():
        for name, facts in FACT_SETS.items():
            answers[name] = [complete(model, tokenizer, prompt, answer) for prompt, answer in facts]
            recall[name] = sum(map(recalled, answers[name], [a for _, a in facts])) / len(facts)
        loss = plain_text_loss(model, tokenizer)
    return Score(label, recall, loss, answers)


def complete(model, tokenizer, prompt: str, answer: str) -> str:
    """Greedy completion, two tokens longer than the answer."""
    import torch

    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    new = len(tokenizer(f" {answer}")["input_ids"]) + 2
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                         pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def plain_text_loss(model, tokenizer) -> float:
    """Mean next-token cross-entropy (nats) over every predicted token of PLAIN_TEXT."""
    import torch

    total, count = 0.0, 0
    for sentence in PLAIN_TEXT:
        ids = torch.tensor([tokenizer(sentence)["input_ids"]])   # (1, tokens)
        loss = model(input_ids=ids, labels=ids).loss             # mean over tokens - 1 predictions
        total += loss.item() * (ids.shape[1] - 1)
        count += ids.shape[1] - 1
    return total / count


def task_vector_overlap(base: str, ft_x: str, ft_y: str) -> tuple[float, float]:
    """(cosine of the two task vectors ft - base over all tensors, fraction of entries changed by both whose
    signs agree): how much TIES' sign vote has to decide. One tensor at a time, float32."""
    import torch
    from safetensors import safe_open

    files = [f"{folder}/model.safetensors" for folder in (base, ft_x, ft_y)]
    dot = norm_x = norm_y = 0.0
    agree = both = 0
    with safe_open(files[0], "pt") as b, safe_open(files[1], "pt") as x, safe_open(files[2], "pt") as y:
        for name in b.keys():
            weight = b.get_tensor(name).float()
            tau_x, tau_y = x.get_tensor(name).float() - weight, y.get_tensor(name).float() - weight
            dot += float((tau_x * tau_y).sum())
            norm_x, norm_y = norm_x + float(tau_x.square().sum()), norm_y + float(tau_y.square().sum())
            changed = (tau_x != 0) & (tau_y != 0)
            agree += int((changed & (torch.sign(tau_x) == torch.sign(tau_y))).sum())
            both += int(changed.sum())
    return dot / math.sqrt(norm_x * norm_y), agree / max(both, 1)
