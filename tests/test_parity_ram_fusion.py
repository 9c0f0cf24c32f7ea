"""RAM, RAM+ and Arcee Fusion: the same YAML through mergekit 0.1.5 gives the same float32 tensors (with
gradients and filters, and in chunks smaller than the tensors); closed forms by hand; mergekit's methods we
do not implement get their own message."""

from __future__ import annotations

import pytest
import torch
from helpers.models import write_spec
from test_errors import check
from test_mergekit_parity import assert_same, both

from mergekit_lite.strategies import arcee_fusion, ram, registry
from mergekit_lite.strategies.chunks import Chunks
from mergekit_lite.strategies.registry import MERGEKIT_METHODS, all_strategies, builtins
from mergekit_lite.strategy import TensorContext

STRATEGIES = {s.name: s for s in builtins()}
CTX = TensorContext("model.layers.0.mlp.up_proj.weight", 0, 0.0, 0)

RAM = """
merge_method: {method}
base_model: {root}/base
models:
  - model: {root}/ft-a
  - model: {root}/ft-b
  - model: {root}/ft-c
{parameters}
dtype: float32
"""
GRADIENTS = """parameters:
  epsilon:
    - filter: mlp
      value: [0.001, 0.004]
    - value: 0.002
  r: [0.1, 0.9]
  alpha:
    - filter: self_attn
      value: 0.6
    - value: 0.05
"""


def use_small_chunks(monkeypatch):
    """Chunks and blocks much smaller than the tensors: the passes combine several chunks, and element-wise
    RAM is merged in row blocks, each in many short blocks."""
    import mergekit_lite.engine.compute as compute
    import mergekit_lite.engine.loop as engine

    for module in (ram, arcee_fusion):
        monkeypatch.setattr(module, "CHUNK", 1000)
        monkeypatch.setattr(module, "BLOCK", 300)
    monkeypatch.setattr(engine, "PIECE_ELEMENTS", 1000)
    monkeypatch.setattr(compute, "BLOCK_ELEMENTS", 100)


@pytest.mark.parametrize("method,parameters,fixture,small", [
    ("ram", "", "models_bf16", False), ("ram", GRADIENTS, "models_f32", True),
    ("ramplus_tl", "", "models_bf16", True), ("ramplus_tl", GRADIENTS, "models_f32", False),
    ("ramplus_tl", GRADIENTS, "models_bf16", True),
])
def test_ram_bit_exact(monkeypatch, method, parameters, fixture, small, request, tmp_path):
    """bf16 inputs: many task vector entries are exactly 0 (inactive); epsilon near the delta scale (0.002)
    splits entries into unique and shared ones."""
    if small:
        use_small_chunks(monkeypatch)
    if method == "ram":
        parameters = parameters.split("  r:")[0]
    spec = RAM.format(method=method, root=request.getfixturevalue(fixture), parameters=parameters)
    assert_same(*both(spec, tmp_path))


@pytest.mark.parametrize("fixture,base_listed,small", [
    ("models_f32", False, False), ("models_bf16", False, True), ("models_f32", True, True),
])
def test_arcee_fusion_bit_exact(monkeypatch, fixture, base_listed, small, request, tmp_path):
    if small:
        use_small_chunks(monkeypatch)
    root = request.getfixturevalue(fixture)
    listed = f"  - model: {root}/base\n" if base_listed else ""
    spec = f"merge_method: arcee_fusion\nbase_model: {root}/base\nmodels:\n{listed}  - model: {root}/ft-b\n" \
           "dtype: float32\n"
    assert_same(*both(spec, tmp_path))


def test_ram_bf16_arithmetic_within_one_ulp(models_bf16, tmp_path):
    """Without dtype: float32, mergekit computes RAM in bfloat16; we compute in float32 and round once. On these
    models the results differ by at most one bfloat16 ulp at the tensor's scale (README: ramplus_tl and
    arcee_fusion differ more, since mergekit rounds lambda and the KL divergences to bfloat16)."""
    spec = RAM.format(method="ram", root=models_bf16, parameters="")
    assert_same(*both(spec.replace("dtype: float32", ""), tmp_path), max_ulp=1)


def test_ram_by_hand():
    """Three models over five entries: unique entries are added, shared ones averaged over their models."""
    base = torch.zeros(5)
    a = torch.tensor([1.0, 2.0, 0.0, 0.0, 3.0])
    b = torch.tensor([0.0, 4.0, 0.0, 0.0, -3.0])
    c = torch.tensor([0.0, 0.0, 5.0, 0.0, 6.0])
    out = STRATEGIES["ram"]([a, b, c], base, CTX, epsilon=1e-5)
    assert out.tolist() == [1.0, 3.0, 5.0, 0.0, 2.0]
    # RAM+: model a has 2 shared and 1 unique active entries: rho 2, clipped to alpha 0.5; lambda 1 + 0.2 * 0.5
    plus = STRATEGIES["ramplus_tl"]([a, b, c], base, CTX, epsilon=1e-5, r=0.2, alpha=0.5)
    lam_a = torch.tensor(1.0) + torch.tensor(0.2) * torch.tensor(0.5)   # b has no unique entry: lambda unused
    lam_c = torch.tensor(1.0) + torch.tensor(0.2) * torch.tensor(0.5)   # c: 1 shared / 1 unique -> rho 1 -> 0.5
    assert plus.tolist() == [float(1.0 * lam_a), 3.0, float(5.0 * lam_c), 0.0, 2.0]


def test_arcee_fusion_takes_only_the_outliers():
    """Row r changes by +-(r+1)e-3, so its KL grows as (r+1)^2 and its importance as (r+1)^3: 1, 8, ..., 512
    (x a constant), 16 entries each. q1 = 8, median = 64, q3 = 216: the fence 64 + 1.5 (216 - 8) = 376 lets
    only row 7 (512) through."""
    base = torch.zeros(8, 16)
    signs = torch.tensor([1.0, -1.0]).repeat(8)                       # (16,) alternating
    other = base + 1e-3 * torch.arange(1, 9.0).unsqueeze(1) * signs    # (8, 16)
    out = STRATEGIES["arcee_fusion"]([other], base, CTX)
    expected = base.clone()
    expected[7] = other[7]
    assert torch.equal(out, expected)


def test_arcee_fusion_with_a_zero_fence_takes_everything():
    """Most rows unchanged: q1 = median = q3 = 0, so the fence is 0 and every entry (importance >= 0) is the
    model's, as in mergekit."""
    base = torch.zeros(8, 16)
    other = base.clone()
    other[3, 5] = 4.0
    assert torch.equal(STRATEGIES["arcee_fusion"]([other], base, CTX), other)


def test_arcee_fusion_sampled_quantiles_above_1m_entries():
    """Above 1M entries the quantiles come from a seeded sample: the chunked passes on several threads give
    the whole-tensor bits, and the output differs from mergekit's (its own random sample) in few entries."""
    from concurrent.futures import ThreadPoolExecutor

    from mergekit.merge_methods.api import merge_tensors

    g = torch.Generator().manual_seed(3)
    base = torch.randn(1100, 1000, generator=g) * 0.02
    other = base + 0.01 * torch.randn(1100, 1000, generator=g)
    strategy = STRATEGIES["arcee_fusion"]
    out = strategy([other], base, CTX)
    chunked = torch.empty(base.numel())
    with ThreadPoolExecutor(4) as pool:
        src = Chunks([other], base, lambda start, v: chunked[start:start + v.numel()].copy_(v),
                     spread=lambda fn, items: list(pool.map(fn, items)))
        strategy.chunked(src, CTX)
    assert torch.equal(chunked.view(base.shape), out)
    torch.manual_seed(0)
    theirs = merge_tensors([base, other], "arcee_fusion", base_index=0)
    assert 0 < int((theirs != out).sum()) < 0.001 * out.numel()


@pytest.mark.parametrize("name", sorted(MERGEKIT_METHODS - set(all_strategies())) + ["future_method"])
def test_mergekit_methods_we_lack_have_their_own_message(cli, models_f32, tmp_path, monkeypatch, name):
    """Every mergekit method we have not implemented, and (by a stand-in name) one of a later mergekit."""
    monkeypatch.setattr(registry, "MERGEKIT_METHODS", MERGEKIT_METHODS | {"future_method"})
    spec = write_spec(tmp_path / "spec.yaml", f"merge_method: {name}\nbase_model: {models_f32}/base\nmodels:\n"
                                              f"  - model: {models_f32}/ft-a\n")
    result = cli("run", spec, "-o", tmp_path / "out")
    check(result, 2, f"error: {spec}: merge_method: `{name}` is a mergekit method that mergekit_lite does not "
                     f"support yet; supported: {', '.join(sorted(all_strategies()))}\n"
                     "Hint: choose a supported method, or run this spec with mergekit itself")


def test_every_mergekit_method_is_known():
    pytest.importorskip("mergekit")
    from mergekit.merge_methods.registry import registered_methods

    assert {m.spec.name for m in registered_methods()} <= MERGEKIT_METHODS


def test_an_unknown_name_still_gets_a_suggestion(cli, models_f32, tmp_path):
    spec = write_spec(tmp_path / "spec.yaml", f"merge_method: ramplus\nbase_model: {models_f32}/base\nmodels:\n"
                                              f"  - model: {models_f32}/ft-a\n")
    result = cli("run", spec, "-o", tmp_path / "out")
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {spec}: merge_method: unknown merge method 'ramplus'. Did you mean ")


def test_methods_document_their_parameters(cli):
    expected = {
        "ram": ("https://arxiv.org/abs/2601.13572", "base_model: required",
                "epsilon (float, per merge, default 1e-05, range [0, inf])"),
        "ramplus_tl": ("r (float, per merge, default 0.1, range [0, inf])",
                       "alpha (float, per merge, default 0.2, range [0, inf])",
                       "epsilon (float, per merge, default 1e-05"),
        "arcee_fusion": ("models (besides a separate base): exactly 1", "base_model: required", "parameters: none"),
    }
    listing = cli("methods").stdout
    for method, lines in expected.items():
        result = cli("methods", method)
        assert result.exit_code == 0
        for line in lines:
            assert line in result.stdout, (method, line)
        assert f"\n{method} " in "\n" + listing


@pytest.mark.parametrize("text,expected", [
    ("merge_method: ram\nmodels:\n  - model: {root}/ft-a\n  - model: {root}/ft-b\n",
     "base_model: ram needs a base_model\nHint: add base_model: <the model the others were fine-tuned from>"),
    ("merge_method: arcee_fusion\nbase_model: {root}/base\nmodels:\n  - model: {root}/ft-a\n  - model: {root}/ft-b\n",
     "models: arcee_fusion takes exactly 1 model besides the base, got 2\nHint: see `merge methods arcee_fusion`"),
    ("merge_method: ramplus_tl\nbase_model: {root}/base\nmodels:\n  - model: {root}/ft-a\nparameters: {{r: -0.5}}\n",
     ("parameters.r: r = -0.5 is outside [0, inf]\nHint: how much the overlap ratio rho raises a model's "
      "unique entries")),
], ids=["ram without a base", "arcee_fusion with two models", "negative r"])
def test_bad_specs(cli, models_f32, tmp_path, text, expected):
    spec = write_spec(tmp_path / "spec.yaml", text.format(root=models_f32))
    check(cli("run", spec, "-o", tmp_path / "out"), 2, f"error: {spec}: {expected}")
