"""Karcher on 1M-entry tensors, the whole YAML run through mergekit 0.1.5 in-process (dtype: float32): bit for
bit when mergekit runs on one torch thread; on its default thread count within float32 rounding of it.

At this size the iteration does not converge to the default tol: the length of the tangent, a sum over 1M
float32 products, has a rounding floor (~2.2e-5 on these models) above tol = 1e-5, so mergekit and we run all
max_iter steps on the long tensors (and stop early on the short ones: the layers' matrices stop after 4).
Each extra step moves the result by at most ~1.5e-8, so where the stop falls cannot make a large difference;
what torch's threads change is the rounding of the dot products (BLAS splits long vectors over threads)."""

from __future__ import annotations

import pytest
import torch
from helpers.mergekit_oracle import run_mergekit
from helpers.models import read_folder

from mergekit_lite.api.merge import run_merge

pytest.importorskip("mergekit")

# 8192 x 128: tied embeddings of 1,048,576 entries; one small layer.
SHAPE = dict(hidden=128, intermediate=128, layers=1, heads=4, kv_heads=2, vocab=8192, tied=True)


@pytest.fixture(scope="module")
def large_models(tmp_path_factory):
    from mergekit_lite.testing.synthetic import LlamaShape, write_model

    root = tmp_path_factory.mktemp("karcher_large")
    for name, delta_seed in (("base", None), ("ft-a", 1), ("ft-b", 2)):
        write_model(str(root / name), LlamaShape(**SHAPE), dtype=torch.bfloat16, seed=0, delta_seed=delta_seed,
                    delta_scale=0.02, max_shard_size=1_500_000)
    return root


def _mergekit(spec: str, out, threads: int) -> dict[str, torch.Tensor]:
    """mergekit's run on ``threads`` torch threads (what its `-j` sets), the setting restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return read_folder(run_mergekit(spec, out))
    finally:
        torch.set_num_threads(before)


def test_karcher_large_tensors_against_mergekits_yaml_run(large_models, tmp_path):
    root = large_models
    spec = (f"merge_method: karcher\nbase_model: {root}/base\nmodels:\n  - model: {root}/ft-a\n"
            f"  - model: {root}/ft-b\ndtype: float32\n")
    run_merge(spec, tmp_path / "ours", progress=False, validate=False, max_shard_size=1_500_000)
    ours = read_folder(tmp_path / "ours")
    one = _mergekit(spec, tmp_path / "mergekit-1", threads=1)
    assert sorted(ours) == sorted(one) and ours["model.embed_tokens.weight"].numel() == 1 << 20
    for name in ours:
        assert ours[name].dtype == one[name].dtype == torch.float32, name
        assert torch.equal(ours[name], one[name]), name
    two = _mergekit(spec, tmp_path / "mergekit-2", threads=2)
    for name in ours:   # measured: up to 2.3e-7 of the tensor's largest value (3e-8 absolute at 0.13)
        scale = float(two[name].abs().max())
        assert float((ours[name] - two[name]).abs().max()) <= 5e-7 * scale, name


def test_long_tensors_run_every_iteration_short_ones_stop(large_models):
    """The regime the test above covers: on the 1M-entry embedding the 10th step still moves the result (the
    tangent never gets shorter than tol), by about one float32 ulp of its scale; on a 16K-entry matrix the loop
    has stopped."""
    from mergekit_lite.strategies.registry import get_strategy
    from mergekit_lite.strategy import TensorContext

    karcher = get_strategy("karcher")
    folders = [read_folder(large_models / name) for name in ("ft-a", "ft-b", "base")]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, still_moving in (("model.embed_tokens.weight", True), ("model.layers.0.mlp.up_proj.weight", False)):
            inputs = [folder[name].float() for folder in folders]
            ten, nine = (karcher(inputs, None, TensorContext(name, None, 0.0), max_iter=steps, tol=1e-5)
                         for steps in (10, 9))
            moved = float((ten - nine).abs().max())
            assert (moved > 0) == still_moving and moved <= 2.5e-7 * float(ten.abs().max()), (name, moved)
    finally:
        torch.set_num_threads(threads)
