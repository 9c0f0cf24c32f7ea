"""Bad input gets one clear message (where, what, how to fix) and the right exit code; nothing is written."""

from __future__ import annotations

import os

import torch
from helpers.models import SHARD, write_spec

from mergekit_lite.testing.synthetic import LlamaShape, write_model

ALLOWED = ("merge_method, base_model, models, slices, parameters, dtype, out_dtype, tokenizer_source, tokenizer, "
           "chat_template, modules, name, output")


def check(result, code: int, expected: str):
    assert result.exit_code == code, result.output
    assert result.stderr == expected + "\n"
    assert "Traceback" not in result.output


def test_unknown_key_with_suggestion(cli, models_f32, tmp_path):
    spec = write_spec(tmp_path / "spec.yaml", f"merge_methd: linear\nmodels:\n  - model: {models_f32}/ft-a\n")
    check(cli("run", spec, "-o", tmp_path / "out"), 2,
          f"error: {spec}: merge_methd: unknown key. Did you mean 'merge_method'?\nHint: allowed here: {ALLOWED}")


def test_unknown_nested_key(cli, models_f32, tmp_path):
    spec = write_spec(tmp_path / "spec.yaml", f"merge_method: linear\nmodels:\n  - model: {models_f32}/ft-a\n"
                                              "    paramters: {weight: 1}\n")
    check(cli("run", spec, "-o", tmp_path / "out"), 2,
          f"error: {spec}: models[0].paramters: unknown key. Did you mean 'parameters'?\n"
          "Hint: allowed here: model, parameters")


def test_unknown_method(cli, models_f32, tmp_path):
    spec = write_spec(tmp_path / "spec.yaml", f"merge_method: lineer\nmodels:\n  - model: {models_f32}/ft-a\n")
    result = cli("run", spec, "-o", tmp_path / "out")
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {spec}: merge_method: unknown merge method 'lineer'. "
                                    "Did you mean 'linear'?\nHint: `merge methods` lists the methods: ")
    assert "linear" in result.stderr.splitlines()[1] and "task_arithmetic" in result.stderr.splitlines()[1]


def test_unknown_parameter_with_suggestion(cli, models_f32, tmp_path):
    spec = write_spec(tmp_path / "spec.yaml", f"merge_method: linear\nmodels:\n  - model: {models_f32}/ft-a\n"
                                              "    parameters: {weigth: 1}\n")
    check(cli("run", spec, "-o", tmp_path / "out"), 2,
          f"error: {spec}: models[0].parameters.weigth: unknown parameter. Did you mean 'weight'?\n"
          "Hint: linear takes: weight, normalize")


def test_missing_model_folder(cli, models_f32, tmp_path):
    spec = write_spec(tmp_path / "spec.yaml", f"merge_method: linear\nparameters: {{weight: 1}}\nmodels:\n"
                                              f"  - model: {models_f32}/ft-a\n  - model: {tmp_path}/nope\n")
    check(cli("run", spec, "-o", tmp_path / "out"), 2,
          f"error: {spec}: models[1].model: model folder '{tmp_path}/nope' not found\n"
          "Hint: check the path (relative paths are relative to the current directory)")


def test_shape_mismatch(cli, models_f32, tmp_path):
    narrow = tmp_path / "narrow"
    write_model(str(narrow), LlamaShape(intermediate=96), seed=0, delta_seed=5, max_shard_size=SHARD)
    spec = write_spec(tmp_path / "spec.yaml", f"merge_method: linear\nparameters: {{weight: 1}}\nmodels:\n"
                                              f"  - model: {models_f32}/ft-a\n  - model: {narrow}\n")
    check(cli("run", spec, "-o", tmp_path / "out"), 1,
          f"error: {narrow}: tensor 'model.layers.0.mlp.gate_proj.weight': shape [96, 64] != [128, 64] in "
          f"{models_f32}/ft-a\nHint: the models have different architectures or sizes; "
          "merge models of one architecture and size")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_vocab_mismatch_names_the_fix(cli, models_f32, tmp_path):
    wide = tmp_path / "wide"
    write_model(str(wide), LlamaShape(vocab=260), seed=0, delta_seed=5, max_shard_size=SHARD)
    spec = write_spec(tmp_path / "spec.yaml", f"merge_method: linear\nparameters: {{weight: 1}}\nmodels:\n"
                                              f"  - model: {models_f32}/ft-a\n  - model: {wide}\n")
    check(cli("run", spec, "-o", tmp_path / "out"), 1,
          f"error: {wide}: tensor 'model.embed_tokens.weight': shape [260, 64] != [256, 64] in {models_f32}/ft-a\n"
          "Hint: the vocabularies differ (260 vs 256 tokens) and embeddings are merged row by row. Add "
          "tokenizer_source: union (or base, or a model) to line the rows up by token text, as mergekit does; or "
          "merge models that share a tokenizer")


def test_output_inside_an_input(cli, models_f32, tmp_path):
    spec = write_spec(tmp_path / "spec.yaml", f"merge_method: linear\nmodels:\n  - model: {models_f32}/ft-a\n"
                                              "    parameters: {weight: 1}\n")
    out = models_f32 / "ft-a" / "merged"
    check(cli("run", spec, "-o", out), 2,
          f"error: {out}: the output folder is inside input model folder {models_f32}/ft-a\n"
          "Hint: write the merged model somewhere else: inputs are never written to")
    assert not out.exists()


def test_existing_output_needs_overwrite(cli, models_f32, tmp_path):
    spec = write_spec(tmp_path / "spec.yaml", f"merge_method: linear\nmodels:\n  - model: {models_f32}/ft-a\n"
                                              "    parameters: {weight: 1}\n")
    out = tmp_path / "out"
    assert cli("run", spec, "-o", out, "--quiet", "--no-validate").exit_code == 0
    check(cli("run", spec, "-o", out), 2,
          f"error: {out}: output folder already exists and is not empty\n"
          "Hint: pass --overwrite to replace it, or choose another output path with -o")
    result = cli("run", spec, "-o", out, "--overwrite", "--quiet")
    assert result.exit_code == 0, result.output
    # --overwrite replaces only an output of a merge: a folder holding a file of the user's is refused, with or
    # without it, and kept as it is
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("precious")
    for flags in ([], ["--overwrite"]):
        check(cli("run", spec, "-o", mine, *flags), 2,
              f"error: {mine}: this folder was not written by a merge (it has no merge_run.json; found keep.txt), so "
              "a merge never replaces it\nHint: choose another output path with -o, or move your files out of the "
              "folder first (--overwrite replaces only the output of an earlier merge, or an empty folder)")
        assert os.listdir(mine) == ["keep.txt"] and (mine / "keep.txt").read_text() == "precious"


def test_required_parameter_missing_for_some_tensors(cli, models_f32, tmp_path):
    spec = write_spec(tmp_path / "spec.yaml", f"""merge_method: linear
models:
  - model: {models_f32}/ft-a
    parameters: {{weight: 1, density: 0.5}}
  - model: {models_f32}/ft-b
    parameters:
      weight: [{{filter: mlp, value: 1}}]
""")
    result = cli("run", spec, "-o", tmp_path / "out")
    check(result, 2,
          "warning: linear does not use these parameters, so they are ignored: models[0].parameters.density\n"
          f"error: {spec}: models[1].parameters.weight: required parameter 'weight' has no value for tensor "
          f"'model.embed_tokens.weight' of models[1] ({models_f32}/ft-b)\nHint: set weight for it, or add a "
          "fallback entry without filter (- value: ...) to the filter list (how much this model contributes)")


def test_parameter_out_of_range_and_wrong_type(cli, models_f32, tmp_path):
    spec = write_spec(tmp_path / "spec.yaml", f"merge_method: linear\nmodels:\n  - model: {models_f32}/ft-a\n"
                                              "    parameters: {weight: [0.5, .nan]}\n")
    check(cli("run", spec, "-o", tmp_path / "out"), 2,
          f"error: {spec}: models[0].parameters.weight[1]: weight must be a finite number, got nan")
    spec = write_spec(tmp_path / "spec.yaml", f"merge_method: linear\nmodels:\n  - model: {models_f32}/ft-a\n"
                                              "    parameters: {weight: 1}\nparameters: {normalize: maybe}\n")
    check(cli("run", spec, "-o", tmp_path / "out"), 2,
          f"error: {spec}: parameters.normalize: normalize must be true or false, got 'maybe'")


def test_base_required(cli, models_f32, tmp_path):
    spec = write_spec(tmp_path / "spec.yaml", f"merge_method: task_arithmetic\nmodels:\n"
                                              f"  - model: {models_f32}/ft-a\n    parameters: {{weight: 1}}\n")
    check(cli("run", spec, "-o", tmp_path / "out"), 2,
          f"error: {spec}: base_model: task_arithmetic needs a base_model\n"
          "Hint: add base_model: <the model the others were fine-tuned from>")


def test_not_yaml_and_not_a_mapping(cli, tmp_path):
    spec = write_spec(tmp_path / "spec.yaml", "merge_method: [linear\n")
    result = cli("run", spec, "-o", tmp_path / "out")
    assert result.exit_code == 2 and result.stderr.startswith(f"error: {spec}: line 2, column 1: not valid YAML")
    spec = write_spec(tmp_path / "spec.yaml", "- just\n- a list\n")
    check(cli("run", spec, "-o", tmp_path / "out"), 2,
          f"error: {spec}: the spec must be a YAML mapping, got list\nHint: start from an example in merge_configs/")


def test_mixed_dtypes_need_an_explicit_dtype(cli, models_f32, models_bf16, tmp_path):
    spec = write_spec(tmp_path / "spec.yaml", f"merge_method: linear\nparameters: {{weight: 1}}\nmodels:\n"
                                              f"  - model: {models_f32}/ft-a\n  - model: {models_bf16}/ft-b\n")
    check(cli("run", spec, "-o", tmp_path / "out"), 1,
          "error: tensor 'model.embed_tokens.weight': models store this tensor as bfloat16 and float32\n"
          "Hint: set dtype: (e.g. dtype: bfloat16) in the spec to say which precision to merge in")
    result = cli("run", spec, "-o", tmp_path / "out", "--dtype", "bfloat16", "--quiet")
    assert result.exit_code == 0, result.output


def test_pickle_checkpoints_are_refused(cli, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    torch.save({"w": torch.zeros(2)}, folder / "pytorch_model.bin")
    spec = write_spec(tmp_path / "spec.yaml", f"merge_method: linear\nmodels:\n  - model: {folder}\n"
                                              "    parameters: {weight: 1}\n")
    check(cli("run", spec, "-o", tmp_path / "out"), 1,
          f"error: {folder}: models[0].model: only pickle checkpoints found (pytorch_model.bin); they are refused "
          "because loading a pickle can run arbitrary code\nHint: use a safetensors version of the model, or, if you "
          "trust its source, pass --allow-pickle (loads tensors only, with torch.load(weights_only=True), which "
          "refuses code)")


def test_debug_shows_the_traceback(cli, tmp_path):
    spec = write_spec(tmp_path / "spec.yaml", "merge_method: linear\n")
    import pytest

    from mergekit_lite.errors import SpecError

    with pytest.raises(SpecError):
        cli("run", spec, "-o", tmp_path / "out", "--debug")
