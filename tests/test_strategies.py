"""Every built-in strategy passes one contract (shape, dtype, inputs untouched, seeded bytes), and the
closed forms hold: TIES/DARE at density 1 are task arithmetic, SLERP's ends are its inputs, N copies of a
model merge back to that model."""

from __future__ import annotations

import pytest
import torch

from mergekit_lite.strategies.registry import builtins
from mergekit_lite.strategy import REQUIRED, TensorContext

STRATEGIES = {s.name: s for s in builtins()}
# Strategies whose output has the inputs' shape (concat widens tensors through its own layout).
SAME_SHAPE = sorted(name for name, s in STRATEGIES.items() if not s.changes_shapes)
# Per-model parameter values for the contract runs (everything else takes its default).
VALUES = {"weight": 0.7, "density": 0.5, "gamma": 0.05, "epsilon": 0.1, "t": 0.3}


def tensors(n_inputs: int, shape=(48, 40), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g) * 0.02
    inputs = [base + 0.002 * torch.randn(shape, generator=g) for _ in range(n_inputs)]
    return inputs, base


def params_for(strategy, n_inputs: int, **overrides):
    params = {}
    for p in strategy.params:
        assert p.name in overrides or p.name in VALUES or p.default is not REQUIRED, f"no value for {p.name}"
        value = overrides.get(p.name, VALUES.get(p.name, p.default))
        params[p.name] = tuple(value) if isinstance(value, tuple) else (value,) * n_inputs if p.per_model else value
    return params


def call(strategy, inputs, base, seed=0, name="model.layers.0.mlp.up_proj.weight", **overrides):
    ctx = TensorContext(name, 0, 0.0, seed)
    with_base = base if strategy.base != "input" else None
    return strategy(inputs, with_base, ctx, **params_for(strategy, len(inputs), **overrides))


def n_inputs_for(strategy) -> int:
    return strategy.max_inputs or max(strategy.min_inputs, 3)


def test_the_methods_of_the_issue_are_built_in():
    assert set(STRATEGIES) >= {"linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs",
                               "breadcrumbs_ties", "della", "della_linear", "slerp", "nuslerp", "model_stock"}


@pytest.mark.parametrize("name", SAME_SHAPE)
@pytest.mark.parametrize("shape", [(48, 40), (40,), (3, 4, 5)])
def test_contract(name, shape):
    strategy = STRATEGIES[name]
    inputs, base = tensors(n_inputs_for(strategy), shape)
    copies = [t.clone() for t in inputs] + [base.clone()]
    out = call(strategy, inputs, base)
    assert out.shape == base.shape and out.dtype == torch.float32 and bool(torch.isfinite(out).all())
    for before, after in zip(copies, inputs + [base]):
        assert torch.equal(before, after), "a strategy modified its inputs"
    again = call(strategy, [t.clone() for t in inputs], base.clone())
    assert torch.equal(out.view(torch.int32), again.view(torch.int32)), "same inputs and seed, different bytes"
    other_seed = call(strategy, inputs, base, seed=1)
    assert torch.equal(out, other_seed) != strategy.random, "only random methods depend on the seed"
    other_name = call(strategy, inputs, base, name="model.layers.1.mlp.up_proj.weight")
    assert torch.equal(out, other_name) != strategy.random, "random streams differ per tensor name"


@pytest.mark.parametrize("name", SAME_SHAPE)
def test_float64_inputs_stay_float64(name):
    strategy = STRATEGIES[name]
    inputs, base = tensors(n_inputs_for(strategy))
    out = call(strategy, [t.double() for t in inputs], base.double())
    assert out.dtype == torch.float64 and bool(torch.isfinite(out).all())


@pytest.mark.parametrize("name", ["ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize("normalize", [True, False])
def test_one_model_at_density_1_is_task_arithmetic(name, normalize):
    inputs, base = tensors(1)
    ta = call(STRATEGIES["task_arithmetic"], inputs, base, normalize=normalize, **{"lambda": 0.8})
    out = call(STRATEGIES[name], inputs, base, density=1.0, normalize=normalize, **{"lambda": 0.8})
    assert torch.equal(out, ta)
    expected = base + 0.8 * (torch.tensor(0.7) * (inputs[0] - base) / (0.7 if normalize else 1))
    assert torch.allclose(out, expected, rtol=0, atol=1e-9)  # and task arithmetic is what it says


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties", "della", "della_linear"])
def test_random_methods_at_density_1_are_task_arithmetic_for_any_number_of_models(name):
    inputs, base = tensors(3)
    strategy = STRATEGIES[name]
    normalize = strategy.param("normalize").default
    ta = call(STRATEGIES["task_arithmetic"], inputs, base, normalize=normalize)
    out = call(strategy, inputs, base, density=1.0)
    if strategy.name in ("dare_ties", "della"):  # the sign vote still applies: compare with TIES at density 1
        ta = call(STRATEGIES["ties"], inputs, base, density=1.0, normalize=normalize)
    assert torch.equal(out, ta)


def test_ties_sign_vote_by_hand():
    """Three models, one entry each of the interesting cases, computed by hand."""
    base = torch.zeros(5)
    a = torch.tensor([1.0, 2.0, -1.0, 0.0, 3.0])
    b = torch.tensor([1.0, -3.0, 1.0, 0.0, -3.0])
    c = torch.tensor([-1.0, -1.0, 0.0, 0.0, 0.0])
    out = call(STRATEGIES["ties"], [a, b, c], base, weight=1.0, density=1.0, normalize=True)
    # entry 0: mass +1 -> a, b agree: (1+1)/2;  entry 1: mass -2 -> b, c: (-3-1)/2;
    # entry 2: mass 0 counts as + -> only b: 1/1; entry 3: no delta: 0; entry 4: mass 0 -> + -> a: 3/1
    assert out.tolist() == [1.0, -2.0, 1.0, 0.0, 3.0]
    unnormalized = call(STRATEGIES["ties"], [a, b, c], base, weight=(0.5, 1.0, 2.0), density=1.0, normalize=False)
    # weights scale the deltas before the vote: entry 0 mass 0.5+1-2 < 0 -> only c: -2
    assert unnormalized.tolist() == [-2.0, -5.0, 1.0, 0.0, -3.0]


@pytest.mark.parametrize("t", [0.0, 1.0])
@pytest.mark.parametrize("colinear", [False, True])
def test_slerp_ends_are_the_inputs(t, colinear):
    inputs, base = tensors(1)
    other = base * 1.5 if colinear else inputs[0]      # colinear -> the lerp branch
    out = call(STRATEGIES["slerp"], [other], base, t=t)
    assert torch.equal(out, base if t == 0 else other)


def test_slerp_keeps_the_norm_between_orthogonal_vectors():
    base = torch.tensor([1.0, 0.0])
    other = torch.tensor([0.0, 1.0])
    out = call(STRATEGIES["slerp"], [other], base, t=0.5)
    assert torch.allclose(out, torch.tensor([0.5 ** 0.5, 0.5 ** 0.5]), atol=1e-7)


@pytest.mark.parametrize("name,overrides", [
    ("ties", {"density": 1.0}), ("ties", {"density": 0.3}), ("task_arithmetic", {"normalize": True}),
    ("breadcrumbs", {"normalize": True, "density": 1.0}), ("dare_ties", {"density": 1.0, "normalize": True}),
    ("model_stock", {}), ("model_stock", {"filter_wise": True}), ("nuslerp", {}),
    ("nuslerp", {"nuslerp_flatten": False}), ("slerp", {}), ("linear", {}),
    ("ram", {"epsilon": 1e-5}), ("ramplus_tl", {"epsilon": 1e-5}),
    ("sce", {}), ("multislerp", {}), ("karcher", {}), ("nearswap", {}),
])
def test_copies_of_one_model_merge_back_to_it(name, overrides):
    """Rounded to bfloat16 (where the copies came from), the merge of N copies is the model itself."""
    strategy = STRATEGIES[name]
    inputs, base = tensors(1)
    model = inputs[0].bfloat16().float()
    base = base.bfloat16().float()
    if name == "slerp":
        base = model.clone()
    copies = [model.clone() for _ in range(n_inputs_for(strategy))]
    out = call(strategy, copies, base, weight=(0.2, 0.3, 0.5)[:len(copies)] if len(copies) > 1 else 0.7,
               **overrides)
    if name == "ties" and overrides.get("density", 1.0) < 1:   # trimmed: base + the kept part of the delta
        delta = (model - base).flatten()
        kept = torch.zeros(delta.numel(), dtype=torch.bool)
        kept[torch.sort(delta.abs(), descending=True, stable=True).indices[:int(0.3 * delta.numel())]] = True
        assert torch.equal(out.bfloat16(), torch.where(kept.view(model.shape), model, base).bfloat16())
    else:
        assert torch.equal(out.bfloat16(), model.bfloat16())


def test_model_stock_ratio_by_hand():
    """Two task vectors at 90 degrees: cos 0, t = 0 -> the base; at 60 degrees: cos 1/2, t = 2/3."""
    base = torch.zeros(2)
    out = call(STRATEGIES["model_stock"], [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])], base)
    assert out.tolist() == [0.0, 0.0]
    a, b = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 3.0 ** 0.5])
    out = call(STRATEGIES["model_stock"], [a, b], base)
    assert torch.allclose(out, 2 / 3 * (a + b) / 2, atol=1e-6)


def test_nuslerp_t_from_weights_and_task_vectors():
    base = torch.tensor([1.0, 1.0])
    a, b = torch.tensor([2.0, 1.0]), torch.tensor([1.0, 2.0])   # task vectors [1, 0] and [0, 1]
    out = call(STRATEGIES["nuslerp"], [a, b], base, weight=(1.0, 3.0))   # t = 3/4
    angle = torch.tensor(0.75 * torch.pi / 2)
    assert torch.allclose(out, base + torch.stack([torch.cos(angle), torch.sin(angle)]), atol=1e-6)
    # weights summing to ~0: t = 0.5
    half = call(STRATEGIES["nuslerp"], [a, b], base, weight=(-0.5, 0.5))
    assert torch.allclose(half, base + torch.tensor([0.5 ** 0.5, 0.5 ** 0.5]), atol=1e-6)
