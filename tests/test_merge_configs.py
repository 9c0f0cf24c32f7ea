"""Every example spec in merge_configs/ runs against small local models, and its output is sound."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

from conftest import read_folder
from mergekit_lite import load_spec, run_merge
from mergekit_lite.synthetic import LlamaShape, write_demo_models

CONFIGS = sorted((Path(__file__).parent.parent / "merge_configs").glob("*.y*ml"))
SMALL = LlamaShape(hidden=64, intermediate=128, layers=4, heads=4, kv_heads=2, vocab=256)


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    """A folder laid out like the repository root after `make demo` built the models (demo/models/...)."""
    root = tmp_path_factory.mktemp("demo")
    write_demo_models(str(root / "demo" / "models"), SMALL, max_shard_size=60_000)
    return root


def test_there_are_examples():
    assert len(CONFIGS) >= 14


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_example_runs(config, demo_root, monkeypatch):
    monkeypatch.chdir(demo_root)
    out = demo_root / "out" / config.stem
    spec = load_spec(config)
    result = run_merge(config, out, progress=False, overwrite=True)
    got = read_folder(out)
    assert result.tensors == len(got) > 0
    base = read_folder(demo_root / "demo" / "models" / "base")
    assert got.keys() == base.keys()
    for name, tensor in got.items():
        assert tensor.shape == base[name].shape and bool(torch.isfinite(tensor.float()).all()), name
    # Something was merged: the result is not a verbatim copy of any single input (the base included).
    refs = [m.ref for m in spec.models or ()] + ([spec.base_model] if spec.base_model is not None else [])
    inputs = {os.path.basename(str(ref.model)) for ref in refs}
    for name in inputs:
        model = read_folder(demo_root / "demo" / "models" / name)
        assert not all(torch.equal(got[k], model[k]) for k in got), f"{config.name} copied {name}"
    assert math.isclose(result.bytes, sum(t.numel() * t.element_size() for t in got.values()))


def test_every_built_in_method_has_an_example():
    from mergekit_lite.registry import builtins

    used = {load_spec(config).merge_method for config in CONFIGS}
    assert {s.name for s in builtins()} <= used
