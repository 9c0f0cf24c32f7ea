"""Vision-language models (LLaVA, as mergekit's own tests build it; a Mistral3): every method merges them as
mergekit 0.1.5 does (same YAML, float32 bit for bit), and `merge run`'s default validation passes them: structure
checks each sub-config against its own sub-model's tensors, forward runs the model as image-text-to-text on text
only. ``modules:`` merges each module from its own models and parameters, as mergekit does."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from helpers.mergekit_oracle import run_mergekit
from helpers.models import read_folder
from test_sparsifiers import stable_mergekit_sort  # noqa: F401  (fixture)

from mergekit_lite import run_merge, validate

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def llavas(tmp_path_factory):
    from helpers.vlm_models import write_llava, write_mistral3

    root = tmp_path_factory.mktemp("llava")
    for name, seed in (("a", 1), ("b", 2), ("base", 3)):
        write_llava(root / name, seed)
    for name, seed in (("deep-a", 1), ("deep-b", 2)):   # a 3-layer vision tower beside a 2-layer text model
        write_llava(root / name, seed, vision_layers=3)
    for name, seed in (("legacy-a", 1), ("legacy-b", 2)):
        write_llava(root / name, seed, legacy=True)
    for name, seed in (("mistral3-base", 0), ("mistral3-a", 1), ("mistral3-b", 2)):
        write_mistral3(root / name, seed)
    return root


MODELS = """
merge_method: {method}
{base}models:
  - model: {root}/a
    parameters: {{weight: 0.6, density: {density}}}
  - model: {root}/b
    parameters: {{weight: 0.4, density: {density}}}
parameters: {{{params}}}
dtype: float32
"""
BASE = "base_model: {root}/base\n"
# mergekit's VLM merges in its test_basic_merges (linear, slerp, nuslerp, TA, breadcrumbs, ties, dare_ties,
# model_stock); dare_ties at density 1 drops nothing, so its random draw does not decide any value.
METHODS = [
    ("linear", False, "", 0.5), ("slerp", True, "t: 0.35", 0.5), ("task_arithmetic", True, "", 0.5),
    ("breadcrumbs", True, "gamma: 0.05", 0.66), ("ties", True, "", 0.3), ("dare_ties", True, "", 1.0),
    ("model_stock", True, "", 0.5), ("model_stock", True, "filter_wise: true", 0.5),
]


def spec_for(root, method, with_base, params, density):
    base = BASE.format(root=root) if with_base else ""
    if method == "slerp":   # slerp takes the base among two models
        return (f"merge_method: slerp\nbase_model: {root}/a\nmodels:\n  - model: {root}/a\n  - model: {root}/b\n"
                f"parameters: {{{params}}}\ndtype: float32\n")
    return MODELS.format(method=method, base=base, root=root, params=params, density=density)


def same_as_mergekit(spec: str, ours, tmp_path) -> None:
    theirs = run_mergekit(spec, tmp_path / "mergekit")
    a, b = read_folder(ours), read_folder(theirs)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


@pytest.mark.usefixtures("stable_mergekit_sort")   # ties and breadcrumbs: mergekit's sort made stable, as ours
@pytest.mark.parametrize("method,with_base,params,density", METHODS)
def test_merge_run_validates_and_equals_mergekit(llavas, method, with_base, params, density, cli, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(spec_for(llavas, method, with_base, params, density))
    result = cli("run", spec, "-o", tmp_path / "ours")
    assert result.exit_code == 0, result.output
    assert "Validation passed" in result.output and re.search(r"forward [\d.]+ s \(loss", result.output), result.output
    same_as_mergekit(spec.read_text(), tmp_path / "ours", tmp_path)


# mergekit's nuslerp grid, row_wise x flatten x {no base, base}, with weights summing to zero among them:
# the corners that cover every value of each (all 16 pass; each run costs a model load).
@pytest.mark.parametrize("row_wise,flatten,with_base,weights", [
    (True, True, False, (-0.5, 0.5)), (False, True, True, (0.6, 0.4)), (True, False, True, (-0.5, 0.5)),
    (False, False, False, (0.6, 0.4))])
def test_nuslerp_grid_validates_and_equals_mergekit(llavas, row_wise, flatten, with_base, weights, cli, tmp_path):
    spec = tmp_path / "spec.yaml"
    base = BASE.format(root=llavas) if with_base else ""
    spec.write_text(f"merge_method: nuslerp\n{base}models:\n"
                    f"  - model: {llavas}/a\n    parameters: {{weight: {weights[0]}}}\n"
                    f"  - model: {llavas}/b\n    parameters: {{weight: {weights[1]}}}\n"
                    f"parameters: {{nuslerp_row_wise: {str(row_wise).lower()}, "
                    f"nuslerp_flatten: {str(flatten).lower()}}}\ndtype: float32\n")
    result = cli("run", spec, "-o", tmp_path / "ours")
    assert result.exit_code == 0 and "Validation passed" in result.output, result.output
    same_as_mergekit(spec.read_text(), tmp_path / "ours", tmp_path)


def test_a_gradient_spans_each_stack_of_layers(llavas, cli, tmp_path):
    """Layer 1 of the 2-layer text model is at t = 1 although the vision tower has 3 layers (mergekit: one
    module per layer prefix)."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"merge_method: slerp\nbase_model: {llavas}/deep-a\nmodels:\n  - model: {llavas}/deep-a\n"
                    f"  - model: {llavas}/deep-b\nparameters:\n  t: [0.0, 0.3, 1.0]\ndtype: float32\n")
    result = cli("run", spec, "-o", tmp_path / "ours")
    assert result.exit_code == 0, result.output
    same_as_mergekit(spec.read_text(), tmp_path / "ours", tmp_path)
    merged, other = read_folder(tmp_path / "ours"), read_folder(llavas / "deep-b")
    name = "model.language_model.layers.1.mlp.up_proj.weight"
    assert torch.equal(merged[name], other[name])


def test_legacy_names_validate(llavas, cli, tmp_path):
    """transformers 5's own save_pretrained layout (language_model.model.*, vision_tower.*) validates too."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"merge_method: linear\nmodels:\n  - model: {llavas}/legacy-a\n    parameters: {{weight: 0.5}}\n"
                    f"  - model: {llavas}/legacy-b\n    parameters: {{weight: 0.5}}\ndtype: float32\n")
    result = cli("run", spec, "-o", tmp_path / "ours")
    assert result.exit_code == 0, result.output
    report = validate(tmp_path / "ours", spec=spec)
    assert [c.status for c in report.checks] == ["passed"] * 4
    assert report.check("structure").numbers["config_rules"] == RULES


# text: embeddings, lm_head, final norm, 2 norms and 7 projections in each of 2 layers, layer count;
# vision: q/k/v projections in each of 2 layers, layer count
RULES = 3 + 2 * (2 + 7) + 1 + 2 * 3 + 1


@pytest.fixture(scope="module")
def merged(llavas, tmp_path_factory):
    out = tmp_path_factory.mktemp("merged") / "out"
    run_merge(spec_for(llavas, "linear", False, "", 0.5), out, progress=False, validate=False)
    return out


def with_config(merged, tmp_path, change) -> str:
    copy = tmp_path / "copy"
    shutil.copytree(merged, copy)
    config = json.loads((copy / "config.json").read_text())
    change(config)
    (copy / "config.json").write_text(json.dumps(config))
    return copy


def test_each_sub_config_checks_its_own_tensors(merged, tmp_path):
    structure = validate(merged).check("structure")
    assert structure.status == "passed"
    assert structure.numbers["config_rules"] == RULES

    def wrong_vision(config):
        config["vision_config"]["hidden_size"] = 32

    findings = validate(with_config(merged, tmp_path, wrong_vision)).check("structure").failures
    assert findings and all(f.tensor.startswith("model.vision_tower.") for f in findings)
    assert "vision_config.hidden_size 32" in findings[0].message


def test_a_layer_count_is_checked_per_sub_model(merged, tmp_path):
    def more_text_layers(config):
        config["text_config"]["num_hidden_layers"] = 3

    findings = validate(with_config(merged, tmp_path, more_text_layers)).check("structure").failures
    assert [f.message for f in findings] == ["text_config.num_hidden_layers is 3 but the output has no tensors "
                                             "for layer(s) 2"]


def test_forward_runs_image_text_to_text_on_text_only(merged):
    forward = validate(merged).check("forward")
    assert forward.status == "passed"
    assert forward.numbers["token_source"] == "fixed_ids" and forward.numbers["logits_finite"] is True


def test_fixed_ids_avoid_media_tokens():
    from mergekit_lite.validation.inference import make_batch

    batch = make_batch("/nonexistent", 8, avoid=(0, 1, 5))
    assert not bool(torch.isin(batch.input_ids, torch.tensor([0, 1, 5])).any())


# LLaVA has no architecture file in mergekit: its modules are the inferred ones. Precedence: a model's own
# weight > its module's > the top-level one; the gradient on `default` puts every tensor there at t = 0.
INFERRED = """
merge_method: linear
modules:
  model.language_model.layers:
    models:
      - model: {root}/a
        parameters: {{weight: 0.7}}
      - model: {root}/b
  model.vision_tower.encoder.layers:
    models:
      - model: {root}/a
      - model: {root}/base
    parameters: {{weight: 0.5}}
  default:
    models:
      - model: {root}/b
      - model: {root}/base
    parameters: {{weight: [0.2, 0.8]}}
parameters: {{weight: 1.0, normalize: false}}
dtype: float32
"""
# Mistral3 has one (modular): text_decoder, vision_tower, multi_modal_projector.
NAMED = """
merge_method: task_arithmetic
base_model: {root}/mistral3-base
modules:
  text_decoder:
    models:
      - model: {root}/mistral3-a
        parameters: {{weight: 0.7}}
      - model: {root}/mistral3-b
        parameters: {{weight: 0.3}}
  vision_tower:
    models:
      - model: {root}/mistral3-b
    parameters: {{weight: [0.2, 1.0]}}
  multi_modal_projector:
    models:
      - model: {root}/mistral3-a
parameters: {{weight: 0.5}}
dtype: float32
"""


@pytest.mark.parametrize("template", [INFERRED, NAMED], ids=["inferred", "named"])
def test_modules_validate_and_equal_mergekit(llavas, template, cli, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(template.format(root=llavas))
    result = cli("run", spec, "-o", tmp_path / "ours")
    assert result.exit_code == 0, result.output
    assert "Validation passed" in result.output and re.search(r"forward [\d.]+ s \(loss", result.output), result.output
    same_as_mergekit(spec.read_text(), tmp_path / "ours", tmp_path)


def test_modules_of_a_text_model_is_default(models_f32, tmp_path):
    """A model with one stack of layers has one module, default (mergekit's name for it too)."""
    spec = (f"merge_method: task_arithmetic\nbase_model: {models_f32}/base\nmodules:\n  default:\n    models:\n"
            f"      - model: {models_f32}/ft-a\n      - model: {models_f32}/ft-b\n        parameters: {{weight: 0.3}}\n"
            f"    parameters: {{weight: 0.6}}\ndtype: float32\n")
    run_merge(spec, tmp_path / "ours", progress=False)
    same_as_mergekit(spec, tmp_path / "ours", tmp_path)


def refused(cli, tmp_path, text: str):
    spec = tmp_path / "spec.yaml"
    spec.write_text(text)
    result = cli("run", spec, "-o", tmp_path / "out")
    assert result.exit_code == 2 and not (tmp_path / "out").exists()
    return result.output.replace(str(spec), "spec.yaml")


def test_modules_errors(llavas, cli, tmp_path):
    text = INFERRED.format(root=llavas)
    assert refused(cli, tmp_path, text.replace("  default:", "  defualt:")).startswith(
        "error: spec.yaml: modules.defualt: " + f"{llavas}/a has no module 'defualt'. Did you mean 'default'?\n"
        "Hint: its modules by role: multi_modal_projector, text_decoder, vision_tower; as mergekit infers them: ")
    start, end = text.index("  model.vision_tower"), text.index("  default:")
    assert refused(cli, tmp_path, text[:start] + text[end:]) == (
        "error: spec.yaml: modules: the model's module 'model.vision_tower.encoder.layers' (32 tensors, e.g. "
        "'model.vision_tower.encoder.layers.0.layer_norm1.bias') is not listed, so the output would lack its "
        "tensors (mergekit leaves them out)\nHint: add modules.model.vision_tower.encoder.layers with the models "
        "to merge into it\n")
    assert "exactly one of 'models', 'slices' or 'modules' must be given" in refused(
        cli, tmp_path, text + f"models:\n  - model: {llavas}/a\n")


def test_a_vlm_that_needs_its_images_is_not_checked(merged, monkeypatch):
    """Not running on text alone says nothing about the merge: NOT CHECKED with the reason, not failed."""
    from mergekit_lite.validation import inference

    def needs_images(*_):
        raise ValueError("pixel_values are required")

    monkeypatch.setattr(inference, "logits_of", needs_images)
    forward = validate(merged).check("forward")
    assert forward.status == "not_checked"
    assert forward.summary == ("the model loads but does not run on text alone, without images (ValueError: "
                               "pixel_values are required)")
