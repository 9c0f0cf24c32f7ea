"""DARE and DELLA end to end: seeded per tensor from --seed and the tensor name, so the bytes do not depend
on the run, the thread count or the shard size; another seed gives another draw. Methods that need the
whole tensor are never merged in row blocks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.models import read_folder

from mergekit_lite import run_merge
from mergekit_lite.strategies.registry import get_strategy
from mergekit_lite.strategy import TensorContext
from mergekit_lite.testing.synthetic import LlamaShape, write_model

# Embeddings of 2048 x 64 = 131072 entries: large enough for torch to split one reduction across threads.
WIDE = LlamaShape(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=2048)


@pytest.fixture(scope="module")
def wide_models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("wide")
    for name, delta_seed in (("base", None), ("ft-a", 1), ("ft-b", 2)):
        write_model(str(root / name), WIDE, seed=0, delta_seed=delta_seed, max_shard_size=400_000)
    return root


def spec(root: Path, method: str) -> str:
    return f"""
merge_method: {method}
base_model: {root}/base
models:
  - model: {root}/ft-a
    parameters: {{weight: 0.6, density: 0.4}}
  - model: {root}/ft-b
    parameters: {{weight: 0.5, density: [0.3, 0.7]}}
parameters: {{epsilon: 0.1}}
"""


def as_bytes(folder: Path) -> dict[str, bytes]:
    return {name: t.contiguous().view(torch.uint8).numpy().tobytes() for name, t in read_folder(folder).items()}


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties", "della", "della_linear"])
def test_same_bytes_across_runs_threads_and_shard_sizes(wide_models, tmp_path, method):
    text = spec(wide_models, method)
    threads = torch.get_num_threads()
    outputs = []
    try:
        for i, (count, shard) in enumerate([(1, "5GB"), (2, "100kB"), (1, "37kB")]):
            torch.set_num_threads(count)
            run_merge(text, tmp_path / f"out{i}", progress=False, max_shard_size=shard, seed=7)
            outputs.append(as_bytes(tmp_path / f"out{i}"))
    finally:
        torch.set_num_threads(threads)
    assert len(list((tmp_path / "out1").glob("*.safetensors"))) > 3
    assert all(o == outputs[0] for o in outputs[1:])

    # The bytes are the strategy's on each tensor alone, seeded by (seed, tensor name) and nothing else.
    strategy = get_strategy(method)
    base, a, b = (read_folder(wide_models / n) for n in ("base", "ft-a", "ft-b"))
    name = "model.embed_tokens.weight"
    params = {p.name: p.default for p in strategy.params if not p.required}
    params.update(weight=(0.6, 0.5), density=(0.4, 0.3))
    if "epsilon" in params:
        params["epsilon"] = (0.1, 0.1)
    alone = strategy([a[name], b[name]], base[name], TensorContext(name, None, 0.0, 7), **params)
    assert outputs[0][name] == alone.contiguous().view(torch.uint8).numpy().tobytes()

    run_merge(text, tmp_path / "other_seed", progress=False, seed=8)
    other = as_bytes(tmp_path / "other_seed")
    assert all(other[n] != outputs[0][n] for n in other if n.endswith("proj.weight"))


@pytest.mark.parametrize("method", ["ties", "dare_ties", "breadcrumbs", "della_linear", "slerp", "model_stock"])
def test_whole_tensor_methods_are_never_split_into_row_blocks(wide_models, tmp_path, monkeypatch, method):
    """Pruning, norms and random streams see the whole tensor: tiny row blocks must not change a byte."""
    import mergekit_lite.engine.loop as engine

    text = {
        "slerp": f"merge_method: slerp\nbase_model: {wide_models}/base\nmodels:\n  - model: {wide_models}/ft-a\n"
                 "parameters: {t: 0.4}\n",
        "model_stock": f"merge_method: model_stock\nbase_model: {wide_models}/base\nmodels:\n"
                       f"  - model: {wide_models}/ft-a\n  - model: {wide_models}/ft-b\n",
    }.get(method) or spec(wide_models, method)
    run_merge(text, tmp_path / "whole", progress=False)
    monkeypatch.setattr(engine, "PIECE_ELEMENTS", 1000)
    run_merge(text, tmp_path / "blocks", progress=False)
    assert as_bytes(tmp_path / "whole") == as_bytes(tmp_path / "blocks")
