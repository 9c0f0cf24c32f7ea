"""Bad parameters of the merge methods are spec errors naming the YAML path, found before any tensor is read."""

from __future__ import annotations

import pytest
from helpers.models import write_spec
from test_errors import check


@pytest.fixture(autouse=True)
def no_tensor_reads(monkeypatch):
    """Every error here must come from the plan: reading tensor data fails the test."""
    from mergekit_lite.sources.checkpoint import Checkpoint

    def refuse(self, name, *args):
        raise AssertionError(f"tensor {name} was read before the error was found")

    monkeypatch.setattr(Checkpoint, "read", refuse)


def spec_text(root, method: str, *models: tuple[str, str], base: bool = True, merge_params: str = "") -> str:
    """A spec: ``models`` are (folder name, parameters as YAML flow text, or "" for none)."""
    lines = [f"merge_method: {method}"] + ([f"base_model: {root}/base"] if base else []) + ["models:"]
    for name, params in models:
        lines.append(f"  - model: {root}/{name}" + (f"\n    parameters: {params}" if params else ""))
    return "\n".join(lines + ([f"parameters: {merge_params}"] if merge_params else [])) + "\n"


def run(cli, tmp_path, text: str):
    spec = write_spec(tmp_path / "spec.yaml", text)
    return spec, cli("run", spec, "-o", tmp_path / "out")


def test_density_out_of_range(cli, models_f32, tmp_path):
    spec, result = run(cli, tmp_path, spec_text(models_f32, "ties", ("ft-a", "{weight: 0.5, density: 1.5}"),
                                                ("ft-b", "{weight: 0.5}")))
    check(result, 2, f"error: {spec}: models[0].parameters.density: density = 1.5 is outside [0, 1]\n"
                     "Hint: fraction of this model's task vector entries kept")


def test_density_out_of_range_inside_a_gradient(cli, models_f32, tmp_path):
    spec, result = run(cli, tmp_path, spec_text(models_f32, "dare_ties", ("ft-a", "{weight: 0.5}"),
                                                ("ft-b", "{weight: 0.5, density: [0.2, -0.1]}")))
    check(result, 2, f"error: {spec}: models[1].parameters.density[1]: density = -0.1 is outside [0, 1]\n"
                     "Hint: fraction of this model's task vector entries kept")


def test_della_epsilon_beyond_its_range(cli, models_f32, tmp_path):
    spec, result = run(cli, tmp_path, spec_text(models_f32, "della", ("ft-a", "{weight: 0.5, density: 0.66, "
                                                                              "epsilon: 1.35}")))
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {spec}: models[0].parameters.epsilon: epsilon = 1.35 is outside "
                                    "[0, 1]\nHint: half-width of the keep-probability band")


def test_della_epsilon_pushing_probabilities_outside_0_1(cli, models_f32, tmp_path):
    spec, result = run(cli, tmp_path, spec_text(models_f32, "della", ("ft-a", "{weight: 0.5, density: 0.5}"),
                                                ("ft-b", "{weight: 0.5, density: [0.5, 0.9], epsilon: 0.2}")))
    check(result, 2, f"error: {spec}: models[1].parameters.epsilon: density +/- epsilon must lie strictly inside "
                     f"(0, 1), got density 0.9 and epsilon 0.2 for tensor 'model.layers.3.input_layernorm.weight' "
                     f"of models[1] ({models_f32}/ft-b)\nHint: see `merge methods della`")


def test_della_density_blamed_when_epsilon_is_the_default(cli, models_f32, tmp_path):
    spec, result = run(cli, tmp_path, spec_text(models_f32, "della_linear", ("ft-a", "{weight: 0.5, density: 0.1}")))
    check(result, 2, f"error: {spec}: models[0].parameters.density: density +/- epsilon must lie strictly inside "
                     f"(0, 1), got density 0.1 and epsilon 0.15 for tensor 'model.embed_tokens.weight' of "
                     f"models[0] ({models_f32}/ft-a)\nHint: see `merge methods della_linear`")


def test_slerp_needs_t(cli, models_f32, tmp_path):
    spec, result = run(cli, tmp_path, spec_text(models_f32, "slerp", ("ft-a", "")))
    check(result, 2, f"error: {spec}: required parameter 't' has no value for tensor 'model.embed_tokens.weight'\n"
                     "Hint: set t for it, or add a fallback entry without filter (- value: ...) to the filter list "
                     "(interpolation position: 0 is the base model, 1 the other model)")


@pytest.mark.parametrize("method", ["ties", "dare_linear", "breadcrumbs", "della", "slerp", "model_stock"])
def test_methods_needing_a_base(cli, models_f32, tmp_path, method):
    params = "" if method in ("slerp", "model_stock") else "{weight: 0.5}"
    spec, result = run(cli, tmp_path, spec_text(models_f32, method, ("ft-a", params), ("ft-b", params), base=False))
    check(result, 2, f"error: {spec}: base_model: {method} needs a base_model\n"
                     "Hint: add base_model: <the model the others were fine-tuned from>")


@pytest.mark.parametrize("method,models,base,expected", [
    ("slerp", ["base", "ft-a", "ft-b"], True, "slerp takes exactly 1 model besides the base, got 2"),
    ("model_stock", ["base", "ft-a"], True, "model_stock takes at least 2 models besides the base, got 1"),
    ("nuslerp", ["ft-a"], False, "nuslerp takes exactly 2 models, got 1"),
    ("nuslerp", ["ft-a", "ft-b", "ft-c"], True, "nuslerp takes exactly 2 models besides the base, got 3"),
], ids=["slerp with three models", "model_stock with one", "nuslerp with one", "nuslerp with three"])
def test_number_of_models(cli, models_f32, tmp_path, method, models, base, expected):
    params = "{weight: 1}" if method == "nuslerp" else ""
    text = spec_text(models_f32, method, *[(m, params) for m in models], base=base,
                     merge_params="{t: 0.5}" if method == "slerp" else "")
    spec, result = run(cli, tmp_path, text)
    check(result, 2, f"error: {spec}: models: {expected}\nHint: see `merge methods {method}`")


def test_a_parameter_of_another_method_is_a_warning(cli, models_f32, tmp_path):
    """mergekit configs often carry leftovers, such as a `weight` in model_stock."""
    spec = write_spec(tmp_path / "spec.yaml", spec_text(models_f32, "model_stock", ("ft-a", "{weight: 0.5}"),
                                                        ("ft-b", "")))
    result = cli("run", spec, "-o", tmp_path / "out", "--dry-run")
    assert result.exit_code == 0, result.output
    assert result.stderr == ("warning: model_stock does not use these parameters, so they are ignored: "
                             "models[0].parameters.weight\n")
