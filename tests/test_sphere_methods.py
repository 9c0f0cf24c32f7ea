"""SCE, Multi-SLERP, Karcher and NearSwap against closed forms computed by hand (the contract suite in
test_strategies.py covers them with every other method; test_parity_sphere_methods.py compares with mergekit)."""

from __future__ import annotations

import math

import pytest
import torch
from test_strategies import STRATEGIES, call

from mergekit_lite.errors import StrategyError
from mergekit_lite.strategies.multislerp import normalize_weights_check


def test_nearswap_by_hand():
    base = torch.tensor([0.0, 0.0, 0.0, 1.0])
    other = torch.tensor([0.5, 2.0, -4.0, 1.0])
    # t = 1: w = clamp(1 / |diff|) = [1, 0.5, 0.25, 1 (diff 0, clamped to 1e-6)]
    out = call(STRATEGIES["nearswap"], [other], base, t=1.0)
    assert out.tolist() == [0.5, 1.0, -1.0, 1.0]
    assert torch.equal(call(STRATEGIES["nearswap"], [other], base, t=0.0), base)
    assert torch.equal(call(STRATEGIES["nearswap"], [other], base, t=10.0), other)


def test_sce_by_hand():
    """Weights are each model's mean squared task vector share: 2 and 11/3 -> 6/17 and 11/17."""
    base = torch.zeros(3)
    a, b = torch.tensor([1.0, 2.0, -1.0]), torch.tensor([1.0, -1.0, -3.0])
    out = call(STRATEGIES["sce"], [a, b], base)
    # entry 0: both +; entry 1: sum +1 elects +, only a; entry 2: both -, weighted average
    expected = torch.tensor([1.0, 2.0, -(6 * 1 + 11 * 3) / 17])
    assert torch.allclose(out, expected, rtol=0, atol=1e-6)
    one = call(STRATEGIES["sce"], [a], base + 1)
    assert torch.equal(one, a)   # one model: base + its task vector


def test_sce_select_topk_keeps_the_most_varying_entries():
    base = torch.zeros(4)
    a = torch.tensor([1.0, 1.0, 3.0, 0.5])
    b = torch.tensor([1.0, -1.0, -3.0, 0.4])   # variances 0, 1, 9, 0.0025: 3 nonzero, top int(3 * 0.7) = 2
    out = call(STRATEGIES["sce"], [a, b], base, select_topk=0.7)
    assert out[0] == 0 and out[3] == 0 and out[1] != 0 and out[2] != 0
    assert torch.equal(call(STRATEGIES["sce"], [a, b], base + 2, select_topk=0.0), base + 2)
    # copies of one model vary nowhere: nothing is selected, the result is the base (as in mergekit)
    assert torch.equal(call(STRATEGIES["sce"], [a, a.clone()], base, select_topk=0.5), base)


def test_multislerp_and_karcher_of_two_orthogonal_vectors_is_the_midpoint():
    a, b = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 4.0])
    midpoint = torch.tensor([1.0, 1.0]) / math.sqrt(2)
    karcher = call(STRATEGIES["karcher"], [a, b], None)
    assert torch.allclose(karcher, 3 * midpoint, atol=1e-6)          # mean norm 3
    multislerp = call(STRATEGIES["multislerp"], [a, b], None, weight=(0.5, 0.5))
    assert torch.allclose(multislerp, 3 * midpoint, atol=1e-6)
    with_base = call(STRATEGIES["multislerp"], [a + 1, b + 1], torch.ones(2), weight=(1.0, 1.0))
    assert torch.allclose(with_base, 1 + 3 * midpoint, atol=1e-6)   # normalized weights, task vectors


def test_karcher_of_three_directions():
    """Unit vectors along x, y and z: the mean direction is the diagonal (by symmetry)."""
    units = [torch.eye(3)[i] for i in range(3)]
    out = call(STRATEGIES["karcher"], units, None, max_iter=50, tol=1e-7)
    assert torch.allclose(out, torch.ones(3) / math.sqrt(3), atol=1e-6)
    zero = call(STRATEGIES["karcher"], [torch.zeros(3), torch.zeros(3)], None)
    assert torch.equal(zero, torch.zeros(3))


def test_one_model_is_returned_as_it_is():
    x = torch.tensor([0.3, -0.2])
    assert torch.equal(call(STRATEGIES["multislerp"], [x], torch.zeros(2), weight=0.3), x)
    assert torch.equal(call(STRATEGIES["karcher"], [x], None), x)


def test_multislerp_cancelling_models():
    """Three task vectors that are all zero give the base (mergekit raises); three that cancel are an error."""
    base = torch.tensor([1.0, 2.0])
    out = call(STRATEGIES["multislerp"], [base.clone() for _ in range(3)], base, weight=(0.2, 0.3, 0.5))
    assert torch.equal(out, base)
    a = torch.tensor([1.0, 0.0])
    with pytest.raises(StrategyError, match="weighted mean direction of the 3 models is zero"):
        call(STRATEGIES["multislerp"], [a, -a, a], None, weight=(0.5, 1.0, 0.5))
    two = call(STRATEGIES["multislerp"], [a, -a], None, weight=(0.5, 0.5))   # two: linear fallback
    assert torch.equal(two, torch.zeros(2))


def test_multislerp_weights_summing_to_zero_are_refused():
    problem = normalize_weights_check({"weight": (0.5, -0.5), "normalize_weights": True})
    assert problem is not None and problem.blame == ("weight", "normalize_weights")
    assert normalize_weights_check({"weight": (0.5, -0.5), "normalize_weights": False}) is None


def test_multislerp_zero_weight_sum_is_a_spec_error_before_the_merge(models_f32):
    from mergekit_lite import make_plan
    from mergekit_lite.errors import SpecError

    spec = {"merge_method": "multislerp", "base_model": str(models_f32 / "base"),
            "models": [{"model": str(models_f32 / "ft-a"), "parameters": {"weight": 0.5}},
                       {"model": str(models_f32 / "ft-b"), "parameters": {"weight": -0.5}}]}
    with pytest.raises(SpecError, match="normalize_weights cannot divide") as caught:
        make_plan(spec)
    assert caught.value.exit_code == 2 and "models[0].parameters.weight" in str(caught.value)
