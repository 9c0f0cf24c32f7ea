"""Multi-SLERP: a weighted barycentre of any number of models on the hypersphere, through the tangent space
at their weighted mean direction (Goddard, https://goddard.blog/posts/multislerp-wow-what-a-cool-idea;
mergekit's multislerp).

Every output element depends on four whole-tensor reductions: each task vector's norm, the norm of the mean
direction, each model's dot product with it, and the norm of the mean tangent. mergekit makes them with
torch's float32 norm and sum over the whole flattened tensor, whose order of rounding no per-chunk partial
results reproduce; so each is made by the same torch call on one whole float32 vector filled in chunks
(``chunks.collect``), and everything element-wise runs in chunks of the raw inputs. The result has mergekit's
bits, and memory holds the raw inputs, the output and at most two float32 vectors of the tensor's size
(mergekit holds about four stacks of every model's float32 tensor).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch

from ..errors import StrategyError
from ..strategy import Param, ParamProblem, Strategy, TensorContext
from .chunks import Chunks, as_rows, collect, whole

BLOCK = 1 << 16   # elements per piece of work: a few (n_models, BLOCK) float32 temporaries per thread


def multislerp_chunks(src: Chunks, ctx: TensorContext, *, weight: Sequence[float], normalize_weights: bool,
                      eps: float) -> None:
    """With X_i the models (their task vectors x_i - base with a base_model), flattened:

        u_i = X_i / (|X_i| + eps)          m = normalize(sum_i w_i u_i)
        v   = sum_i w_i (u_i - (u_i . m) m)                      # the weighted mean tangent vector
        out = (m cos|v| + v sin|v| / |v|) * sum_i w_i |X_i|      # (|v| + eps in place of |v|)

    plus the base. ``normalize_weights`` first divides the weights by their sum. One model is returned as it
    is. When the weighted mean direction vanishes (|m| < eps): two models are linearly interpolated,
    sum_i w_i X_i; for more, all-zero X_i give zero (the base), and others are an error (mergekit raises for
    both).
    """
    n = src.count
    if n == 1 or src.numel == 0:
        src.map(lambda lo, hi: src.emit(lo, src.input(0, lo, hi)), BLOCK)
        return
    has_base = src.base_present

    def task(i: int, lo: int, hi: int) -> torch.Tensor:    # (m,): X_i
        return src.input(i, lo, hi) - src.base(lo, hi) if has_base else src.input(i, lo, hi)

    def models(lo: int, hi: int) -> torch.Tensor:          # (n_models, m)
        return torch.stack([task(i, lo, hi) for i in range(n)])

    def plus_base(values: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        return values + src.base(lo, hi) if has_base else values

    weights = torch.tensor(list(weight), dtype=src.dtype, device=src.device)   # (n_models,)
    if normalize_weights:
        weights = weights / weights.sum()
    column = weights.view(-1, 1)
    norms, vector = _per_model(src, task, lambda rows: torch.norm(rows, dim=-1), None)   # |X_i|, as mergekit
    divisors = norms + eps                                 # (n_models, 1)

    def units(lo: int, hi: int) -> torch.Tensor:           # (n_models, m)
        return models(lo, hi) / divisors

    mean = collect(src, lambda lo, hi: (units(lo, hi) * column).sum(0), BLOCK)   # (numel,)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        del mean, vector
        return _degenerate(src, ctx, models, plus_base, weights, norms, mean_norm, eps)
    mean.div_(mean_norm)
    dots, vector = _per_model(src, lambda i, lo, hi: task(i, lo, hi) / divisors[i] * mean[lo:hi],
                              lambda rows: rows.sum(-1), vector)   # u_i . m, as mergekit's sum of its row

    def tangent_part(lo: int, hi: int) -> torch.Tensor:    # sum_i w_i (u_i - (u_i . m) m)
        return ((units(lo, hi) - dots * mean[lo:hi]) * column).sum(0)

    tangent = collect(src, tangent_part, BLOCK, out=vector)
    length = torch.norm(tangent) + eps
    # exponential map back to the sphere, then the weighted mean norm
    cos, sin = torch.cos(length), torch.sin(length) / length
    scale = (norms.squeeze(-1) * weights).sum()

    def output(lo: int, hi: int) -> None:
        src.emit(lo, plus_base((mean[lo:hi] * cos + tangent[lo:hi] * sin) * scale, lo, hi))

    src.map(output, BLOCK)


def _per_model(src: Chunks, part: Callable[[int, int, int], torch.Tensor],
               reduce: Callable[[torch.Tensor], torch.Tensor], vector: Optional[torch.Tensor]
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """``reduce`` (over dim 1 of ``chunks.as_rows``, as mergekit reduces its stacked models) of each model's whole
    vector (elements [lo, hi) of model i: ``part(i, lo, hi)``), filled one model at a time into one reused
    vector: (n_models, 1), and that vector."""
    found = []
    for i in range(src.count):
        vector = collect(src, lambda lo, hi, i=i: part(i, lo, hi), BLOCK, out=vector)
        found.append(reduce(as_rows(vector))[0])
    return torch.stack(found).view(-1, 1), vector


def _degenerate(src: Chunks, ctx: TensorContext, models, plus_base, weights: torch.Tensor, norms: torch.Tensor,
                mean_norm: torch.Tensor, eps: float) -> None:
    """The weighted mean direction is zero: the base (every model is it), two models' lerp, else an error."""
    n = src.count
    if n > 2 and not bool(norms.any()):
        # every model equals the base (or is zero): the result is that point. mergekit raises here for
        # 3+ models; for 2 its linear fallback gives the same result. (Untouched embeddings, norms.)
        src.map(lambda lo, hi: src.emit(lo, src.base(lo, hi) if src.base_present else models(lo, hi)[0]), BLOCK)
        return
    if n != 2:
        raise StrategyError(f"the weighted mean direction of the {n} models is zero (norm "
                            f"{float(mean_norm):.3g} < eps {eps:g}), so it has no point on the sphere",
                            where=f"tensor '{ctx.name}'",
                            hint="models (or task vectors) that cancel out, such as a and -a with equal "
                                 "weights; change a weight")

    def lerp(lo: int, hi: int) -> None:
        pair = models(lo, hi)
        src.emit(lo, plus_base(pair[0] * weights[0] + pair[1] * weights[1], lo, hi))

    src.map(lerp, BLOCK)


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
    fn=whole(multislerp_chunks),
    chunked=multislerp_chunks,
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
