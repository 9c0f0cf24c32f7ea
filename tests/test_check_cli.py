"""`merge check SPEC...`: specs checked offline, without opening any model; one line per problem, exit 0 / 2."""

from __future__ import annotations

from pathlib import Path

import pytest

CONFIGS = sorted((Path(__file__).parent.parent / "merge_configs").glob("*.y*ml"))


@pytest.fixture(autouse=True)
def no_models(monkeypatch):
    """No model may be opened and no Hub reached: both fail the test if `merge check` tries."""
    import mergekit_lite.plan.inputs as inputs

    def refuse(*args, **kwargs):
        raise AssertionError("merge check opened a model")

    for name in ("open_inputs", "open_reference", "resolve_hub_inputs", "fetch"):
        monkeypatch.setattr(inputs, name, refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def write(tmp_path: Path, text: str, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_every_example_in_merge_configs_passes(cli):
    # The examples name demo/models/..., which do not exist here: check needs no model.
    result = cli("check", *CONFIGS)
    assert result.exit_code == 0, result.stdout
    assert result.stdout == ""
    assert result.stderr.count(": ok\n") == len(CONFIGS)


WHOLE = "merge_method: ties\nbase_model: m/base\nmodels:\n  - model: m/a\n    parameters: {{{params}}}\n"


@pytest.mark.parametrize("params, where, what", [
    ("weight: 1, densty: 0.5", "models[0].parameters.densty", "unknown parameter. Did you mean 'density'?"),
    ("weight: 1, density: 1.5", "models[0].parameters.density", "1.5"),
    ("weight: 1, density: [0.2, -1]", "models[0].parameters.density[1]", "-1"),
    ("weight: one", "models[0].parameters.weight", "one"),
])
def test_parameters_and_ranges(cli, tmp_path, params, where, what):
    spec = write(tmp_path, WHOLE.format(params=params))
    result = cli("check", spec)
    assert result.exit_code == 2
    [line] = result.stdout.splitlines()
    assert line.startswith(f"{spec}: {where}: ") and what in line


@pytest.mark.parametrize("text, where, what", [
    ("merge_method: lienar\nmodels: [{model: a}]\n", "merge_method", "Did you mean 'linear'?"),
    ("merge_method: linear\nmodels: [{model: a}]\nmodles: 1\n", "modles", "unknown key"),
    ("merge_method: passthrough\nslices:\n  - sources: [{model: a, layer_range: [4, 2]}]\n",
     "slices[0].sources[0].layer_range", "empty or negative"),
    ("merge_method: ties\nmodels: [{model: a, parameters: {weight: 1, density: 0.5}}]\n", "base_model",
     "needs a base_model"),
    ("merge_method: slerp\nbase_model: a\nmodels: [{model: a}]\nparameters: {t: 0.5}\n", "models", "slerp takes"),
    ("merge_method: linear\nmodels: [{model: a}]\ntokenizer: {sorce: union}\n", "tokenizer.sorce", "Did you mean 'source'?"),
])
def test_schema_methods_slices_tokenizer(cli, tmp_path, text, where, what):
    spec = write(tmp_path, text)
    result = cli("check", spec)
    assert result.exit_code == 2, result.stdout
    [line] = result.stdout.splitlines()
    assert line.startswith(f"{spec}: {where}: ") and what in line, line


def test_one_line_per_problem_over_several_files(cli, tmp_path):
    good = write(tmp_path, "merge_method: linear\nmodels: [{model: a}, {model: b}]\n", "good.yaml")
    bad1 = write(tmp_path, "merge_method: linear\nmodels: [{model: a, parameters: {wieght: 1}}]\n", "bad1.yaml")
    bad2 = write(tmp_path, "merge_method: [\n", "bad2.yaml")
    result = cli("check", good, bad1, bad2, tmp_path / "missing.yaml")
    assert result.exit_code == 2
    lines = result.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == [str(bad1), str(bad2), str(tmp_path / "missing.yaml")]
    assert "Did you mean 'weight'?" in lines[0]
    assert f"{good}: ok" in result.stderr


MULTI = """name: stage1
merge_method: linear
models: [{model: m/a}, {model: m/b}]
---
name: final
merge_method: task_arithmetic
base_model: m/base
models: [{model: stage1, parameters: {weight: 0.5}}]
"""


def test_multi_stage_files_are_checked_document_by_document(cli, tmp_path):
    result = cli("check", write(tmp_path, MULTI))
    assert result.exit_code == 0 and result.stdout == ""
    assert "multi-stage files are not supported by merge run yet" in result.stderr
    bad = write(tmp_path, MULTI.replace("weight: 0.5", "weigth: 0.5").replace("name: final", "name: stage1"))
    result = cli("check", bad)
    assert result.exit_code == 2
    assert result.stdout.splitlines() == [
        f"{bad} (document 2): name: two stages have this name (give every stage of a multi-stage file its own name:)"]


MOE = """base_model: m/base
gate_mode: hidden
dtype: bfloat16
experts_per_token: 2
experts:
  - source_model: m/code
    positive_prompts: ["write a function"]
  - source_model: m/chat
    positive_prompts: ["hello"]
"""


@pytest.mark.parametrize("change, where", [
    (None, None),
    (("gate_mode: hidden", "gate_mode: hiden"), "gate_mode"),
    (("experts_per_token: 2", "experts_per_token: 3"), "experts_per_token"),
    (("source_model: m/chat", "source_modle: m/chat"), "experts[1].source_modle"),
    (("dtype: bfloat16", "dtype: bf17"), "dtype"),
])
def test_moe_files(cli, tmp_path, change, where):
    spec = write(tmp_path, MOE if change is None else MOE.replace(*change))
    result = cli("check", spec)
    if where is None:
        assert result.exit_code == 0 and result.stdout == ""
        assert "MoE files (mergekit-moe) are not supported by merge run yet" in result.stderr
    else:
        assert result.exit_code == 2
        [line] = result.stdout.splitlines()
        assert line.startswith(f"{spec}: {where}: "), line


@pytest.mark.parametrize("params, where", [
    ("models: [{model: a, parameters: {weight: 1}}, {model: b, parameters: {weight: -1}}]", "models"),
    ("models: [{model: a, parameters: {weight: [1, 0]}}, {model: b, parameters: {weight: [-1, 0.5]}}]", "models"),
    ("models: [{model: a, parameters: {weight: [{filter: mlp, value: 1}, {value: 1}]}},\n"
     "         {model: b, parameters: {weight: [{filter: mlp, value: -1}, {value: 1}]}}]", "models"),
])
def test_checks_of_resolved_values_without_tensors(cli, tmp_path, params, where):
    """linear refuses weights summing to 0 (normalize would divide by it): found over the spec's own values
    (each gradient point, each filter), with no tensor."""
    spec = write(tmp_path, f"merge_method: linear\n{params}\n")
    result = cli("check", spec)
    assert result.exit_code == 2, result.output
    [line] = result.stdout.splitlines()
    assert line.startswith(f"{spec}: {where}") and "sum" in line, line
    fine = write(tmp_path, f"merge_method: linear\n{params}\nparameters: {{normalize: false}}\n", "fine.yaml")
    assert cli("check", fine).exit_code == 0
