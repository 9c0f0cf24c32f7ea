"""Per-module slices (``modules: {NAME: {slices: [...]}}``): layers stacked inside one module of a VLM while the
other modules are merged whole, as mergekit 0.1.5 does (same YAML, float32 bit for bit, and the module's layer
count in config.json); the output validates (structure and forward)."""

from __future__ import annotations

import json
import re

import pytest
import torch
from helpers.mergekit_oracle import run_mergekit
from helpers.models import read_folder

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def vlms(tmp_path_factory):
    from helpers.vlm_models import write_llava, write_mistral3

    root = tmp_path_factory.mktemp("vlms")
    for name, seed in (("a", 1), ("b", 2), ("base", 3)):
        write_llava(root / name, seed)
    for name, seed in (("mistral3-base", 0), ("mistral3-a", 1), ("mistral3-b", 2)):
        write_mistral3(root / name, seed)
    return root


# LLaVA (modules as mergekit infers them): the text model gets 3 layers (a's 0-1, then b's 1), a gradient over
# the first slice; the vision tower and the rest are merged whole.
INFERRED = """
merge_method: linear
modules:
  model.language_model.layers:
    slices:
      - sources:
          - model: {root}/a
            layer_range: [0, 2]
            parameters: {{weight: [0.2, 0.9]}}
          - model: {root}/b
            layer_range: [0, 2]
      - sources:
          - model: {root}/b
            layer_range: [1, 2]
    parameters: {{weight: 0.4}}
  model.vision_tower.encoder.layers:
    models:
      - model: {root}/a
      - model: {root}/base
  default:
    models:
      - model: {root}/b
      - model: {root}/base
parameters: {{weight: 0.5}}
dtype: float32
"""
# Mistral3 (mergekit's architecture file: text_decoder, vision_tower, multi_modal_projector): the text decoder
# gets 4 layers, each slice merged onto the base; its final norm and lm_head come from the last slice.
NAMED = """
merge_method: task_arithmetic
base_model: {root}/mistral3-base
modules:
  text_decoder:
    slices:
      - sources:
          - model: {root}/mistral3-a
            layer_range: [0, 2]
          - model: {root}/mistral3-base
            layer_range: [0, 2]
      - sources:
          - model: {root}/mistral3-b
            layer_range: [0, 2]
            parameters: {{weight: 0.3}}
          - model: {root}/mistral3-base
            layer_range: [0, 2]
    parameters: {{weight: 0.7}}
  vision_tower:
    models:
      - model: {root}/mistral3-b
  multi_modal_projector:
    models:
      - model: {root}/mistral3-a
parameters: {{weight: 0.5}}
dtype: float32
"""


def _run(cli, tmp_path, text):
    spec = tmp_path / "spec.yaml"
    spec.write_text(text)
    result = cli("run", spec, "-o", tmp_path / "ours")
    assert result.exit_code == 0, result.output
    assert "Validation passed" in result.output and re.search(r"forward [\d.]+ s \(loss", result.output), result.output
    theirs = run_mergekit(text, tmp_path / "mergekit")
    a, b = read_folder(tmp_path / "ours"), read_folder(theirs)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    return (json.loads((tmp_path / "ours" / "config.json").read_text()),
            json.loads((theirs / "config.json").read_text()), a)


def test_named_module_slices_equal_mergekit(vlms, cli, tmp_path):
    ours, theirs, tensors = _run(cli, tmp_path, NAMED.format(root=vlms))
    assert ours["text_config"]["num_hidden_layers"] == theirs["text_config"]["num_hidden_layers"] == 4
    assert ours["vision_config"]["num_hidden_layers"] == theirs["vision_config"]["num_hidden_layers"] == 2
    assert sum(".layers.3.input_layernorm" in name for name in tensors) == 1


def test_inferred_module_slices_equal_mergekit_and_load(vlms, cli, tmp_path):
    """Tensors as mergekit's; mergekit leaves text_config.num_hidden_layers at 2 for a module it infers (its
    output does not load), we write 3."""
    ours, theirs, tensors = _run(cli, tmp_path, INFERRED.format(root=vlms))
    assert ours["text_config"]["num_hidden_layers"] == 3 and theirs["text_config"]["num_hidden_layers"] == 2
    assert "model.language_model.layers.2.mlp.up_proj.weight" in tensors
    b = read_folder(vlms / "b")
    assert torch.allclose(tensors["model.language_model.layers.2.mlp.up_proj.weight"],   # weight 0.4 / 0.4
                          b["model.language_model.layers.1.mlp.up_proj.weight"], rtol=1e-6, atol=0)


def test_module_slices_errors(vlms, cli, tmp_path):
    def refused(text):
        spec = tmp_path / "spec.yaml"
        spec.write_text(text)
        result = cli("run", spec, "-o", tmp_path / "out")
        assert result.exit_code == 2 and not (tmp_path / "out").exists(), result.output
        return result.output.replace(str(spec), "spec.yaml")

    text = NAMED.format(root=vlms)
    assert refused(text.replace("layer_range: [0, 2]\n          - model", "layer_range: [0, 3]\n          - model",
                                1)) == (
        "error: spec.yaml: modules.text_decoder.slices[0].sources[0].layer_range: [0, 3) goes beyond the 2 layers "
        f"of {vlms}/mistral3-a\nHint: its layers are 0..1; ranges are half-open, so [0, 2) is all of them\n")
    both = text.replace("  vision_tower:\n    models:", "  vision_tower:\n    slices: []\n    models:")
    assert refused(both) == ("error: spec.yaml: modules.vision_tower: the module lists both models and slices\n"
                             "Hint: give the module models: [...] (merged whole) or slices: [...] (layers stacked)\n")
