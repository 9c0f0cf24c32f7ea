"""Layer stacking (slices): the right source tensor lands in every output layer, and the result runs.

Expected tensors are computed here independently (source layer order written out by hand, names renumbered
with a regular expression), and models are loaded with transformers for real forward passes.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from helpers import hf_models as hf
from helpers.models import FINETUNES, SHAPE, read_folder

from mergekit_lite import run_merge
from mergekit_lite.plan.planner import make_plan
from mergekit_lite.sources.checkpoint import Checkpoint
from mergekit_lite.testing.synthetic import iter_model

FAMILIES = ["llama", "gpt2", "qwen2"]
LAYER_COUNT = {"llama": "num_hidden_layers", "qwen2": "num_hidden_layers", "gpt2": "n_layer"}


def renumber(name: str, index: int) -> str:
    return re.sub(r"\.(layers|h)\.\d+\.", lambda m: f".{m.group(1)}.{index}.", name, count=1)


def source_layer(name: str):
    found = re.search(r"\.(layers|h)\.(\d+)\.", name)
    return int(found.group(2)) if found else None


def expected_stack(source: dict[str, torch.Tensor], order: list[int]) -> dict[str, torch.Tensor]:
    """Output layer j is source layer order[j]; everything outside the layers is copied."""
    out = {name: t for name, t in source.items() if source_layer(name) is None}
    for j, i in enumerate(order):
        out.update({renumber(name, j): t for name, t in source.items() if source_layer(name) == i})
    return out


def passthrough_spec(model, ranges, extra: str = "") -> str:
    slices = "".join(f"  - sources:\n      - model: {model}\n        layer_range: [{a}, {b}]\n{extra}"
                     for a, b in ranges)
    return f"merge_method: passthrough\nslices:\n{slices}"


def logits(path, ids) -> torch.Tensor:
    with torch.no_grad():
        return hf.load(path)(ids).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_full_range_reproduces_the_model(family, hf_models, tmp_path):
    source = hf_models[f"{family}-a"]
    run_merge(passthrough_spec(source, [(0, hf.LAYERS)]), tmp_path / "out", progress=False)
    got, want = read_folder(tmp_path / "out"), read_folder(source)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    ids = hf.tokens()
    assert torch.equal(logits(tmp_path / "out", ids), logits(source, ids))


@pytest.mark.parametrize("family", FAMILIES)
def test_overlapping_ranges_load_and_run(family, hf_models, tmp_path):
    source = hf_models[f"{family}-a"]
    run_merge(passthrough_spec(source, [(0, 3), (1, 4)]), tmp_path / "out", progress=False)
    got, src = read_folder(tmp_path / "out"), read_folder(source)
    want = expected_stack(src, [0, 1, 2, 1, 2, 3])
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    original = json.loads((source / "config.json").read_text())
    assert config[LAYER_COUNT[family]] == 3 + 3
    if "layer_types" in original:
        assert config["layer_types"] == original["layer_types"][0:3] + original["layer_types"][1:4]
    model = hf.load(tmp_path / "out")
    assert model.config.num_hidden_layers == 6 and len(hf.layers(model)) == 6
    with torch.no_grad():
        out = model(hf.tokens()).logits
    assert out.shape == (2, 12, hf.VOCAB) and bool(torch.isfinite(out).all())


def test_layer_types_follow_their_layers(hf_models, tmp_path):
    """Qwen2's first two layers use full attention, the last two a sliding window: stacked, each keeps its kind."""
    source = hf_models["qwen2-a"]
    run_merge(passthrough_spec(source, [(2, 4), (0, 1), (3, 4)]), tmp_path / "out", progress=False)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["layer_types"] == ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]
    assert hf.load(tmp_path / "out").config.layer_types == config["layer_types"]


def test_zeroed_repeats_keep_the_function(hf_models, tmp_path):
    """Depth upscaling with o_proj and down_proj of the repeated layers scaled to 0: those layers add nothing to
    the residual stream, so the deeper model computes exactly what the original does."""
    source = hf_models["llama-a"]
    zero = ("        parameters:\n          scale:\n            - filter: o_proj\n              value: 0\n"
            "            - filter: down_proj\n              value: 0\n")
    spec = passthrough_spec(source, [(0, 4)]) + passthrough_spec(source, [(2, 4)], zero).split("slices:\n")[1]
    run_merge(spec, tmp_path / "out", progress=False)
    got = read_folder(tmp_path / "out")
    assert not got["model.layers.4.mlp.down_proj.weight"].any()
    assert not got["model.layers.5.self_attn.o_proj.weight"].any()
    assert got["model.layers.4.mlp.up_proj.weight"].abs().sum() > 0
    ids = hf.tokens(1)
    assert torch.equal(logits(tmp_path / "out", ids), logits(source, ids))


def test_frankenmerge_of_two_models(hf_models, tmp_path):
    a, b = hf_models["llama-a"], hf_models["llama-b"]
    spec = f"""
merge_method: passthrough
slices:
  - sources: [{{model: {a}, layer_range: [0, 3]}}]
  - sources: [{{model: {b}, layer_range: [2, 4]}}]
"""
    run_merge(spec, tmp_path / "out", progress=False)
    got, ta, tb = read_folder(tmp_path / "out"), read_folder(a), read_folder(b)
    assert torch.equal(got["model.embed_tokens.weight"], ta["model.embed_tokens.weight"])   # first slice's
    assert torch.equal(got["model.norm.weight"], tb["model.norm.weight"])                   # last slice's
    assert torch.equal(got["lm_head.weight"], tb["lm_head.weight"])
    assert torch.equal(got["model.layers.2.mlp.up_proj.weight"], ta["model.layers.2.mlp.up_proj.weight"])
    assert torch.equal(got["model.layers.3.mlp.up_proj.weight"], tb["model.layers.2.mlp.up_proj.weight"])
    assert torch.equal(got["model.layers.4.self_attn.q_proj.weight"], tb["model.layers.3.self_attn.q_proj.weight"])
    assert len(hf.layers(hf.load(tmp_path / "out"))) == 5


def gradient(values, t):
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    return (1 - (scaled - i0)) * values[i0] + (scaled - i0) * values[i1]


def test_linear_per_slice_gradients_restart(models_f32, tmp_path):
    """Two slices, each a linear merge of two models; the weight gradient restarts at each slice's first layer,
    a source's own value beats its slice's, which beats the top level."""
    spec = f"""
merge_method: linear
slices:
  - sources:
      - {{model: {models_f32}/ft-a, layer_range: [0, 3], parameters: {{weight: [1.0, 0.0]}}}}
      - {{model: {models_f32}/ft-b, layer_range: [1, 4]}}
    parameters: {{weight: 0.5}}
  - sources:
      - {{model: {models_f32}/ft-a, layer_range: [2, 4]}}
      - {{model: {models_f32}/ft-b, layer_range: [2, 4]}}
parameters:
  weight: [0.25, 0.75]
"""
    run_merge(spec, tmp_path / "out", progress=False)
    got = read_folder(tmp_path / "out")
    a = dict(iter_model(SHAPE, seed=0, delta_seed=FINETUNES["ft-a"]))
    b = dict(iter_model(SHAPE, seed=0, delta_seed=FINETUNES["ft-b"]))
    # (output layer, a's layer, b's layer, a's weight, b's weight)
    plan_rows = [(0, 0, 1, gradient([1.0, 0.0], 0.0), 0.5), (1, 1, 2, gradient([1.0, 0.0], 0.5), 0.5),
                 (2, 2, 3, gradient([1.0, 0.0], 1.0), 0.5),
                 (3, 2, 2, gradient([0.25, 0.75], 0.0), gradient([0.25, 0.75], 0.0)),
                 (4, 3, 3, gradient([0.25, 0.75], 1.0), gradient([0.25, 0.75], 1.0))]
    for out, la, lb, wa, wb in plan_rows:
        name = f"model.layers.{out}.mlp.down_proj.weight"
        want = (wa * a[renumber(name, la)] + wb * b[renumber(name, lb)]) / (wa + wb)
        assert torch.allclose(got[name], want, rtol=0, atol=1e-7), name
    # Outside the layers: t = 0 and the first (embeddings) or last (norm, head) slice's parameters.
    embed = "model.embed_tokens.weight"
    assert torch.allclose(got[embed], (1.0 * a[embed] + 0.5 * b[embed]) / 1.5, atol=1e-7)
    assert torch.allclose(got["lm_head.weight"], (a["lm_head.weight"] + b["lm_head.weight"]) / 2, atol=1e-7)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_hidden_layers"] == 5


def test_stacking_plan_reads_no_tensor(models_f32, monkeypatch):
    def refuse(self, name):
        raise AssertionError(f"read {name} while planning")

    monkeypatch.setattr(Checkpoint, "read", refuse)
    merge_plan = make_plan(passthrough_spec(f"{models_f32}/base", [(0, 4), (1, 4), (3, 4)]))
    assert len([j for j in merge_plan.jobs if j.name.endswith("q_proj.weight")]) == 4 + 3 + 1
    merge_plan.close()


def test_repeated_layers_are_separate_tensors(models_f32, tmp_path):
    """safetensors cannot share storage; every repeat is its own tensor in the index and the files."""
    run_merge(passthrough_spec(f"{models_f32}/base", [(1, 2), (1, 2), (1, 2)]), tmp_path / "out", progress=False,
              max_shard_size="40KB")
    got = read_folder(tmp_path / "out")
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(got)
    for j in range(3):
        assert torch.equal(got[f"model.layers.{j}.self_attn.q_proj.weight"],
                           got["model.layers.0.self_attn.q_proj.weight"])


def test_tied_head_comes_from_the_last_slice(hf_models, tmp_path):
    """GPT-2 ties lm_head to wte. Stacked from two models, the embeddings are the first slice's and the head the
    last slice's, so the head is written out and untied; transformers must load it so."""
    a, b = hf_models["gpt2-a"], hf_models["gpt2-b"]
    spec = f"""
merge_method: passthrough
slices:
  - sources: [{{model: {a}, layer_range: [0, 2]}}]
  - sources: [{{model: {b}, layer_range: [2, 4]}}]
"""
    run_merge(spec, tmp_path / "out", progress=False)
    model = hf.load(tmp_path / "out")
    assert torch.equal(model.transformer.wte.weight, read_folder(a)["transformer.wte.weight"])
    assert torch.equal(model.lm_head.weight, read_folder(b)["transformer.wte.weight"])
    assert torch.equal(model.transformer.ln_f.weight, read_folder(b)["transformer.ln_f.weight"])


def test_nested_layer_count(models_f32, tmp_path):
    """A config whose layer count lives under text_config (vision-language wrappers): that key and the per-layer
    list next to it are the ones updated."""
    import shutil

    model = tmp_path / "nested"
    shutil.copytree(models_f32 / "base", model)
    config = json.loads((model / "config.json").read_text())
    layers = config.pop("num_hidden_layers")
    config["text_config"] = {"num_hidden_layers": layers, "layer_types": ["a", "b", "c", "d"]}
    (model / "config.json").write_text(json.dumps(config))
    # validate=False: a Llama config with its layer count moved under text_config is not one transformers
    # loads as written (the forward check fails it); only the config's rewriting is the point here
    run_merge(passthrough_spec(model, [(0, 2), (1, 4)]), tmp_path / "out", progress=False, validate=False)
    out = json.loads((tmp_path / "out" / "config.json").read_text())
    assert out["text_config"] == {"num_hidden_layers": 5, "layer_types": ["a", "b", "b", "c", "d"]}
    assert "num_hidden_layers" not in out


@pytest.mark.parametrize("name,position", [
    ("model.embed_tokens.weight", "before"), ("transformer.wte.weight", "before"), ("transformer.wpe.weight", "before"),
    ("transformer.word_embeddings_layernorm.weight", "before"), ("gpt_neox.embed_in.weight", "before"),
    ("model.norm.weight", "after"), ("transformer.ln_f.bias", "after"), ("gpt_neox.final_layer_norm.weight", "after"),
    ("embed_out.weight", "after"), ("lm_head.weight", "after"), ("score.weight", "after"),
    ("model.rotary.inv_freq", None),
])
def test_tensors_outside_the_layers(name, position):
    from mergekit_lite.architecture import outside_position

    assert outside_position(name) == position
