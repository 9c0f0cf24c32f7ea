"""Merged tensors equal an independent in-memory computation, tensor by tensor, bit for bit."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.models import FINETUNES, SHAPE, read_folder, write_spec

from mergekit_lite import run_merge
from mergekit_lite.strategies.registry import get_strategy
from mergekit_lite.testing.synthetic import iter_model


def source(dtype: torch.dtype, name: str) -> dict[str, torch.Tensor]:
    """A model's tensors as stored (rounded to ``dtype``), recomputed from the synthetic generator."""
    delta_seed = FINETUNES.get(name)
    return {k: v.to(dtype) for k, v in iter_model(SHAPE, seed=0, delta_seed=delta_seed)}


def fma_weighted_sum(tensors, weights) -> torch.Tensor:
    """sum_i w_i x_i in float32 with one rounding per step (fused multiply-add), computed via float64.

    The product of two float32 numbers is exact in float64, so rounding (acc + x*w) once to float32
    is what a fused multiply-add gives.
    """
    acc = torch.zeros_like(tensors[0], dtype=torch.float32)
    for x, w in zip(tensors, weights):
        w32 = torch.tensor(w, dtype=torch.float32).double()
        acc = (acc.double() + x.double() * w32).float()
    return acc


def gradient(values, t):
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * values[i0] + frac * values[i1]


def depth(name: str) -> float:
    import re

    m = re.search(r"\.layers\.(\d+)\.", name)
    return int(m.group(1)) / (SHAPE.layers - 1) if m else 0.0


@pytest.mark.parametrize("dtype,fixture", [(torch.float32, "models_f32"), (torch.bfloat16, "models_bf16")])
def test_linear_with_gradient_and_filters(dtype, fixture, request, tmp_path):
    root = request.getfixturevalue(fixture)
    spec = f"""
merge_method: linear
models:
  - model: {root}/ft-a
    parameters: {{weight: 0.5}}
  - model: {root}/ft-b
    parameters: {{weight: [0.2, 0.8]}}
  - model: {root}/ft-c
    parameters:
      weight:
        - filter: mlp
          value: 0.3
        - value: 0.1
"""
    out = tmp_path / "out"
    result = run_merge(write_spec(tmp_path / "spec.yaml", spec), out, progress=False, max_shard_size="100kB")
    got = read_folder(out)
    models = [source(dtype, n) for n in ("ft-a", "ft-b", "ft-c")]
    assert set(got) == set(models[0])
    assert result.tensors == len(got) and result.shards > 1
    for name, tensor in got.items():
        t = depth(name)
        weights = [0.5, gradient([0.2, 0.8], t), 0.3 if "mlp" in name else 0.1]
        inputs = [m[name].float() for m in models]
        expected = fma_weighted_sum(inputs, weights) / torch.tensor(weights, dtype=torch.float32).sum()
        assert tensor.dtype == dtype
        assert torch.equal(tensor, expected.to(dtype)), name


@pytest.mark.parametrize("dtype,fixture", [(torch.float32, "models_f32"), (torch.bfloat16, "models_bf16")])
def test_task_arithmetic(dtype, fixture, request, tmp_path):
    root = request.getfixturevalue(fixture)
    spec = f"""
merge_method: task_arithmetic
base_model: {root}/base
models:
  - model: {root}/ft-a
    parameters: {{weight: 0.7}}
  - model: {root}/ft-b
    parameters: {{weight: [1.0, 0.0, 0.5]}}
parameters:
  lambda: 0.8
  normalize: true
"""
    out = tmp_path / "out"
    run_merge(write_spec(tmp_path / "spec.yaml", spec), out, progress=False)
    got = read_folder(out)
    base, a, b = (source(dtype, n) for n in ("base", "ft-a", "ft-b"))
    for name, tensor in got.items():
        weights = [0.7, gradient([1.0, 0.0, 0.5], depth(name))]
        b32 = base[name].float()
        mixed = (a[name].float() - b32) * torch.tensor(weights[0]) + (b[name].float() - b32) * torch.tensor(weights[1])
        total = torch.tensor(weights, dtype=torch.float32).sum()
        mixed = mixed / (total if total.abs() >= 1e-8 else 1) * torch.tensor(0.8)
        assert torch.equal(tensor, (b32 + mixed).to(dtype)), name


def test_dtype_and_out_dtype(models_bf16, tmp_path):
    """dtype rounds the inputs and the result; out_dtype is what is written and what config.json says."""
    spec = f"""
merge_method: linear
models:
  - model: {models_bf16}/ft-a
    parameters: {{weight: 1.0}}
  - model: {models_bf16}/ft-b
    parameters: {{weight: 3.0}}
dtype: float16
out_dtype: float32
"""
    out = tmp_path / "out"
    run_merge(write_spec(tmp_path / "spec.yaml", spec), out, progress=False)
    got = read_folder(out)
    a, b = source(torch.bfloat16, "ft-a"), source(torch.bfloat16, "ft-b")
    for name, tensor in got.items():
        inputs = [a[name].to(torch.float16).float(), b[name].to(torch.float16).float()]
        expected = (fma_weighted_sum(inputs, [1.0, 3.0]) / 4.0).to(torch.float16).to(torch.float32)
        assert tensor.dtype == torch.float32 and torch.equal(tensor, expected), name
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == "float32"


def test_merging_copies_of_one_model_returns_it(models_bf16, tmp_path):
    spec = {"merge_method": "linear", "models": [{"model": str(models_bf16 / "ft-a"), "parameters": {"weight": w}}
                                                  for w in (0.2, 0.3, 0.5)]}
    run_merge(spec, tmp_path / "out", progress=False)
    original = source(torch.bfloat16, "ft-a")
    got = read_folder(tmp_path / "out")
    assert all(torch.equal(got[k], original[k]) for k in original)


def test_shard_size_changes_files_not_bytes(models_bf16, tmp_path):
    spec = f"""
merge_method: task_arithmetic
base_model: {models_bf16}/base
models:
  - model: {models_bf16}/ft-a
    parameters: {{weight: 0.5}}
  - model: {models_bf16}/ft-c
    parameters: {{weight: 0.5}}
"""
    path = write_spec(tmp_path / "spec.yaml", spec)
    big = run_merge(path, tmp_path / "one", progress=False)
    small = run_merge(path, tmp_path / "many", progress=False, max_shard_size="30kB")
    files_one = sorted(p.name for p in (tmp_path / "one").glob("*.safetensors"))
    files_many = sorted(p.name for p in (tmp_path / "many").glob("*.safetensors"))
    assert files_one == ["model.safetensors"] and len(files_many) == small.shards > 5
    assert not (tmp_path / "one" / "model.safetensors.index.json").exists()
    one, many = read_folder(tmp_path / "one"), read_folder(tmp_path / "many")
    assert one.keys() == many.keys()
    for name in one:
        assert one[name].dtype == many[name].dtype and torch.equal(one[name].view(torch.uint8).flatten()
                                                                 if one[name].dim() else one[name],
                                                                 many[name].view(torch.uint8).flatten()
                                                                 if many[name].dim() else many[name]), name
    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == big.bytes == sum(t.numel() * t.element_size() for t in one.values())
    assert set(index["weight_map"]) == set(one)
    for name, file in index["weight_map"].items():
        assert name in read_folder_file(tmp_path / "many" / file)


def read_folder_file(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return set(f.keys())


@pytest.mark.parametrize("method", ["linear", "task_arithmetic"])
def test_row_blocks_give_the_same_bytes(models_bf16, tmp_path, monkeypatch, method):
    """Element-wise strategies merge large tensors in row blocks; the bytes must not depend on it."""
    import mergekit_lite.engine.loop as engine

    spec = {"merge_method": method, "dtype": "bfloat16",
            "models": [{"model": str(models_bf16 / n), "parameters": {"weight": w}}
                       for n, w in (("ft-a", 0.6), ("ft-b", [0.1, 0.9]))]}
    if method == "task_arithmetic":
        spec["base_model"] = str(models_bf16 / "base")
    run_merge(spec, tmp_path / "whole", progress=False)
    monkeypatch.setattr(engine, "PIECE_ELEMENTS", 1000)  # every matrix is split into several row blocks
    assert len(engine.split(_embedding_job(spec), get_strategy(method))) > 10
    run_merge(spec, tmp_path / "blocks", progress=False)
    whole, blocks = read_folder(tmp_path / "whole"), read_folder(tmp_path / "blocks")
    assert all(torch.equal(whole[k], blocks[k]) for k in whole)


def _embedding_job(spec):
    from mergekit_lite import make_plan

    merge_plan = make_plan(spec)
    try:
        return next(j for j in merge_plan.jobs if j.name == "model.embed_tokens.weight")
    finally:
        merge_plan.close()
