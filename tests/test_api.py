"""The library: load_spec / run_merge from a notebook, custom strategies, dry runs, the output lifecycle."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.models import read_folder, write_spec

from mergekit_lite import MergeResult, Param, Strategy, load_spec, run_merge
from mergekit_lite.errors import SpecError
from mergekit_lite.strategy import TensorContext


def spec_dict(root, **extra):
    return {"merge_method": "linear",
            "models": [{"model": str(root / "ft-a"), "parameters": {"weight": 1.0}},
                       {"model": str(root / "ft-b"), "parameters": {"weight": 1.0}}], **extra}


def test_run_merge_accepts_dict_yaml_text_path_and_spec(models_f32, tmp_path):
    as_dict = spec_dict(models_f32)
    path = write_spec(tmp_path / "spec.yaml", json.dumps(as_dict))  # JSON is YAML
    outputs = []
    for i, spec in enumerate([as_dict, path.read_text(), str(path), path, load_spec(path)]):
        result = run_merge(spec, tmp_path / f"out{i}", progress=False)
        assert isinstance(result, MergeResult) and result.path == str(tmp_path / f"out{i}")
        assert result.tensors == 39 and result.bytes > 0 and result.seconds >= 0
        outputs.append(read_folder(tmp_path / f"out{i}"))
    assert all(all(torch.equal(o[k], outputs[0][k]) for k in o) for o in outputs[1:])
    spec_text = (tmp_path / "out3" / "mergekit_config.yml").read_text()
    assert spec_text == path.read_text().rstrip() + "\n"


def test_dry_run_writes_nothing(models_f32, tmp_path):
    result = run_merge(spec_dict(models_f32), tmp_path / "out", dry_run=True, max_shard_size="50kB")
    assert result.dry_run and result.tensors == 39 and not (tmp_path / "out").exists()
    assert not (tmp_path / "out.partial").exists()
    assert "shard(s) of at most 50.00 kB" in result.summary and "weight=(1, 1)" in result.summary


def test_dry_run_cli_prints_the_plan(cli, models_f32, tmp_path):
    spec = write_spec(tmp_path / "spec.yaml", json.dumps(spec_dict(models_f32)))
    result = cli("run", spec, "-o", tmp_path / "out", "--dry-run")
    assert result.exit_code == 0
    assert "method: linear (Linear (model soup))" in result.stdout
    assert "output: " in result.stdout and "39 tensors" in result.stdout
    assert result.stdout.rstrip().endswith("dry run: everything checked, nothing written")
    assert not (tmp_path / "out").exists()


def test_output_folder_contents(models_f32, tmp_path):
    out = tmp_path / "merged"
    run_merge(spec_dict(models_f32, dtype="bfloat16"), out, progress=False, max_shard_size="40kB")
    names = sorted(p.name for p in out.iterdir())
    shards = [n for n in names if n.endswith(".safetensors")]
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    for required in ("config.json", "model.safetensors.index.json", "README.md", "mergekit_config.yml",
                     "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert required in names
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and config["num_hidden_layers"] == 4
    card = (out / "README.md").read_text()
    front = card.split("---\n")[1]
    assert "library_name: transformers" in front and "- merge" in front
    assert "base_model" not in front  # local paths are never listed as Hub base models
    assert "[Linear (model soup)](https://arxiv.org/abs/2203.05482)" in card
    assert not (tmp_path / "merged.partial").exists()


def test_card_lists_hub_ids_only():
    from mergekit_lite.output.card import card_text
    from mergekit_lite.spec.references import ModelPath

    text = card_text("m", "Linear", None, [ModelPath("org/a", "v1"), ModelPath("./local")], ModelPath("org/base"),
                     "merge_method: linear")
    front = text.split("---\n")[1]
    assert "base_model:\n- org/base\n- org/a\nbase_model_relation: merge" in front
    assert "revision `v1`" in text and "`./local` (local)" in text


def test_custom_strategy_passed_programmatically(models_f32, tmp_path):
    """A strategy that is not built in: declared parameters are validated and resolved like any other."""

    def elementwise_max(inputs, base, ctx: TensorContext, *, scale: float):
        return torch.stack(list(inputs)).amax(dim=0) * scale

    strategy = Strategy(name="max", fn=elementwise_max, title="Element-wise max", summary="max of the inputs",
                        base="input", params=(Param("scale", float, "multiplies the result", default=1.0, min=0),))
    spec = {"merge_method": "max", "models": [{"model": str(models_f32 / n)} for n in ("ft-a", "ft-b")],
            "parameters": {"scale": [1.0, 2.0]}}
    run_merge(spec, tmp_path / "out", strategies=[strategy], progress=False)
    got = read_folder(tmp_path / "out")
    a, b = read_folder(models_f32 / "ft-a"), read_folder(models_f32 / "ft-b")
    name = "model.layers.3.mlp.up_proj.weight"  # last layer: gradient gives scale 2.0
    assert torch.equal(got[name], torch.maximum(a[name], b[name]) * 2.0)
    with pytest.raises(SpecError, match=r"parameters.scale\[0\]: scale = -1 is outside \[0, inf\]"):
        run_merge({**spec, "parameters": {"scale": [-1, 2]}}, tmp_path / "bad", strategies=[strategy])


def test_generator_is_stable_per_tensor():
    one = TensorContext("model.layers.0.mlp.up_proj.weight", 0, 0.0, seed=7)
    same = TensorContext("model.layers.0.mlp.up_proj.weight", 0, 0.0, seed=7)
    other = TensorContext("model.layers.1.mlp.up_proj.weight", 1, 0.5, seed=7)
    draw = lambda ctx: torch.rand(5, generator=ctx.generator())  # noqa: E731
    assert torch.equal(draw(one), draw(same)) and not torch.equal(draw(one), draw(other))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))])
def test_device_gives_the_same_bytes(models_f32, tmp_path, device):
    run_merge(spec_dict(models_f32), tmp_path / "ref", device="cpu", progress=False)
    run_merge(spec_dict(models_f32), tmp_path / "dev", device=device, progress=False)
    ref, dev = read_folder(tmp_path / "ref"), read_folder(tmp_path / "dev")
    assert all(torch.equal(ref[k], dev[k]) for k in ref)


def test_sizes():
    from mergekit_lite.units import parse_size

    assert parse_size("5GB") == 5 * 10**9 and parse_size("500MB") == 5 * 10**8
    assert parse_size("2GiB") == 2 * 2**30 and parse_size("1.5e3") == 1500 and parse_size(42) == 42
    for bad in ("five", "5XB", "-1", "0"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_bad_shard_size_is_a_usage_error(cli, models_f32, tmp_path):
    spec = write_spec(tmp_path / "spec.yaml", json.dumps(spec_dict(models_f32)))
    result = cli("run", spec, "-o", tmp_path / "out", "--max-shard-size", "lots")
    assert result.exit_code == 2
    assert result.stderr == ("error: --max-shard-size: 'lots' is not a size; write a number of bytes with an "
                             "optional unit, e.g. 5GB, 500MB or 2GiB\n")


def test_methods_lists_declarations(cli):
    result = cli("methods")
    assert result.exit_code == 0 and "linear" in result.stdout and "task_arithmetic" in result.stdout
    detail = cli("methods", "task_arithmetic")
    assert "paper: https://arxiv.org/abs/2212.04089" in detail.stdout
    assert "weight (float, per model, not for the base, required, range [-inf, inf])" in detail.stdout
    assert "lambda (float, per merge, default 1, range [-inf, inf])" in detail.stdout
