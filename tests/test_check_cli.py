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
merge_method: task_arithmetic
base_model: m/base
models: [{model: stage1, parameters: {weight: 0.5}}]
"""


def test_multi_stage_files_are_checked_document_by_document(cli, tmp_path):
    result = cli("check", write(tmp_path, MULTI))
    assert result.exit_code == 0 and result.stdout == ""
    assert "a multi-stage file: `merge run FILE OUT` writes each named stage to OUT.stages/NAME" in result.stderr
    bad = write(tmp_path, MULTI.replace("weight: 0.5", "weigth: 0.5").replace("---\n", "---\nname: stage1\n"))
    result = cli("check", bad)
    assert result.exit_code == 2
    assert result.stdout.splitlines() == [   # every problem of the document, in the order they are written
        f"{bad} (document 2): name: two stages have this name (give every stage of a multi-stage file its own name:)",
        f"{bad} (document 2): models[0].parameters.weigth: unknown parameter. Did you mean 'weight'? "
        "(task_arithmetic takes: weight, normalize, lambda)"]
    cycle = write(tmp_path, MULTI.replace("m/a}, {model: m/b}", "m/a}, {model: stage1}"))
    result = cli("check", cycle)
    assert (result.exit_code, result.stdout.splitlines()) == (2, [
        f"{cycle} (document 1): models[1].model: the stages form a cycle: stage1 -> stage1 (a stage can only use "
        "stages that do not use it, directly or through others)"])


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
        assert "a mergekit-moe file: run it with `merge moe SPEC OUT`" in result.stderr
    else:
        assert result.exit_code == 2
        [line] = result.stdout.splitlines()   # a misspelled key is not also a missing one
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


# --- every problem of a file, in the order it is written --------------------------------------------------------

FOUR = """merge_method: ties
base_model: m/base
modles: []
models:
  - model: m/a
    parameters: {weight: 1.0, densty: 0.5}
  - model: m/b
    parameters: {weight: 1.0, density: 2}
dtype: float99
"""


def test_every_problem_of_a_spec_one_line_each_in_document_order(cli, tmp_path):
    """Schema problems (an unknown key, a dtype) and the method's (an unknown parameter, a value out of range)
    are all shown, in the order they are written, though they are found in two passes; `merge run` prints the
    first and says how many more there are."""
    spec = write(tmp_path, FOUR)
    result = cli("check", spec)
    assert result.exit_code == 2
    assert result.stdout.splitlines() == [
        f"{spec}: modles: unknown key. Did you mean 'modules'? (allowed here: merge_method, base_model, models, "
        "slices, parameters, dtype, out_dtype, tokenizer_source, tokenizer, chat_template, modules, name, output)",
        f"{spec}: models[0].parameters.densty: unknown parameter. Did you mean 'density'? (ties takes: weight, "
        "density, normalize, rescale, lambda, int8_mask)",
        f"{spec}: models[1].parameters.density: density = 2 is outside [0, 1] (fraction of this model's task "
        "vector entries kept)",
        f"{spec}: dtype: unknown dtype 'float99'; use one of bfloat16, float16, float32, float64",
    ]
    run = cli("run", spec, tmp_path / "out")
    assert run.exit_code == 2 and not (tmp_path / "out").exists()
    assert run.stderr.startswith(f"error: {spec}: modles: unknown key.")
    assert run.stderr.endswith(f"\n(1 more problem found; `merge check {spec}` lists every one)\n")


def test_slices_tokenizer_and_bad_entries_each_reported(cli, tmp_path):
    """A bad entry does not hide the next one, nor make the others miscounted (an unreadable model still
    counts as an input)."""
    spec = write(tmp_path, """merge_method: slerp
slices:
  - sources:
      - {model: m/a, layer_range: [4, 2]}
      - {modle: m/b, layer_range: [0, 2]}
base_model: m/a
parameters: {t: abc}
tokenizer: {source: union, pad_to_multiple_of: 0}
chat_template: 7
""")
    result = cli("check", spec)
    assert result.exit_code == 2
    assert [line.split(": ")[1] for line in result.stdout.splitlines()] == [
        "slices[0].sources[0].layer_range", "slices[0].sources[1].modle",
        "parameters.t", "tokenizer.pad_to_multiple_of", "chat_template"], result.stdout


def test_multi_stage_problems_in_two_documents(cli, tmp_path):
    spec = write(tmp_path, MULTI.replace("models: [{model: m/a}", "modles: 1\nmodels: [{model: m/a}")
                 .replace("weight: 0.5", "weight: abc"))
    result = cli("check", spec)
    assert result.exit_code == 2
    assert result.stdout.splitlines() == [
        f"{spec} (document 1): modles: unknown key. Did you mean 'modules'? (allowed here: merge_method, base_model, "
        "models, slices, parameters, dtype, out_dtype, tokenizer_source, tokenizer, chat_template, modules, name, "
        "output)",
        f"{spec} (document 2): models[0].parameters.weight: weight must be a number, got 'abc'"]


def test_moe_file_problems_all_reported(cli, tmp_path):
    spec = write(tmp_path, MOE.replace("gate_mode: hidden", "gate_mode: hiden")
                 .replace("source_model: m/chat", "source_modle: m/chat").replace("dtype: bfloat16", "dtype: bf17"))
    result = cli("check", spec)
    assert result.exit_code == 2
    assert [line.split(": ")[1] for line in result.stdout.splitlines()] == [
        "gate_mode", "dtype", "experts[1].source_modle"], result.stdout


def test_the_lines_are_capped(cli, tmp_path):
    keys = "".join(f"extra{i}: 1\n" for i in range(60))
    spec = write(tmp_path, f"merge_method: linear\nmodels: [{{model: a}}, {{model: b}}]\n{keys}")
    result = cli("check", spec)
    lines = result.stdout.splitlines()
    assert result.exit_code == 2 and len(lines) == 51
    assert lines[49].startswith(f"{spec}: extra49: unknown key.") and lines[50] == f"{spec}: ... and 10 more"


# --- output: adapter --------------------------------------------------------------------------------------------

ADAPTER = """merge_method: task_arithmetic
output: adapter
parameters: {lambda: 0.5}
models:
  - model: org/base+org/a
  - model: org/base+org/b
"""


def test_adapter_outputs_are_checked_as_merge_run_reads_them(cli, tmp_path):
    """task_arithmetic of base+adapter models needs no base_model for an adapter output (the adapters' base is
    it); a method no adapter combination can do, or a weight that is not a number, is refused as `merge run`
    refuses it."""
    result = cli("check", write(tmp_path, ADAPTER))
    assert (result.exit_code, result.stdout) == (0, ""), result.output
    assert "note: output: adapter: the models' adapters are combined into one LoRA adapter" in result.stderr
    spec = write(tmp_path, ADAPTER.replace("task_arithmetic", "slerp").replace("lambda", "t"))
    [line] = cli("check", spec).stdout.splitlines()
    assert line.startswith(f"{spec}: merge_method: slerp cannot make an adapter: it interpolates whole weights")
    spec = write(tmp_path, ADAPTER + "    parameters: {weight: abc}\n")
    result = cli("check", spec)
    assert (result.exit_code, result.stdout) == (
        2, f"{spec}: models[1].parameters.weight: weight must be a number, got 'abc' (e.g. weight: 0.5)\n")


def test_run_refuses_options_an_adapter_output_would_ignore(cli, tmp_path):
    spec = write(tmp_path, ADAPTER)
    result = cli("run", spec, tmp_path / "out", "--out-dtype", "float16", "--max-shard-size", "1GB", "-j", "2")
    assert result.exit_code == 2 and not (tmp_path / "out").exists()
    assert result.stderr == (
        "error: --max-shard-size, --out-dtype, --num-threads do not apply to an adapter output (output: adapter)\n"
        "Hint: an adapter output is one float32 adapter_model.safetensors with its adapter_config.json and card, "
        "made on the CPU; drop the option, or use output: model for a merged model\n")
    result = cli("run", spec, tmp_path / "out", "--device", "cuda")
    assert result.exit_code == 2 and result.stderr.startswith("error: --device does not apply to an adapter output")
