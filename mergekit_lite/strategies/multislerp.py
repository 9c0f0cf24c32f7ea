"""Multi-SLERP: a weighted barycentre of any number of models on the hypersphere, through the tangent space
at their weighted mean direction (Goddard, https://goddard.blog/posts/multislerp-wow-what-a-cool-idea;
mergekit's multislerp).

Whole tensors: every output element depends on the norms of the whole flattened task vectors. The
operations are mergekit's, on the same stacked (n_models, numel) tensor, so the float32 reductions round the
same way and give the same bits.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from ..errors import StrategyError
from ..strategy import Param, ParamProblem, Strategy, TensorContext


def multislerp(inputs: Sequence[torch.Tensor], base: Optional[torch.Tensor], ctx: TensorContext, *,
               weight: Sequence[float], normalize_weights: bool, eps: float) -> torch.Tensor:
    """With X_i the models (their task vectors x_i - base with a base_model), flattened:

        u_i = X_i / (|X_i| + eps)          m = normalize(sum_i w_i u_i)
        v   = sum_i w_i (u_i - (u_i . m) m)                      # the weighted mean tangent vector
        out = (m cos|v| + v sin|v| / |v|) * sum_i w_i |X_i|      # (|v| + eps in place of |v|)

    plus the base. ``normalize_weights`` first divides the weights by their sum. One model is returned as it
    is. When the weighted mean direction vanishes (|m| < eps): two models are linearly interpolated,
    sum_i w_i X_i; for more, all-zero X_i give zero (the base), and others are an error (mergekit raises for
    both).
    """
    if len(inputs) == 1:
        return inputs[0].clone()
    models = torch.stack(list(inputs))                     # (n_models, *shape)
    if base is not None:
        models -= base                                     # task vectors
    flat = models.view(models.shape[0], -1)                # (n_models, numel)
    weights = torch.tensor(list(weight), dtype=models.dtype, device=models.device)   # (n_models,)
    if normalize_weights:
        weights = weights / weights.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)         # (n_models, 1)
    units = flat / (norms + eps)
    mean = (units * weights.view(-1, 1)).sum(0)            # (numel,)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if len(inputs) > 2 and not bool(norms.any()):
            # every model equals the base (or is zero): the result is that point. mergekit raises here for
            # 3+ models; for 2 its linear fallback gives the same result. (Untouched embeddings, norms.)
            return models[0].view(models.shape[1:]) if base is None else base.clone()
        if len(inputs) != 2:
            raise StrategyError(f"the weighted mean direction of the {len(inputs)} models is zero (norm "
                                f"{float(mean_norm):.3g} < eps {eps:g}), so it has no point on the sphere",
                                where=f"tensor '{ctx.name}'",
                                hint="models (or task vectors) that cancel out, such as a and -a with equal "
                                     "weights; change a weight")
        lerp = (models[0] * weights[0] + models[1] * weights[1]).view(models.shape[1:])
        return lerp if base is None else lerp + base
    shape = models.shape[1:]
    del models, flat                                       # in place below where mergekit makes new tensors
    mean = mean / mean_norm
    tangents = units.sub_((units * mean).sum(-1, keepdim=True) * mean)   # (n_models, numel)
    tangent = tangents.mul_(weights.view(-1, 1)).sum(0)                  # (numel,)
    del units, tangents
    length = torch.norm(tangent) + eps
    # exponential map back to the sphere, then the weighted mean norm
    result = mean * torch.cos(length) + tangent * (torch.sin(length) / length)
    result = (result * (norms.squeeze(-1) * weights).sum()).view(shape)
    return result if base is None else result + base


def normalize_weights_check(params: dict[str, Any]) -> Optional[ParamProblem]:
    """normalize_weights divides by the sum of the weights: a zero sum would make NaN and Inf."""
    weights = params["weight"]
    if len(weights) > 1 and params["normalize_weights"] and abs(sum(weights)) < 1e-8:
        terms = " + ".join(f"{w:g}" for w in weights)
        return ParamProblem(f"the weights sum to {sum(weights):g} ({terms}), so normalize_weights cannot divide "
                            "by them", ("weight", "normalize_weights"),
                            hint="change a weight, or set normalize_weights: false")
    return None


STRATEGY = Strategy(
    name="multislerp",
    fn=multislerp,
    title="Multi-SLERP",
    summary="Spherical weighted average of any number of models (of their task vectors with a base_model), "
            "through the tangent space at their mean direction.",
    paper="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",   # a blog post, no paper
    base="optional",
    min_inputs=1,
    check=normalize_weights_check,
    details="Where every model equals the base (all task vectors zero), the result is the base; mergekit\n"
            "raises there for 3 or more models. Models whose directions cancel are an error, as in mergekit.",
    params=(
        Param("weight", float, "this model's share of the average", per_model=True, for_base=False),
        Param("normalize_weights", bool, "divide the weights by their sum, so they need not sum to 1",
              default=True),
        Param("eps", float, "added to norms before dividing; a mean direction shorter than this is zero",
              default=1e-8, min=0),
    ),
)
