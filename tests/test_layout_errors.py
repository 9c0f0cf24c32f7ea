"""Stacking and concatenation errors: one exact message with its YAML path, the right exit code, and no tensor
data read (everything is found from the headers and configs)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from mergekit_lite.sources.checkpoint import Checkpoint

CONCAT_OFF = ("Hint: set attention: false in parameters to widen only the MLPs "
              "(attention is then merged by the fallback)")


@pytest.fixture
def no_reads(monkeypatch):
    """Records every tensor read; the errors below must come before the first one."""
    reads: list[str] = []
    original = Checkpoint.read

    def recording(self, name):
        reads.append(name)
        return original(self, name)

    monkeypatch.setattr(Checkpoint, "read", recording)
    yield reads
    assert reads == []


def check(cli, tmp_path, text: str, code: int, expected: str, file=None):
    """``file``: the file the error names (a model folder for model errors; the spec by default)."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(text)
    result = cli("run", spec, "-o", tmp_path / "out")
    assert result.exit_code == code, result.output
    assert result.stderr == f"error: {file or spec}: " + expected + "\n"
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def one_slice(*sources: tuple[str, int, int], method: str = "passthrough", extra: str = "") -> str:
    listed = "".join(f"      - model: {m}\n        layer_range: [{a}, {b}]\n" for m, a, b in sources)
    return f"merge_method: {method}\n{extra}slices:\n  - sources:\n{listed}"


def concat(a, b, extra: str = "") -> str:
    return (f"merge_method: concat\nmodels:\n  - model: {a}\n    parameters: {{weight: 1}}\n"
            f"  - model: {b}\n    parameters: {{weight: 1}}\n{extra}")


def test_layer_range_beyond_the_model(cli, models_f32, tmp_path, no_reads):
    check(cli, tmp_path, one_slice((f"{models_f32}/base", 2, 9)), 2,
          f"slices[0].sources[0].layer_range: [2, 9) goes beyond the 4 layers of {models_f32}/base\n"
          "Hint: its layers are 0..3; ranges are half-open, so [0, 4) is all of them")


def test_sources_of_different_lengths(cli, models_f32, tmp_path, no_reads):
    check(cli, tmp_path, one_slice((f"{models_f32}/ft-a", 0, 4), (f"{models_f32}/ft-b", 1, 3), method="linear"), 2,
          "slices[0].sources[1].layer_range: 2 layers, but sources[0] of this slice has 4\n"
          "Hint: the sources of a slice are merged layer by layer, so their ranges must have the same length; "
          "put layers taken as they are in a slice of their own")


@pytest.mark.parametrize("start,end", [(2, 2), (3, 1)])
def test_empty_range(cli, models_f32, tmp_path, no_reads, start, end):
    check(cli, tmp_path, one_slice((f"{models_f32}/base", start, end)), 2,
          f"slices[0].sources[0].layer_range: layer_range [{start}, {end}) is empty or negative\n"
          "Hint: write [start, end) with 0 <= start < end; ranges are half-open")


def test_passthrough_takes_one_source(cli, models_f32, tmp_path, no_reads):
    check(cli, tmp_path, one_slice((f"{models_f32}/ft-a", 0, 2), (f"{models_f32}/ft-b", 0, 2)), 2,
          "slices[0].sources: passthrough takes exactly 1 model, got 2\nHint: see `merge methods passthrough`")


def test_slice_base_must_be_a_source(cli, models_f32, tmp_path, no_reads):
    text = one_slice((f"{models_f32}/ft-a", 0, 2), method="task_arithmetic",
                     extra=f"base_model: {models_f32}/base\nparameters: {{weight: 1}}\n")
    check(cli, tmp_path, text, 2,
          f"slices[0].sources: the base model {models_f32}/base is not among this slice's sources\n"
          "Hint: task_arithmetic merges each slice's sources onto its base: list the base once among the sources, "
          "with a layer_range of the same length")


def write_odd_model(folder, extra: dict[str, tuple[int, ...]]):
    """A two-layer model whose tensors are named as given, besides a normal Llama layout."""
    names = {"model.embed_tokens.weight": (8, 4), "model.norm.weight": (4,), "lm_head.weight": (8, 4),
             **{f"model.layers.{i}.mlp.up_proj.weight": (6, 4) for i in range(2)}, **extra}
    folder.mkdir()
    save_file({n: torch.zeros(s) for n, s in names.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2}))
    return folder


def test_a_tensor_that_cannot_be_placed(cli, tmp_path, no_reads):
    odd = write_odd_model(tmp_path / "odd", {"model.rotary.inv_freq": (2,)})
    check(cli, tmp_path, one_slice((odd, 0, 2)), 1, file=odd, expected=
          "slices[0].sources[0].model: cannot place tensor 'model.rotary.inv_freq' when stacking layers: it "
          "is not in a numbered layer (.layers.N., .h.N., .layer.N. or .blocks.N.) nor a known embedding, final norm "
          "or head\nHint: slices need models whose layers are numbered in their tensor names; merge this model "
          "whole with models: instead")


def test_two_stacks_of_layers(cli, tmp_path, no_reads):
    odd = write_odd_model(tmp_path / "odd", {"model.vision.blocks.0.proj.weight": (4, 4)})
    check(cli, tmp_path, one_slice((odd, 0, 2)), 1, file=odd, expected=
          "slices[0].sources[0].model: has two stacks of layers ('model.layers.0.mlp.up_proj.weight' and "
          "'model.vision.blocks.0.proj.weight'), so a layer number is ambiguous\n"
          "Hint: slices work on models with one stack of layers (decoder-only language models)")


def test_concat_of_different_hidden_sizes(cli, hf_models, tmp_path, no_reads):
    check(cli, tmp_path, concat(hf_models["llama-a"], hf_models["llama-wide-a"]), 2,
          f"models[1]: hidden size 96 (hidden_size) differs from 64 in models[0] ({hf_models['llama-a']})\n"
          "Hint: concat joins the models' layers side by side, so every model must have the same hidden size")


def test_concat_attention_blocked_by_head_ratio(cli, hf_models, tmp_path, no_reads):
    check(cli, tmp_path, concat(hf_models["llama-a"], hf_models["llama-mha-a"]), 2,
          "models[1]: attention cannot be widened by heads: num_key_value_heads: 4 query heads share 4 key/value "
          "heads here, but 4 share 2 in models[0], so joined heads would pair queries with the wrong keys\n"
          + CONCAT_OFF)


def test_concat_attention_blocked_by_gpt2_head_size(cli, hf_models, tmp_path, no_reads):
    check(cli, tmp_path, concat(hf_models["gpt2-a"], hf_models["gpt2-b"]), 2,
          "models[0]: attention cannot be widened by heads: n_head (gpt2 has no head_dim in config.json, so its "
          "heads are n_embd / n_head wide and more heads would make them narrower)\n" + CONCAT_OFF)


def test_concat_attention_blocked_by_fused_qkv(cli, hf_models, tmp_path, no_reads):
    check(cli, tmp_path, concat(hf_models["phi3-a"], hf_models["phi3-b"]), 2,
          "models[0]: attention cannot be widened by heads: concat does not know how to join tensor "
          "'model.layers.0.self_attn.qkv_proj.weight'\n" + CONCAT_OFF)


def test_concat_unknown_fallback(cli, hf_models, tmp_path, no_reads):
    result_text = concat(hf_models["llama-a"], hf_models["llama-b"], "parameters: {fallback: lineer}\n")
    spec = tmp_path / "spec.yaml"
    spec.write_text(result_text)
    result = cli("run", spec, "-o", tmp_path / "out")
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {spec}: parameters.fallback: unknown merge method 'lineer'. "
                                    "Did you mean 'linear'?\nHint: `merge methods` lists the methods: ")


def test_concat_settings_are_one_value(cli, hf_models, tmp_path, no_reads):
    check(cli, tmp_path, concat(hf_models["llama-a"], hf_models["llama-b"], "parameters: {attention: [true, false]}\n"),
          2, "parameters.attention: attention must be one value for the whole merge (not a gradient or a filter "
             "list)\nHint: the output config has one head count and one MLP width for all layers")


def test_concat_fallback_parameters_are_checked(cli, hf_models, tmp_path, no_reads):
    text = concat(hf_models["llama-a"], hf_models["llama-b"], "parameters: {fallback: task_arithmetic, lamda: 1}\n")
    check(cli, tmp_path, text, 2,
          "parameters.lamda: unknown parameter. Did you mean 'lambda'?\n"
          "Hint: concat and task_arithmetic take: weight, normalize, attention, fallback, lambda")


def test_concat_with_slices(cli, models_f32, tmp_path, no_reads):
    check(cli, tmp_path, one_slice((f"{models_f32}/base", 0, 2), method="concat"), 2,
          "slices: concat merges whole models; it cannot be used with slices\n"
          "Hint: list the models under models:, or stack the concatenated model in a second merge")


def test_layers_of_different_kinds_in_one_slice(cli, hf_models, tmp_path, no_reads):
    """Qwen2's layers 0-1 use full attention and 2-3 a sliding window: merging one kind with the other has no
    layer_types entry that describes the result."""
    a, b = hf_models["qwen2-a"], hf_models["qwen2-b"]
    text = one_slice((a, 0, 2), (b, 2, 4), method="linear", extra="parameters: {weight: 1}\n")
    check(cli, tmp_path, text, 1, file=b, expected=
          "slices[0].sources[1]: config.json's layer_types for layers 2..3 is ['sliding_attention', "
          "'sliding_attention'], but the slice's other source has ['full_attention', 'full_attention']\n"
          "Hint: merge layers of the same kind (e.g. full with full attention)")
