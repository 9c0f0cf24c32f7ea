"""TIES, breadcrumbs, SLERP, NuSLERP and Model Stock: the same YAML through mergekit 0.1.5 gives the same
tensors (float32 bit for bit; the magnitude methods once mergekit's argsort breaks ties as a stable sort)."""

from __future__ import annotations

import pytest
import torch
from helpers.models import read_folder
from test_mergekit_parity import assert_same, both
from test_random_methods import wide_models  # noqa: F401  (fixture)
from test_sparsifiers import stable_mergekit_sort  # noqa: F401  (fixture)

pytest.importorskip("mergekit")

FAMILY = """
merge_method: {method}
base_model: {root}/base
models:
  - model: {root}/ft-a
    parameters: {{weight: 0.7, density: 0.4, gamma: 0.05}}
  - model: {root}/ft-b
    parameters:
      weight: [0.2, 0.8]
      density: [0.3, 0.9]
  - model: {root}/ft-c
    parameters:
      weight:
        - filter: mlp
          value: 0.45
        - value: -0.2
      density: 0.6
parameters:
  lambda: 0.9
  gamma: 0.02
{extra}
dtype: float32
"""


def compare(spec: str, tmp_path, max_ulp: float = 0):
    """Run the spec through both tools; every tensor equal (or within max_ulp ulps at scale). Returns ours."""
    assert_same(*both(spec, tmp_path), max_ulp=max_ulp)
    return read_folder(tmp_path / "ours")


@pytest.mark.parametrize("method,extra", [
    ("ties", ""), ("ties", "  normalize: false\n  rescale: true\n  int8_mask: true"),
    ("breadcrumbs", ""), ("breadcrumbs_ties", "  normalize: true"), ("breadcrumbs", "  rescale: true"),
])
@pytest.mark.parametrize("fixture", ["models_f32", "models_bf16"])
def test_magnitude_family_bit_exact(stable_mergekit_sort, method, extra, fixture, request, tmp_path):
    """bf16 inputs give float32 deltas with many equal magnitudes: a real test of the tie order."""
    compare(FAMILY.format(method=method, root=request.getfixturevalue(fixture), extra=extra), tmp_path)


def test_ties_against_mergekits_own_sort_differs_only_at_tied_cuts(models_f32, tmp_path):
    """Unpatched, mergekit's argsort orders equal magnitudes its own way. Every entry where we differ must
    be one where some model's |delta| equals that model's cut and the group of equals straddles the cut."""
    densities = {"ft-a": 0.5, "ft-b": 0.7, "ft-c": 0.7}   # each cuts a group of equal |delta| somewhere
    models = "".join(f"  - model: {models_f32}/{m}\n    parameters: {{weight: 0.5, density: {d}}}\n"
                     for m, d in densities.items())
    spec = f"merge_method: ties\nbase_model: {models_f32}/base\nmodels:\n{models}dtype: float32\n"
    ours, theirs = (read_folder(folder) for folder in both(spec, tmp_path))
    base = read_folder(models_f32 / "base")
    inputs = {m: read_folder(models_f32 / m) for m in densities}
    identical = 0
    for name in ours:
        differ = ours[name] != theirs[name]
        if not bool(differ.any()):
            identical += 1
            continue
        explained = torch.zeros_like(differ)
        for m, density in densities.items():
            magnitude = (inputs[m][name] - base[name]).abs()
            k = max(1, int(density * magnitude.numel()))
            cut = magnitude.flatten().sort(descending=True).values[k - 1]
            if int((magnitude > cut).sum()) < k < int((magnitude >= cut).sum()):   # the cut splits a group
                explained |= magnitude == cut
        assert bool(explained[differ].all()), name
    assert len(ours) - 3 <= identical < len(ours)   # rare in float32 deltas, but here on purpose


SLERP = """
merge_method: slerp
base_model: {root}/base
models:
  - model: {root}/base
  - model: {root}/{other}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
{dtype}
"""


@pytest.mark.parametrize("dtype", ["dtype: float32", ""])
def test_slerp_gradient_and_filters_bit_exact(models_bf16, tmp_path, dtype):
    """mergekit's slerp computes in float32 whatever the dtype, so even the bfloat16 output is identical.
    Matrices take the spherical branch; norm weights (~1 plus a tiny delta) are colinear beyond 0.9995
    and take the linear one."""
    ours = compare(SLERP.format(root=models_bf16, other="ft-a", dtype=dtype), tmp_path)
    base, other = read_folder(models_bf16 / "base"), read_folder(models_bf16 / "ft-a")
    first_attention = "model.layers.0.self_attn.q_proj.weight"   # t = 0 there: the base itself
    assert torch.equal(ours[first_attention], base[first_attention].to(ours[first_attention].dtype))
    t = torch.tensor(0.5)                                         # the fallback value, for model.norm.weight
    lerp = (1 - t) * base["model.norm.weight"].float() + t * other["model.norm.weight"].float()
    assert torch.equal(ours["model.norm.weight"], lerp.to(ours["model.norm.weight"].dtype))


NUSLERP = """
merge_method: nuslerp
{base}
models:
  - model: {root}/ft-a
    parameters:
      weight: 0.6
  - model: {root}/ft-b
    parameters:
      weight: [0.4, {w2}]
parameters:
  nuslerp_flatten: {flatten}
  nuslerp_row_wise: {row_wise}
dtype: float32
"""


@pytest.mark.parametrize("flatten", ["true", "false"])
@pytest.mark.parametrize("row_wise", ["true", "false"])
@pytest.mark.parametrize("with_base", [True, False])
def test_nuslerp_bit_exact(models_bf16, tmp_path, flatten, row_wise, with_base):
    base = f"base_model: {models_bf16}/base" if with_base else ""
    compare(NUSLERP.format(root=models_bf16, base=base, flatten=flatten, row_wise=row_wise, w2=1.2), tmp_path)


def test_nuslerp_weights_summing_to_zero(models_f32, tmp_path):
    """weights -0.6 and 0.6 at the first layer: t = 0.5 (as mergekit's test of the same case)."""
    spec = NUSLERP.format(root=models_f32, base="", flatten="true", row_wise="false", w2=1.2)
    compare(spec.replace("weight: 0.6", "weight: -0.6").replace("[0.4, 1.2]", "[0.6, 1.2]"), tmp_path)


MODEL_STOCK = """
merge_method: model_stock
base_model: {root}/base
models:
  - model: {root}/ft-a
  - model: {root}/ft-b
  - model: {root}/ft-c
parameters:
  filter_wise: {filter_wise}
dtype: float32
"""


@pytest.mark.parametrize("filter_wise", ["true", "false"])
@pytest.mark.parametrize("fixture", ["models_f32", "models_bf16"])
@pytest.mark.parametrize("models", [3, 2])
def test_model_stock_bit_exact(filter_wise, fixture, models, request, tmp_path):
    spec = MODEL_STOCK.format(root=request.getfixturevalue(fixture), filter_wise=filter_wise)
    compare(spec if models == 3 else "\n".join(line for line in spec.splitlines() if "ft-c" not in line), tmp_path)


@pytest.mark.parametrize("spec", [MODEL_STOCK.format(root="{root}", filter_wise="true"),
                                  NUSLERP.format(root="{root}", base="", flatten="false", row_wise="false", w2=1.2)],
                         ids=["model_stock", "nuslerp"])
def test_bf16_arithmetic_within_two_ulps(models_bf16, tmp_path, spec):
    """Without dtype: float32, mergekit computes model_stock and nuslerp in bfloat16; we compute in float32
    and round once. On these models the results differ by at most 2 bfloat16 ulps at the tensor's scale."""
    compare(spec.format(root=models_bf16).replace("dtype: float32", ""), tmp_path, max_ulp=2)


@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties"])
def test_radix_select_path_bit_exact(stable_mergekit_sort, wide_models, tmp_path, method):
    """Embeddings of 131072 entries take the radix-select path (the tiny models' tensors do not)."""
    spec = f"""
merge_method: {method}
base_model: {wide_models}/base
models:
  - model: {wide_models}/ft-a
    parameters: {{weight: 0.7, density: 0.35}}
  - model: {wide_models}/ft-b
    parameters: {{weight: 0.4, density: [0.6, 0.2]}}
parameters: {{gamma: 0.03}}
dtype: float32
"""
    compare(spec, tmp_path)
