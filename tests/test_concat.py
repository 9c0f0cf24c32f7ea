"""Concatenation: the merged MLP (and attention) computes the weighted sum of the models', checked with
transformers forward passes on random inputs; the whole model loads and runs; the rest is the fallback's."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import hf_models as hf
from helpers.models import read_folder

from mergekit_lite import run_merge
from mergekit_lite.plan.planner import make_plan
from mergekit_lite.sources.checkpoint import Checkpoint

WEIGHTS = (0.3, 0.7)
RELATIVE = 1e-5    # float32 tolerance, relative to the output's largest magnitude (~100 ulps of rounding)


def concat_spec(a, b, weights=WEIGHTS, parameters: str = "") -> str:
    return f"""
merge_method: concat
models:
  - model: {a}
    parameters: {{weight: {weights[0]}}}
  - model: {b}
    parameters: {{weight: {weights[1]}}}
{parameters}
"""


def merged_pair(family, hf_models, tmp_path, parameters="", weights=WEIGHTS):
    spec = concat_spec(hf_models[f"{family}-a"], hf_models[f"{family}-b"], weights, parameters)
    run_merge(spec, tmp_path / "out", progress=False)
    return hf.load(hf_models[f"{family}-a"]), hf.load(hf_models[f"{family}-b"]), hf.load(tmp_path / "out")


def check_weighted_sum(what: str, got: torch.Tensor, out_a: torch.Tensor, out_b: torch.Tensor) -> None:
    """got == w_a out_a + w_b out_b within float32 rounding, while out_a and out_b differ by far more."""
    want = WEIGHTS[0] * out_a + WEIGHTS[1] * out_b
    diff, scale = float((got - want).abs().max()), float(want.abs().max())
    print(f"{what}: max abs diff {diff:.3g} (output scale {scale:.3g})")
    assert diff <= RELATIVE * scale
    assert float((out_a - out_b).abs().max()) > 1000 * RELATIVE * scale   # the models really differ


@pytest.mark.parametrize("family,attention", [("llama", True), ("qwen2", True), ("gpt2", False), ("phi3", False)])
def test_mlp_output_is_the_weighted_sum(family, attention, hf_models, tmp_path):
    a, b, merged = merged_pair(family, hf_models, tmp_path, f"parameters: {{attention: {str(attention).lower()}}}")
    x = torch.randn(3, 7, hf.HIDDEN, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for i in range(hf.LAYERS):
            check_weighted_sum(f"{family} layer {i} MLP", hf.layers(merged)[i].mlp(x), hf.layers(a)[i].mlp(x),
                               hf.layers(b)[i].mlp(x))
        out = merged(hf.tokens()).logits
    assert out.shape == (2, 12, hf.VOCAB) and bool(torch.isfinite(out).all())


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_attention_output_is_the_weighted_sum(family, hf_models, tmp_path):
    a, b, merged = merged_pair(family, hf_models, tmp_path)
    x = torch.randn(2, 9, hf.HIDDEN, generator=torch.Generator().manual_seed(1))
    positions = torch.arange(9)[None]
    mask = torch.full((9, 9), float("-inf")).triu(1)[None, None]   # causal

    def attention(model, i):
        rotary = model.model.rotary_emb(x, positions)
        return hf.layers(model)[i].self_attn(x, position_embeddings=rotary, attention_mask=mask)[0]

    with torch.no_grad():
        for i in range(hf.LAYERS):
            check_weighted_sum(f"{family} layer {i} attention", attention(merged, i), attention(a, i),
                               attention(b, i))
    config = merged.config
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (8, 4, 16)


def test_config_and_shapes(hf_models, tmp_path):
    spec = concat_spec(hf_models["llama-a"], hf_models["llama-b"], (1.0, 3.0))
    run_merge(spec, tmp_path / "out", progress=False)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["intermediate_size"], config["num_attention_heads"], config["num_key_value_heads"],
            config["head_dim"]) == (256, 8, 4, 16)
    got, ta, tb = read_folder(tmp_path / "out"), read_folder(hf_models["llama-a"]), read_folder(hf_models["llama-b"])
    up, down = "model.layers.1.mlp.up_proj.weight", "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(got[up], torch.cat([ta[up], tb[up]]))                                  # (256, 64)
    assert torch.allclose(got[down], torch.cat([0.25 * ta[down], 0.75 * tb[down]], dim=1), atol=1e-8, rtol=0)
    k = "model.layers.0.self_attn.k_proj.weight"
    assert got[k].shape == (64, 64) and torch.equal(got[k][32:], tb[k])
    norm = "model.layers.0.input_layernorm.weight"   # not widened: linear fallback, normalized weights
    assert torch.allclose(got[norm], (1.0 * ta[norm] + 3.0 * tb[norm]) / 4.0, atol=1e-7, rtol=0)
    sizes = {name: t.numel() for name, t in got.items()}
    widened = sum(n for name, n in sizes.items() if ".mlp." in name or ".self_attn." in name)
    assert widened == sum(t.numel() for name, t in ta.items() if ".mlp." in name or ".self_attn." in name) * 2


def test_fallback_task_arithmetic_with_base(hf_models, tmp_path):
    """The tensors that are not widened are merged exactly as merge_method: task_arithmetic would merge them."""
    a, b, base = hf_models["llama-a"], hf_models["llama-b"], hf_models["llama-c"]
    spec = concat_spec(a, b, (1.0, 1.0), f"base_model: {base}\nparameters:\n  fallback: task_arithmetic\n"
                                         "  lambda: 0.5\n  attention: false")
    run_merge(spec, tmp_path / "out", progress=False)
    got, ta, tb = read_folder(tmp_path / "out"), read_folder(a), read_folder(b)
    tbase = read_folder(base)
    norm = "model.norm.weight"
    want = tbase[norm] + 0.5 * ((ta[norm] - tbase[norm]) + (tb[norm] - tbase[norm]))
    assert torch.allclose(got[norm], want, atol=1e-6, rtol=0)
    q = "model.layers.2.self_attn.q_proj.weight"   # attention: false, so attention is the fallback's too
    assert torch.allclose(got[q], tbase[q] + 0.5 * ((ta[q] - tbase[q]) + (tb[q] - tbase[q])), atol=1e-6, rtol=0)


def test_concat_plan_reads_no_tensor(hf_models, monkeypatch):
    def refuse(self, name):
        raise AssertionError(f"read {name} while planning")

    monkeypatch.setattr(Checkpoint, "read", refuse)
    merge_plan = make_plan(concat_spec(hf_models["llama-a"], hf_models["llama-b"]))
    jobs = {job.name: job for job in merge_plan.jobs}
    assert jobs["model.layers.3.mlp.gate_proj.weight"].shape == (256, 64)
    assert jobs["model.layers.3.mlp.down_proj.weight"].shape == (64, 256)
    assert jobs["model.layers.3.self_attn.o_proj.weight"].shape == (64, 128)
    assert merge_plan.config["intermediate_size"] == 256
    merge_plan.close()


def test_merge_methods_explains_concat(cli):
    listing = cli("methods")
    assert listing.exit_code == 0 and "concat " in listing.stdout and "passthrough " in listing.stdout
    detail = cli("methods", "concat")
    assert detail.exit_code == 0
    assert "fallback (str, per merge, default linear" in detail.stdout and "it saves nothing" in detail.stdout
