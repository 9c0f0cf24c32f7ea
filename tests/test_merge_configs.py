"""Every example spec in merge_configs/ runs against small local models, and its output is sound.

Sound means: the tensors and the config describe the model the spec asks for (stacked layers renumbered
and counted, concatenated tensors widened and the config widened with them), every tensor is finite, the
output is not a verbatim copy of an input, and transformers loads it and runs a forward pass.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pytest
import torch
from helpers.models import read_folder

from mergekit_lite import load_spec, run_merge
from mergekit_lite.strategies.registry import MERGEKIT_PARAMETERS, all_strategies, builtins
from mergekit_lite.testing.adapters import write_demo_adapters
from mergekit_lite.testing.synthetic import LlamaShape, write_demo_models

ALL_CONFIGS = sorted((Path(__file__).parent.parent / "merge_configs").glob("*.y*ml"))
# mergekit-moe files (experts:) are run by `merge moe`: test_moe_example_runs
MOE_CONFIGS = [c for c in ALL_CONFIGS if c.read_text().startswith("#") and "\nexperts:" in c.read_text()]
# multi-stage files (several YAML documents, mergekit-multi's format): test_multistage_example_runs
MULTI_CONFIGS = [c for c in ALL_CONFIGS if "\n---" in c.read_text()]
CONFIGS = [c for c in ALL_CONFIGS if c not in MOE_CONFIGS and c not in MULTI_CONFIGS]
SMALL = LlamaShape(hidden=64, intermediate=128, layers=6, heads=4, kv_heads=2, vocab=256)
LAYER = re.compile(r"\.layers\.(\d+)\.")
# Methods of mergekit that other issues add; an example using one is skipped until it is registered.
PENDING = {"slerp", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear",
           "model_stock", "nuslerp", "multislerp", "karcher", "nearswap", "sce", "arcee_fusion", "ram", "ramplus_tl"}


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    """A folder laid out like the repository root after `make demo` built the models (demo/models/...) and
    the LoRA adapters of the base (demo/adapters/...)."""
    root = tmp_path_factory.mktemp("demo")
    write_demo_models(str(root / "demo" / "models"), SMALL, max_shard_size=60_000)
    write_demo_adapters(str(root / "demo" / "adapters"), SMALL)
    return root


def test_there_are_examples():
    assert len(CONFIGS) >= 4


def layer_of(name: str):
    found = LAYER.search(name)
    return int(found.group(1)) if found else None


def expected_names(base: dict[str, torch.Tensor], layers: int) -> set[str]:
    """The base model's tensor names with its layers 0..layers-1 (layer 0's names, renumbered)."""
    outside = {n for n in base if layer_of(n) is None}
    return outside | {LAYER.sub(f".layers.{j}.", n) for n in base if layer_of(n) == 0 for j in range(layers)}


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_example_runs(config, demo_root, monkeypatch):
    spec = load_spec(config)
    if spec.merge_method in PENDING and spec.merge_method not in all_strategies():
        pytest.skip(f"{spec.merge_method} is not registered yet")
    monkeypatch.chdir(demo_root)
    out = demo_root / "out" / config.stem
    result = run_merge(config, out, progress=False, overwrite=True)
    got = read_folder(out)
    out_config = json.loads((out / "config.json").read_text())
    assert result.tensors == len(got) > 0
    assert math.isclose(result.bytes, sum(t.numel() * t.element_size() for t in got.values()))
    assert all(bool(torch.isfinite(t.float()).all()) for t in got.values())
    models = demo_root / "demo" / "models"
    base = read_folder(models / "base")
    inputs = {os.path.basename(str(m.ref.model)) for m in spec.all_models()} | {
        os.path.basename(str(s.ref.model)) for piece in spec.all_slices() for s in piece.sources} | (
        {os.path.basename(str(spec.base_model.model))} if spec.base_model is not None else set())
    tensors = {name: read_folder(models / name) for name in inputs}

    layers = sum(s.sources[0].layer_range[1] - s.sources[0].layer_range[0] for s in spec.all_slices()) \
        if spec.all_slices() else SMALL.layers
    assert out_config["num_hidden_layers"] == layers
    assert got.keys() == expected_names(base, layers)
    if spec.merge_method == "concat":
        check_widened(spec, got, base, out_config)
    else:
        assert all(got[n].shape == base[LAYER.sub(".layers.0.", n)].shape for n in got)
    folds = any(m.ref.adapters for m in spec.models or ())
    if spec.merge_method == "passthrough" and not folds:
        # Every tensor is some input tensor of the same kind, or a zeroed one (scale: 0).
        for name, tensor in got.items():
            found = LAYER.search(name)
            pattern = re.escape(name) if found is None else \
                re.escape(name[:found.start(1)]) + r"\d+" + re.escape(name[found.end(1):])
            candidates = [t for model in tensors.values() for n, t in model.items() if re.fullmatch(pattern, n)]
            assert not tensor.any() or any(torch.equal(tensor, c) for c in candidates), name
    elif spec.all_models():   # models: or modules:
        for name in inputs:   # something was merged: the result is not a verbatim copy of an input
            assert not all(got[k].shape == tensors[name][k].shape and torch.equal(got[k], tensors[name][k])
                           for k in got), f"{config.name} copied {name}"
    run_forward_pass(out, out_config)


def check_widened(spec, got, base, out_config):
    """Concat: widened tensors are the models' joined along one axis; the config says so."""
    count = len([m for m in spec.models if m.ref != spec.base_model])
    attention = spec.parameters["attention"].raw if "attention" in spec.parameters else True
    assert out_config["intermediate_size"] == count * SMALL.intermediate
    assert out_config["num_attention_heads"] == (count if attention else 1) * SMALL.heads
    for name, tensor in got.items():
        want = base[LAYER.sub(".layers.0.", name)].shape
        widened = ".mlp." in name or (attention and ".self_attn." in name)
        if not widened:
            assert tensor.shape == want, name
        else:
            diffs = [(a, b) for a, b in zip(tensor.shape, want) if a != b]
            assert diffs == [(count * diffs[0][1], diffs[0][1])], name


def run_forward_pass(out: Path, out_config: dict):
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert model.config.num_hidden_layers == out_config["num_hidden_layers"]
    with torch.no_grad():
        logits = model(torch.arange(10)[None] % SMALL.vocab).logits
    assert logits.shape == (1, 10, SMALL.vocab) and bool(torch.isfinite(logits).all())


def test_examples_use_known_parameters():
    """Parameters in the examples are all declared somewhere (a typo would only show as a warning otherwise)."""
    known = set(MERGEKIT_PARAMETERS) | {p.name for s in all_strategies().values() for p in s.params}
    for config in CONFIGS:
        spec = load_spec(config)
        levels = [spec.parameters] + [m.parameters for m in spec.all_models()] + [
            m.parameters for m in spec.modules or ()] + [
            p for piece in spec.all_slices() for p in [piece.parameters, *[s.parameters for s in piece.sources]]]
        assert {name for level in levels for name in level} <= known, config.name


def test_identity_upscaling_keeps_the_logits(demo_root, monkeypatch):
    """depth_upscaling_identity.yaml promises the deeper model computes what the original does."""
    transformers = pytest.importorskip("transformers")
    monkeypatch.chdir(demo_root)
    config = next(c for c in CONFIGS if c.stem == "depth_upscaling_identity")
    run_merge(config, demo_root / "identity", progress=False, overwrite=True)
    ids = torch.arange(12)[None] * 7 % SMALL.vocab
    with torch.no_grad():
        deeper, original = (transformers.AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval()(ids).logits
                            for p in (demo_root / "identity", demo_root / "demo" / "models" / "base"))
    assert torch.equal(deeper, original)


def test_every_built_in_method_has_an_example():
    used = {load_spec(config).merge_method for config in CONFIGS}
    assert {s.name for s in builtins()} <= used


@pytest.mark.parametrize("config", MOE_CONFIGS, ids=[c.name for c in MOE_CONFIGS])
def test_moe_example_runs(config, demo_root, monkeypatch):
    """A MoE example: every expert's MLPs stacked in the output, and the model runs."""
    from mergekit_lite.api.moe import run_moe

    monkeypatch.chdir(demo_root)
    out = demo_root / "out" / config.stem
    result = run_moe(config, out, progress=False, overwrite=True)
    got = read_folder(out)
    assert result.tensors == len(got) and result.validation.failed is False
    experts = [read_folder(demo_root / "demo" / "models" / name) for name in ("ft-a", "ft-b", "ft-c")]
    fused = got["model.layers.1.mlp.experts.gate_up_proj"]
    for i, expert in enumerate(experts):
        gate_up = torch.cat([expert["model.layers.1.mlp.gate_proj.weight"], expert["model.layers.1.mlp.up_proj.weight"]])
        assert torch.equal(fused[i], gate_up.to(fused.dtype))
    run_forward_pass(out, json.loads((out / "config.json").read_text()))


@pytest.mark.parametrize("config", MULTI_CONFIGS, ids=[c.name for c in MULTI_CONFIGS])
def test_multistage_example_runs(config, demo_root, monkeypatch):
    """A multi-stage example: every named stage is a complete model in OUT.stages, the final one in OUT, each
    a real merge (not a copy of an input), finite, and the final model runs."""
    from mergekit_lite.spec.stages import read_stages

    monkeypatch.chdir(demo_root)
    stages = read_stages(config.read_text(), str(config))
    out = demo_root / "out" / config.stem
    result = run_merge(config, out, progress=False, overwrite=True)
    assert len(result.stages) == len(stages) and all("Merged" in line for line in result.stages)
    inputs = [read_folder(demo_root / "demo" / "models" / name) for name in ("base", "ft-a", "ft-b", "ft-c")]
    for folder in [out.parent / f"{config.stem}.stages" / s.name for s in stages[:-1]] + [out]:
        got = read_folder(folder)
        assert got.keys() == inputs[0].keys() and all(bool(torch.isfinite(t.float()).all()) for t in got.values())
        assert not any(all(torch.equal(got[k], model[k]) for k in got) for model in inputs), folder
    run_forward_pass(out, json.loads((out / "config.json").read_text()))
