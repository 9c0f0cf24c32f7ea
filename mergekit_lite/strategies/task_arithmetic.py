"""The task arithmetic family: one function, eight presets (mergekit's generalized task arithmetic).

    delta_i = sparsify(x_i - base) * weight_i          # a sparsifier per preset; weight before the vote
    mixed   = sum_i delta_i                            # or, with the TIES sign vote, only the deltas
                                                       # whose sign agrees with sign(sum_i delta_i)
    mixed  /= sum of the weights that took part        # when ``normalize`` (a zero divisor counts as 1)
    out     = base + lambda * mixed                    # lambda applied last

| preset | vote | sparsifier | normalize | rescale | paper |
| task_arithmetic | - | - | false | - | Ilharco et al., arXiv 2212.04089 |
| ties | sum | magnitude | true | false | Yadav et al., arXiv 2306.01708 |
| dare_linear, dare_ties | -, sum | random | false | true | Yu et al., arXiv 2311.03099 |
| breadcrumbs, breadcrumbs_ties | -, sum | magnitude_outliers | false | false | Davari & Belilovsky, arXiv 2312.06795 |
| della_linear, della | -, sum | della_magprune | false, true | true | Deep et al., arXiv 2406.11617 |
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Optional, Sequence

import torch

from ..strategy import Param, ParamProblem, Strategy, TensorContext, weights_sum_check
from . import sparsifiers
from .chunks import whole
from .consensus import finish, vote, weight_divisor
from .task_chunks import chunkable, task_chunks


def generalized_task_arithmetic(inputs: Sequence[torch.Tensor], base: Optional[torch.Tensor], ctx: TensorContext,
                                *, consensus: Optional[str], sparsifier: Optional[str], weight: Sequence[float],
                                normalize: bool, rescale: bool = False, density: Sequence[float] = (),
                                gamma: Sequence[float] = (), epsilon: Sequence[float] = (),
                                int8_mask: bool = False, **params: float) -> torch.Tensor:
    """base + lambda * (vote-filtered, optionally normalized) sum of weighted, sparsified task vectors.

    The operation order is mergekit's, so deterministic presets give its float32 bits: each delta is
    sparsified, then multiplied by its float32 weight; deltas are summed in model order; the divisor is
    the float32 sum of the weights in model order. ``int8_mask`` is accepted for mergekit configs and has
    no effect (there it only picks the dtype of a temporary mask).
    """
    assert base is not None
    generator = ctx.generator(base.device) if sparsifier == "della_magprune" else None
    weights = [torch.tensor(w, dtype=base.dtype, device=base.device) for w in weight]   # float32 scalars
    lam = params["lambda"]
    if consensus is None:
        mixed = torch.zeros_like(base)
        for i, tensor in enumerate(inputs):
            delta = tensor - base
            if sparsifier is not None:
                delta = _sparsify(sparsifier, delta, i, rescale, density, gamma, epsilon, generator, ctx)
            mixed.add_(delta.mul_(weights[i]))   # one delta alive at a time: memory stays (n + 3) tensors
            del delta
        return finish(mixed, weight_divisor(weights, normalize), lam, base)
    deltas = []
    for i, tensor in enumerate(inputs):
        delta = tensor - base
        if sparsifier is not None:
            delta = _sparsify(sparsifier, delta, i, rescale, density, gamma, epsilon, generator, ctx)
        deltas.append(delta.view(-1))
        del delta
    return vote(deltas, weights, base.view(-1), normalize, lam).view(base.shape)


def _sparsify(kind: str, delta: torch.Tensor, i: int, rescale: bool, density: Sequence[float],
              gamma: Sequence[float], epsilon: Sequence[float], generator: Optional[torch.Generator],
              ctx: TensorContext) -> torch.Tensor:
    if kind == "magnitude":
        return sparsifiers.magnitude(delta, density[i], rescale)
    if kind == "magnitude_outliers":
        return sparsifiers.magnitude_outliers(delta, density[i], gamma[i], rescale)
    if kind == "random":
        return sparsifiers.random(delta, density[i], rescale, ctx, i)
    assert generator is not None
    return sparsifiers.della_magprune(delta, density[i], epsilon[i], rescale, generator)


@dataclass(frozen=True)
class Preset:
    name: str
    title: str
    summary: str
    paper: str
    consensus: Optional[str]      # None or "sum" (the TIES sign vote)
    sparsifier: Optional[str]     # None, "magnitude", "random", "magnitude_outliers", "della_magprune"
    normalize: bool               # default of `normalize`
    rescale: bool = False         # default of `rescale`


WEIGHT = Param("weight", float, "scales this model's task vector (before the sign vote)", per_model=True,
               for_base=False)
LAMBDA = Param("lambda", float, "scales the combined task vector, applied last", default=1.0)
DENSITY = "fraction of this model's task vector entries kept"
INT8_MASK = Param("int8_mask", bool, "accepted for mergekit configs; no effect on the result (mergekit: the "
                                     "dtype of a temporary mask)", default=False)


def _params(p: Preset) -> tuple[Param, ...]:
    params = [WEIGHT]
    if p.sparsifier is not None:
        params.append(Param("density", float, DENSITY, default=1.0, per_model=True, for_base=False, min=0, max=1))
    if p.sparsifier == "magnitude_outliers":
        params.append(Param("gamma", float, "fraction of largest-magnitude entries dropped as outliers",
                            default=0.01, per_model=True, for_base=False, min=0, max=1))
    if p.sparsifier == "della_magprune":
        params.append(Param("epsilon", float, "half-width of the keep-probability band: entries are kept with "
                                              "probability density - epsilon (smallest) .. density + epsilon "
                                              "(largest); both must lie strictly inside (0, 1)",
                            default=0.15, per_model=True, for_base=False, min=0, max=1))
    params.append(Param("normalize", bool, "divide the combined task vector by the sum of the weights that "
                                           "took part", default=p.normalize))
    if p.sparsifier is not None:
        params.append(Param("rescale", bool, "after pruning, scale each task vector back to its L1 norm",
                            default=p.rescale))
    params.append(LAMBDA)
    if p.consensus is not None:
        params.append(INT8_MASK)
    return tuple(params)


def _check_della(params: dict[str, Any]) -> Optional[ParamProblem]:
    """DELLA's probabilities density +/- epsilon must stay strictly inside (0, 1) for every model
    (a density of 0 or 1 prunes nothing or everything, so epsilon does not matter there)."""
    for i, (density, epsilon) in enumerate(zip(params["density"], params["epsilon"])):
        if 0 < density < 1 and not (density - epsilon > 0 and density + epsilon < 1):
            return ParamProblem(f"density +/- epsilon must lie strictly inside (0, 1), got density "
                                f"{density:g} and epsilon {epsilon:g}", ("epsilon", "density"), model=i)
    return None


def _check(p: Preset):
    """della's probability band; and without the sign vote, normalize divides by the weight sum, which must
    not be zero (mergekit would quietly skip the division there)."""
    checks = ([_check_della] if p.sparsifier == "della_magprune" else []) + \
        ([weights_sum_check] if p.consensus is None else [])

    def check(params: dict[str, Any]) -> Optional[ParamProblem]:
        return next((problem for c in checks if (problem := c(params)) is not None), None)

    return check if checks else None


PRESETS = (
    Preset("task_arithmetic", "Task Arithmetic", "Adds each model's weighted difference from the base (its task "
           "vector) to the base.", "https://arxiv.org/abs/2212.04089", None, None, normalize=False),
    Preset("ties", "TIES", "Task arithmetic after trimming each task vector to its largest entries and electing "
           "a sign per entry; only agreeing entries are averaged.", "https://arxiv.org/abs/2306.01708",
           "sum", "magnitude", normalize=True),
    Preset("dare_linear", "DARE (linear)", "Task arithmetic after randomly dropping task vector entries and "
           "rescaling the rest.", "https://arxiv.org/abs/2311.03099", None, "random", normalize=False, rescale=True),
    Preset("dare_ties", "DARE with TIES sign election", "DARE's random drop and rescale, then TIES' sign vote.",
           "https://arxiv.org/abs/2311.03099", "sum", "random", normalize=False, rescale=True),
    Preset("breadcrumbs", "Model Breadcrumbs", "Task arithmetic after dropping each task vector's largest "
           "outliers and its smallest entries.", "https://arxiv.org/abs/2312.06795", None, "magnitude_outliers",
           normalize=False),
    Preset("breadcrumbs_ties", "Model Breadcrumbs with TIES sign election", "Breadcrumbs pruning, then TIES' "
           "sign vote.", "https://arxiv.org/abs/2312.06795", "sum", "magnitude_outliers", normalize=False),
    Preset("della", "DELLA", "Random drop with keep probability rising with magnitude rank (MagPrune), rescale, "
           "then TIES' sign vote.", "https://arxiv.org/abs/2406.11617", "sum", "della_magprune",
           normalize=True, rescale=True),
    Preset("della_linear", "DELLA (linear)", "DELLA's MagPrune and rescale, without the sign vote.",
           "https://arxiv.org/abs/2406.11617", None, "della_magprune", normalize=False, rescale=True),
)


def _bodies(p: Preset) -> dict[str, Any]:
    """``fn`` and, for the pruning presets, the chunked body (chunks_when: TIES only without rescale). DARE has
    one body for both paths; TIES, breadcrumbs and DELLA keep generalized_task_arithmetic for whole tensors (on
    GPUs, and as the independent reference the chunked path is tested against)."""
    whole_fn = partial(generalized_task_arithmetic, consensus=p.consensus, sparsifier=p.sparsifier)
    if not chunkable(p.sparsifier, False):
        return {"fn": whole_fn}
    body = partial(task_chunks, consensus=p.consensus, sparsifier=p.sparsifier)
    return {"fn": whole(body) if p.sparsifier == "random" else whole_fn, "chunked": body,
            "chunks_when": lambda params: chunkable(p.sparsifier, params.get("rescale", False))}


STRATEGIES = [
    Strategy(name=p.name, **_bodies(p),
             title=p.title, summary=p.summary, paper=p.paper, base="required", params=_params(p),
             random=p.sparsifier in ("random", "della_magprune"),
             # Row blocks are fine without pruning and the sign vote; those need the whole tensor (top-k,
             # L1 norms, a random stream drawn for the tensor's shape).
             elementwise=p.sparsifier is None and p.consensus is None,
             # base + lambda * sum_i w_i (x_i - base): without pruning, every element takes part. Pruned
             # entries are x * 0, which is NaN for NaN and Inf (DARE's L1 norms then skip the rescale; TIES
             # ranks NaN and Inf above every finite magnitude, so they are kept or become NaN).
             propagates_nonfinite=p.sparsifier in (None, "random", "magnitude"),
             check=_check(p))
    for p in PRESETS
]
