"""Concatenation (ours): join the models' MLPs (and attention heads) side by side in one wider layer.

An MLP computes down(act(gate(x)) * up(x)). Stacking the models' gate/up rows and placing their down
columns side by side, each scaled by the model's weight, gives one MLP whose output is exactly
sum_i w_i * MLP_i(x): the hidden units of different models never mix. Attention heads are independent in
the same way (q/k/v rows stacked, o columns side by side, scaled). Which tensors are widened, along which
axis, and the config changes are decided by the concat layout (plan/concat.py); this function only joins.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..strategy import Param, Strategy, TensorContext, weights_sum_check


def concat(inputs: Sequence[torch.Tensor], base: Optional[torch.Tensor], ctx: TensorContext, *,
           weight: Sequence[float], normalize: bool, axis: Optional[int], scaled: bool, chunks: int) -> torch.Tensor:
    """Join the inputs along ``axis``; ``axis=None`` is their weighted sum (a bias added after a join).

    ``scaled``: each input is multiplied by its weight (projections back into the residual stream: down,
    o_proj). ``chunks``: a fused projection (gate_up_proj) is joined part by part, [g_1 g_2 u_1 u_2], so
    that splitting the result in ``chunks`` still gives the gate and the up projection.
    """
    total = sum(weight)
    scales = [w / total for w in weight] if normalize else list(weight)
    if axis is None:
        result = torch.zeros_like(inputs[0])
        for tensor, scale in zip(inputs, scales):
            result.add_(tensor, alpha=scale)
        return result
    parts = [tensor.chunk(chunks, dim=axis) for tensor in inputs]   # (n_models, chunks) views
    pieces = [part[c] * scale if scaled else part[c] for c in range(chunks) for part, scale in zip(parts, scales)]
    return torch.cat(pieces, dim=axis)


STRATEGY = Strategy(
    name="concat",
    fn=concat,
    title="Concatenation",
    summary="Joins the models' MLPs and attention heads side by side: each layer computes the weighted sum of "
            "the models' layers.",
    base="optional",
    min_inputs=2,
    check=weights_sum_check,
    changes_shapes=True,
    params=(
        Param("weight", float, "this model's share of each widened layer's output", per_model=True, min=0),
        Param("normalize", bool, "divide the weights by their sum, so the output is a weighted average",
              default=True),
        Param("attention", bool, "also widen attention by heads (false: attention is merged by the fallback)",
              default=True),
        Param("fallback", str, "the method for tensors that are not widened (norms, embeddings, lm_head)",
              default="linear"),
    ),
    details="""\
How it works: gate_proj/up_proj (c_fc, fc1) are stacked along their output dimension and down_proj
(c_proj, fc2) along its input dimension, scaled by each model's weight, so every merged MLP computes
sum_i weight_i * MLP_i(x) exactly (up to float rounding); intermediate_size is the sum of the models'.
With attention: true (the default), q/k/v are stacked by heads and o_proj joined the same way, so
attention is the weighted sum too; head counts are added up. That needs separate q/k/v projections,
equal head sizes, equal query-per-key/value-head ratios, and a head size the architecture reads from
config.json (head_dim; GPT-2 derives it as n_embd / n_head, so more heads would be narrower heads);
otherwise the error names the key or tensor that blocks it (attention: false widens only the MLPs).
Everything else (norms, embeddings, lm_head) is merged by `fallback`, exactly as
`merge_method: <fallback>` would merge it with the same spec; a base_model is only used by the fallback.
Cost: the widened layers hold all of the models' layer parameters, so the result needs about the
memory and compute of serving the models side by side; it saves nothing. Choose it when one checkpoint
must behave like an ensemble inside each layer (one file, one forward pass, a starting point for further
training or pruning).""",
)
