"""SCE, Multi-SLERP, Karcher and NearSwap: the same YAML through mergekit 0.1.5 gives the same tensors
(float32 bit for bit), with gradients and filters on their parameters, a tied base, and nearswap in row
blocks; 1M-entry tensors equal mergekit's functions (karcher: when mergekit runs on one thread); bfloat16
arithmetic (no dtype: float32) differs by the stated bfloat16 ulps."""

from __future__ import annotations

import pytest
import torch
from helpers.models import read_folder
from test_chunked_sphere_methods import stable_mergekit_topk  # noqa: F401  (fixture)
from test_parity_methods import compare

pytest.importorskip("mergekit")

SCE = """
merge_method: sce
base_model: {root}/base
models:
  - model: {root}/ft-a
  - model: {root}/ft-b
  - model: {root}/ft-c
parameters:
  select_topk:
    - filter: mlp
      value: [0.2, 0.9, 0.5]
    - filter: self_attn
      value: 0.35
    - value: {topk}
  int8_mask: {int8}
dtype: float32
"""


@pytest.mark.parametrize("fixture,topk,int8", [("models_f32", 1.0, "false"), ("models_bf16", 1.0, "true"),
                                               ("models_bf16", 0.6, "false"), ("models_f32", 0.0, "false")])
@pytest.mark.usefixtures("stable_mergekit_topk")
def test_sce_bit_exact(fixture, topk, int8, request, tmp_path):
    """bf16 inputs give float32 task vectors with many equal variances: the top-k cut meets ties (mergekit's
    top-k made stable: ties ranked by position, as ours)."""
    compare(SCE.format(root=request.getfixturevalue(fixture), topk=topk, int8=int8), tmp_path)


MULTISLERP = """
merge_method: multislerp
{base}
models:
  - model: {root}/ft-a
    parameters:
      weight: 0.5
  - model: {root}/ft-b
    parameters:
      weight: [0.2, 0.8]
  - model: {root}/ft-c
    parameters:
      weight:
        - filter: mlp
          value: 0.45
        - value: 1.3
parameters:
  normalize_weights: {normalize}
dtype: float32
"""


@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("normalize", ["true", "false"])
def test_multislerp_bit_exact(models_bf16, tmp_path, with_base, normalize):
    base = f"base_model: {models_bf16}/base" if with_base else ""
    compare(MULTISLERP.format(root=models_bf16, base=base, normalize=normalize), tmp_path)


def test_multislerp_two_models_and_eps(models_f32, tmp_path):
    spec = f"""
merge_method: multislerp
base_model: {models_f32}/base
models:
  - model: {models_f32}/ft-a
    parameters: {{weight: 0.3}}
  - model: {models_f32}/ft-b
    parameters: {{weight: [0.9, 0.1]}}
parameters: {{eps: 1.0e-6, normalize_weights: false}}
dtype: float32
"""
    compare(spec, tmp_path)


KARCHER = """
merge_method: karcher
{base}
models:
  - model: {root}/ft-a
  - model: {root}/ft-b
  - model: {root}/ft-c
parameters:
  max_iter:
    - filter: mlp
      value: 2
    - value: {max_iter}
  tol:
    - filter: self_attn
      value: [{tol}, 1.0e-3]
    - value: {tol}
dtype: float32
"""


@pytest.mark.parametrize("max_iter,tol,with_base", [(10, 1e-5, True), (0, 1e-5, False), (25, 1e-9, False)])
def test_karcher_bit_exact(models_bf16, tmp_path, max_iter, tol, with_base):
    """A base_model is one more input (mergekit ignores the base role: it is merged with the others)."""
    base = f"base_model: {models_bf16}/base" if with_base else ""
    compare(KARCHER.format(root=models_bf16, base=base, max_iter=max_iter, tol=tol), tmp_path)


NEARSWAP = """
merge_method: nearswap
base_model: {root}/base
models:
  - model: {root}/{other}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.0005, 0.002]
    - filter: mlp
      value: [0.01, 0.0001]
    - value: 0.001
dtype: float32
"""


@pytest.mark.parametrize("fixture", ["models_f32", "models_bf16"])
def test_nearswap_bit_exact(fixture, request, tmp_path):
    root = request.getfixturevalue(fixture)
    ours = compare(NEARSWAP.format(root=root, other="ft-a"), tmp_path)
    base = read_folder(root / "base")
    first_attention = "model.layers.0.self_attn.q_proj.weight"   # t = 0 there: the base itself
    assert torch.equal(ours[first_attention], base[first_attention].float())


def test_nearswap_in_row_blocks_bit_exact(models_bf16, tmp_path, monkeypatch):
    """NearSwap is element-wise: large tensors are merged in row blocks, each in cache-sized blocks."""
    import mergekit_lite.engine.loop as engine
    from mergekit_lite.engine import compute

    monkeypatch.setattr(engine, "PIECE_ELEMENTS", 1000)   # every matrix is split into several row blocks
    monkeypatch.setattr(compute, "BLOCK_ELEMENTS", 100)   # and each block into many short ones
    compare(NEARSWAP.format(root=models_bf16, other="ft-b"), tmp_path)


@pytest.mark.parametrize("method,max_ulp", [("multislerp", 2), ("karcher", 5), ("nearswap", 1), ("sce", 16)])
def test_bf16_arithmetic_differences(models_bf16, tmp_path, method, max_ulp):
    """Without dtype: float32, mergekit computes these in bfloat16 (karcher: its norms in float32); we compute
    in float32 and round once. On these models: up to 1-5 bfloat16 ulps at the tensor's scale, and for sce
    up to 16, where a sum of task vectors near zero rounds to the other sign in bfloat16 and the election
    keeps other models' entries there."""
    spec = {"multislerp": MULTISLERP.format(root="{root}", base="base_model: {root}/base", normalize="true"),
            "karcher": KARCHER.format(root="{root}", base="", max_iter=10, tol=1e-5),
            "nearswap": NEARSWAP.format(root="{root}", other="ft-a"),
            "sce": SCE.format(root="{root}", topk=1.0, int8="false")}[method]
    compare(spec.format(root=models_bf16).replace("dtype: float32", ""), tmp_path, max_ulp=max_ulp)


@pytest.fixture(scope="module")
def large():
    """One 1024 x 1024 tensor per model: long enough for torch's threaded reductions and BLAS to split."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1024, 1024, generator=g) * 0.02
    return [base + 0.002 * torch.randn(1024, 1024, generator=g) for _ in range(3)], base


@pytest.mark.parametrize("name,theirs,ours", [
    ("sce", {"select_topk": 0.5}, {"select_topk": 0.5, "int8_mask": False}),
    ("multislerp", {"weight": [0.2, 0.3, 0.5]}, {"weight": (0.2, 0.3, 0.5), "normalize_weights": True, "eps": 1e-8}),
    ("karcher", {}, {"max_iter": 10, "tol": 1e-5}),
    ("nearswap", {"t": 0.002}, {"t": 0.002}),
])
@pytest.mark.parametrize("mergekit_threads", [1, 2])
def test_large_tensor_against_mergekits_function(large, name, theirs, ours, mergekit_threads):
    """We merge with one torch thread. mergekit's result is the same whatever its thread count, except
    karcher's: torch.dot is BLAS, whose summation order depends on the thread count for long vectors, so
    there mergekit on 2 threads differs from itself on 1 (and from us) by float32 rounding (~2e-7 relative)."""
    from mergekit.merge_methods.api import merge_tensors

    from mergekit_lite.strategies.registry import get_strategy
    from mergekit_lite.strategy import TensorContext

    models, base = large
    models = models[:1] if name == "nearswap" else models
    with_base = name != "karcher"
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(mergekit_threads)
        expected = merge_tensors(models + [base] if with_base else models, name, parameters=theirs,
                                 base_index=len(models) if with_base else None)
    finally:
        torch.set_num_threads(threads)
    torch.set_num_threads(1)
    try:
        got = get_strategy(name)(models, base if with_base else None, TensorContext("t", None, 0.0), **ours)
    finally:
        torch.set_num_threads(threads)
    if name == "karcher" and mergekit_threads > 1:
        assert float((got - expected).abs().max() / expected.abs().max()) < 1e-6
    else:
        assert torch.equal(got, expected)


@pytest.mark.parametrize("method", ["nearswap", "karcher", "multislerp", "sce"])
def test_tied_base_with_untied_finetune(models_tied, tmp_path, method):
    """A tied base (no lm_head on disk) contributes its embedding to lm_head, as in mergekit."""
    others = ["untied"] if method == "nearswap" else ["untied", "ft-a"]
    weight = "\n    parameters: {weight: 0.6}" if method == "multislerp" else ""
    models = "".join(f"  - model: {models_tied}/{name}{weight}\n" for name in others)
    params = "parameters: {t: 0.001}\n" if method == "nearswap" else ""
    spec = f"merge_method: {method}\nbase_model: {models_tied}/base\nmodels:\n{models}{params}dtype: float32\n"
    assert "lm_head.weight" in compare(spec, tmp_path)
