"""The routers of `merge moe` (mergekit/moe/router.py's formulas), computed before the output is written.

For each expert, a vector per layer (routers: (layers, experts, hidden)):
- ``hidden``: the base model runs on the expert's positive prompts (each prefixed with the BOS token, padded on
  the left); the hidden state of the last token at each layer's input, averaged over the prompts; minus the same
  for the negative prompts; divided by its L2 norm (at least 1e-8). As mergekit: in bfloat16. mergekit-moe loads
  the base whole; here the caller may pass ``stream``, which builds it with its weights read layer by layer as it
  runs (validation/streamed.py, a room above this one), so memory holds one layer, whatever the model's size.
- ``cheap_embed``: the token embeddings summed over the prompts' tokens (float32), divided by their norm; the
  same vector for every layer; minus the negative prompts'; divided by the norm again.
- ``random``: N(0, 1); ``uniform_random``: U(-1/sqrt(hidden), 1/sqrt(hidden)) (torch.nn.Linear's init).
  Drawn from a torch generator seeded with ``seed``: the numbers mergekit-moe draws with ``--random-seed seed``.
Shared experts (Qwen2-MoE) get a gate vector the same way, after the routed experts.
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Optional

import torch

from ..errors import ModelError
from ..plan.moe import MoEPlan

log = logging.getLogger("mergekit_lite")


Stream = Callable[[str, torch.device], Optional[torch.nn.Module]]   # folder, device -> bfloat16 model or None


def compute_routers(plan: MoEPlan, device: torch.device, stream: Optional[Stream] = None) -> None:
    """Fill ``plan.routers`` ("experts": (layers, experts, hidden), "shared": (layers, 1, hidden)), float32.
    ``stream``: for gate_mode hidden, the base model with its weights read as it runs, or None when it cannot
    stream (then it is loaded whole, as mergekit-moe does)."""
    spec = plan.moe
    gated = list(spec.experts)
    if plan.output == "qwen":
        gated += list(spec.shared_experts)
    layers, hidden = plan.layers, plan.reference.config["hidden_size"]
    shape = (layers, len(gated), hidden)
    if spec.gate_mode == "random":
        vectors = torch.randn(shape, generator=torch.Generator().manual_seed(plan.seed))
    elif spec.gate_mode == "uniform_random":
        scale = math.sqrt(1.0 / hidden)
        vectors = torch.rand(shape, generator=torch.Generator().manual_seed(plan.seed)) * 2 * scale - scale
    else:
        vectors = _from_prompts(plan, gated, device, stream)
    vectors = vectors.float().cpu()
    plan.routers["experts"] = vectors[:, :len(spec.experts)].contiguous()
    plan.routers["shared"] = vectors[:, len(spec.experts):].contiguous()
    _warn_degenerate(vectors)


def _from_prompts(plan: MoEPlan, experts: list, device: torch.device, stream: Optional[Stream]) -> torch.Tensor:
    tokenizer = _tokenizer(plan)
    if plan.moe.gate_mode == "cheap_embed":
        embed = plan.reference.read("model.embed_tokens.weight")

        def vector(tokens) -> torch.Tensor:
            onehot = torch.nn.functional.one_hot(tokens["input_ids"], num_classes=embed.shape[0])
            h = onehot.float() @ embed.float()                                   # (prompts, tokens, hidden)
            summed = (h * tokens["attention_mask"].unsqueeze(-1)).sum(dim=1).sum(dim=0, keepdim=True)
            return (summed / summed.norm(dim=-1, keepdim=True).clamp(min=1e-8)).repeat(plan.layers, 1)
    else:
        model = _model(plan, device, stream)

        def vector(tokens) -> torch.Tensor:
            with torch.no_grad():
                out = model(**tokens.to(device), output_hidden_states=True, return_dict=True)
            states = torch.stack(out.hidden_states[:-1])[:, :, -1, :]          # (layers, prompts, hidden)
            return states.sum(dim=1) / states.shape[1]

    vectors = []
    for expert in experts:
        states = vector(_tokenize(tokenizer, expert.positive_prompts))
        if expert.negative_prompts:
            states -= vector(_tokenize(tokenizer, expert.negative_prompts))
        states /= states.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8)
        vectors.append(states)
    return torch.stack(vectors, dim=0).permute(1, 0, 2)                          # (layers, experts, hidden)


def _tokenizer(plan: MoEPlan):
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ModelError(f"gate_mode {plan.moe.gate_mode} needs transformers to tokenize the prompts",
                         hint="pip install transformers, or use gate_mode: random") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(plan.reference.folder)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load the base model's tokenizer: {exc}", file=plan.reference.label,
                         hint=f"gate_mode {plan.moe.gate_mode} tokenizes the prompts with it; use gate_mode: "
                              "random for a model without one") from None
    tokenizer.padding_side = "left"    # mergekit's settings: the last position is a real token
    tokenizer.pad_token_id = tokenizer.bos_token_id
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _tokenize(tokenizer, prompts):
    return tokenizer([(tokenizer.bos_token or "") + p for p in prompts], return_tensors="pt", padding=True,
                     add_special_tokens=False)


def _model(plan: MoEPlan, device: torch.device, stream: Optional[Stream]):
    """The base model in bfloat16, as mergekit-moe runs it for gate_mode hidden: streamed layer by layer when
    ``stream`` can, else loaded whole (a checkpoint whose tensor names transformers renames while loading)."""
    log.info("running %s on the prompts (gate_mode hidden)", plan.reference.label)
    model = stream(plan.reference.folder, device) if stream is not None else None
    return model if model is not None else _whole_model(plan.reference.folder, device)


def _whole_model(folder: str, device: torch.device):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to(device).eval()


def _warn_degenerate(vectors: torch.Tensor, threshold: float = 5.0) -> None:
    """mergekit's warn_degenerate_gates: a badly conditioned router underuses some experts."""
    if vectors.shape[1] < 2:
        return
    bad = [i for i in range(vectors.shape[0]) if torch.linalg.cond(vectors[i]) > threshold]
    if bad:
        log.warning("router of layer(s) %s is degenerate (condition number > %g): the prompts may be too similar, "
                    "and some experts will be underused", ", ".join(map(str, bad)), threshold)
