"""Bad parameters of the merge methods are spec errors naming the YAML path, found before any tensor is read."""

from __future__ import annotations

import pytest

from conftest import write_spec
from test_errors import check


@pytest.fixture(autouse=True)
def no_tensor_reads(monkeypatch):
    """Every error here must come from the plan: reading tensor data fails the test."""
    from mergekit_lite.checkpoint import Checkpoint

    def refuse(self, name):
        raise AssertionError(f"tensor {name} was read before the error was found")

    monkeypatch.setattr(Checkpoint, "read", refuse)


def family(root, method: str, params_a: str, params_b: str = "{weight: 0.5}", base: bool = True) -> str:
    return (f"merge_method: {method}\n" + (f"base_model: {root}/base\n" if base else "") +
            f"models:\n  - model: {root}/ft-a\n    parameters: {params_a}\n"
            f"  - model: {root}/ft-b\n    parameters: {params_b}\n")


def test_density_out_of_range(cli, models_f32, tmp_path):
    spec = write_spec(tmp_path / "spec.yaml", family(models_f32, "ties", "{weight: 0.5, density: 1.5}"))
    check(cli("run", spec, "-o", tmp_path / "out"), 2,
          f"error: {spec}: models[0].parameters.density: density = 1.5 is outside [0, 1]\n"
          "Hint: fraction of this model's task vector entries kept")


def test_density_out_of_range_inside_a_gradient(cli, models_f32, tmp_path):
    spec = write_spec(tmp_path / "spec.yaml", family(models_f32, "dare_ties", "{weight: 0.5}",
                                                     "{weight: 0.5, density: [0.2, -0.1]}"))
    check(cli("run", spec, "-o", tmp_path / "out"), 2,
          f"error: {spec}: models[1].parameters.density[1]: density = -0.1 is outside [0, 1]\n"
          "Hint: fraction of this model's task vector entries kept")


def test_della_epsilon_beyond_its_range(cli, models_f32, tmp_path):
    spec = write_spec(tmp_path / "spec.yaml", family(models_f32, "della", "{weight: 0.5, density: 0.66, "
                                                                         "epsilon: 1.35}"))
    result = cli("run", spec, "-o", tmp_path / "out")
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {spec}: models[0].parameters.epsilon: epsilon = 1.35 is outside "
                                    "[0, 1]\nHint: half-width of the keep-probability band")


def test_della_epsilon_pushing_probabilities_outside_0_1(cli, models_f32, tmp_path):
    spec = write_spec(tmp_path / "spec.yaml", family(models_f32, "della", "{weight: 0.5, density: 0.5}",
                                                     "{weight: 0.5, density: [0.5, 0.9], epsilon: 0.2}"))
    check(cli("run", spec, "-o", tmp_path / "out"), 2,
          f"error: {spec}: models[1].parameters.epsilon: density +/- epsilon must lie strictly inside (0, 1), "
          f"got density 0.9 and epsilon 0.2 for tensor 'model.layers.3.input_layernorm.weight' of models[1] "
          f"({models_f32}/ft-b)\nHint: see `merge methods della`")


def test_della_density_blamed_when_epsilon_is_the_default(cli, models_f32, tmp_path):
    spec = write_spec(tmp_path / "spec.yaml", family(models_f32, "della_linear", "{weight: 0.5, density: 0.1}"))
    check(cli("run", spec, "-o", tmp_path / "out"), 2,
          f"error: {spec}: models[0].parameters.density: density +/- epsilon must lie strictly inside (0, 1), "
          f"got density 0.1 and epsilon 0.15 for tensor 'model.embed_tokens.weight' of models[0] "
          f"({models_f32}/ft-a)\nHint: see `merge methods della_linear`")


def test_slerp_with_three_models(cli, models_f32, tmp_path):
    spec = write_spec(tmp_path / "spec.yaml", f"merge_method: slerp\nbase_model: {models_f32}/base\nmodels:\n"
                                              f"  - model: {models_f32}/base\n  - model: {models_f32}/ft-a\n"
                                              f"  - model: {models_f32}/ft-b\nparameters: {{t: 0.5}}\n")
    check(cli("run", spec, "-o", tmp_path / "out"), 2,
          f"error: {spec}: models: slerp takes exactly 1 model besides the base, got 2\n"
          "Hint: see `merge methods slerp`")


def test_slerp_needs_t(cli, models_f32, tmp_path):
    spec = write_spec(tmp_path / "spec.yaml", f"merge_method: slerp\nbase_model: {models_f32}/base\nmodels:\n"
                                              f"  - model: {models_f32}/ft-a\n")
    check(cli("run", spec, "-o", tmp_path / "out"), 2,
          f"error: {spec}: required parameter 't' has no value for tensor 'model.embed_tokens.weight'\n"
          "Hint: set t for it, or add a fallback entry without filter (- value: ...) to the filter list "
          "(interpolation position: 0 is the base model, 1 the other model)")


@pytest.mark.parametrize("method", ["ties", "dare_linear", "breadcrumbs", "della", "slerp", "model_stock"])
def test_methods_needing_a_base(cli, models_f32, tmp_path, method):
    params = "{}" if method in ("slerp", "model_stock") else "{weight: 0.5}"
    spec = write_spec(tmp_path / "spec.yaml", family(models_f32, method, params, params, base=False))
    check(cli("run", spec, "-o", tmp_path / "out"), 2,
          f"error: {spec}: base_model: {method} needs a base_model\n"
          "Hint: add base_model: <the model the others were fine-tuned from>")


def test_model_stock_needs_two_models_besides_the_base(cli, models_f32, tmp_path):
    spec = write_spec(tmp_path / "spec.yaml", f"merge_method: model_stock\nbase_model: {models_f32}/base\n"
                                              f"models:\n  - model: {models_f32}/base\n"
                                              f"  - model: {models_f32}/ft-a\n")
    check(cli("run", spec, "-o", tmp_path / "out"), 2,
          f"error: {spec}: models: model_stock takes at least 2 models besides the base, got 1\n"
          "Hint: see `merge methods model_stock`")


def test_nuslerp_takes_two_models(cli, models_f32, tmp_path):
    spec = write_spec(tmp_path / "spec.yaml", f"merge_method: nuslerp\nmodels:\n"
                                              f"  - model: {models_f32}/ft-a\n    parameters: {{weight: 1}}\n")
    check(cli("run", spec, "-o", tmp_path / "out"), 2,
          f"error: {spec}: models: nuslerp takes exactly 2 models, got 1\nHint: see `merge methods nuslerp`")


def test_a_parameter_of_another_method_is_a_warning(cli, models_f32, tmp_path):
    """mergekit configs often carry leftovers: `weight` in model_stock, `density` in task_arithmetic."""
    spec = write_spec(tmp_path / "spec.yaml", f"merge_method: model_stock\nbase_model: {models_f32}/base\n"
                                              f"models:\n  - model: {models_f32}/ft-a\n    parameters: "
                                              f"{{weight: 0.5}}\n  - model: {models_f32}/ft-b\n")
    result = cli("run", spec, "-o", tmp_path / "out", "--dry-run")
    assert result.exit_code == 0, result.output
    assert result.stderr == ("warning: model_stock does not use these parameters, so they are ignored: "
                             "models[0].parameters.weight\n")
