"""Validation of adapter folders (`merge extract`, `merge adapters`, `output: adapter`): it passes every correct
output, and it fails a corrupted copy where it should, naming the tensor.

Correct outputs: extractions of a tiny sharded Llama (default: embeddings saved whole in modules_to_save;
--sv-epsilon with a rank_pattern, --embed-lora and the seeded randomized SVD), and combinations of synthetic
adapters (cat, svd, dare_ties with its seed, an output: adapter spec). Corrupted copies are written with
safetensors' own writer: one lora_B value moved by 1e-3 (recompute fails), a NaN (finite fails), a lora_A left
out (structure fails). A source that is gone leaves recompute NOT CHECKED (exit 3), never passed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from helpers.models import SHARD
from safetensors.torch import load_file, save_file

from mergekit_lite.testing.adapters import AdapterShape, write_adapter
from mergekit_lite.testing.synthetic import LlamaShape, write_model
from mergekit_lite.validation import validate

SHAPE = LlamaShape(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=256)
WEIGHTS = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("validate_adapter")
    write_model(str(root / "base"), SHAPE, seed=0, max_shard_size=SHARD)
    write_model(str(root / "ft"), SHAPE, seed=0, delta_seed=1, delta_scale=0.01, max_shard_size=SHARD)
    for name, seed, targets, r in (("a", 1, ("q_proj", "v_proj"), 8), ("b", 2, ("q_proj", "v_proj", "down_proj"), 4),
                                   ("c", 3, ("q_proj", "v_proj"), 8)):
        write_adapter(str(root / name), SHAPE, AdapterShape(targets, r=r, lora_alpha=2 * r), seed=seed,
                      base_model=str(root / "base"))
    return root


@pytest.fixture(scope="module")
def extracted(root) -> Path:
    """The default extraction, validated by the command itself (its verdict line)."""
    from click.testing import CliRunner

    from mergekit_lite.cli import cli as group

    result = CliRunner().invoke(group, ["extract", "--model", str(root / "ft"), "--base-model", str(root / "base"),
                                        "-o", str(root / "x"), "--max-rank", "8"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "Validation passed on cpu" in result.output and "recompute" in result.output, result.output
    return root / "x"


def passed_fully(folder: Path) -> dict:
    report = validate(folder, full=True)
    assert report.status == "passed", str(report)
    recompute = report.check("recompute").numbers
    assert recompute["tensors"] == recompute["planned"] == recompute["bit_exact"] > 0, str(report)
    assert report.check("forward").status == "not_applicable"
    return recompute


def test_extractions_pass(cli, root, extracted):
    assert passed_fully(extracted)["command"] == "extract"
    config = json.loads((extracted / "adapter_config.json").read_text())
    assert config["modules_to_save"]   # the embeddings (and norms), saved whole
    out = root / "eps"
    result = cli("extract", "--model", root / "ft", "--base-model", root / "base", "-o", out, "--max-rank", "16",
                 "--sv-epsilon", "0.12", "--embed-lora", "--svd", "randomized", "-q")
    assert result.exit_code == 0, result.output
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["rank_pattern"] and len(set(config["rank_pattern"].values())) > 1, config   # ranks per module
    assert any(k.endswith("lora_embedding_A") for k in load_file(out / WEIGHTS))
    passed_fully(out)


def test_combinations_pass(cli, root):
    a, b, c = root / "a", root / "b", root / "c"
    for method, sources, extra in (("cat", (a, b), ()), ("svd", (a, b), ("--rank", "6")),
                                   ("dare_ties", (a, c), ("--density", "0.5", "--seed", "7"))):
        result = cli("adapters", *sources, "-o", root / method, "--method", method, "--weights", "0.7,0.4", *extra)
        assert result.exit_code == 0, result.output
        assert "Validation passed on cpu" in result.output, result.output
        assert passed_fully(root / method)["command"] == "adapters"
    spec = root / "spec.yaml"
    spec.write_text(f"merge_method: task_arithmetic\noutput: adapter\nparameters: {{lambda: 0.5}}\nmodels:\n"
                    f"  - model: {root / 'base'}+{a}\n  - model: {root / 'base'}+{b}\n")
    result = cli("run", spec, "-o", root / "spec_out")
    assert result.exit_code == 0 and "Validation passed" in result.output, result.output
    passed_fully(root / "spec_out")


def corrupted(source: Path, target: Path, change) -> Path:
    """A copy of the adapter folder with its tensors rewritten by ``change(tensors)``."""
    shutil.copytree(source, target)
    tensors = load_file(source / WEIGHTS)
    change(tensors)
    os.remove(target / WEIGHTS)
    save_file(tensors, target / WEIGHTS, metadata={"format": "pt"})
    return target


def largest_module(tensors: dict) -> str:
    downs = [k for k in tensors if k.endswith(".lora_A.weight")]
    return max(downs, key=lambda k: tensors[k].numel() + tensors[k.replace("lora_A", "lora_B")].numel())


def test_a_moved_value_fails_recompute(cli, root, extracted, tmp_path):
    tensors = load_file(extracted / WEIGHTS)
    up = largest_module(tensors).replace("lora_A", "lora_B")   # the largest module is always in the sample

    def move(t):
        t[up] = t[up].clone()
        t[up][3, 1] += 1e-3
    folder = corrupted(extracted, tmp_path / "moved", move)
    result = cli("validate", folder)
    assert result.exit_code == 1, result.output
    assert f"tensor '{up}': differs from the recomputed value: 1 of" in result.output, result.output
    report = validate(folder)
    assert [c.status for c in report.checks] == ["passed", "passed", "failed", "not_applicable"]


def test_a_nan_fails_finite(cli, extracted, tmp_path):
    tensors = load_file(extracted / WEIGHTS)
    down = sorted(k for k in tensors if k.endswith(".lora_A.weight"))[0]

    def poison(t):
        t[down] = t[down].clone()
        t[down][0, 2] = float("nan")
    report = validate(corrupted(extracted, tmp_path / "nan", poison), full=True)
    assert report.check("finite").status == "failed" and report.exit_code == 1
    assert report.check("finite").failures[0].tensor == down
    assert "1 NaN, the first at [0, 2]" in report.check("finite").failures[0].message


def test_a_missing_lora_a_fails_structure(cli, extracted, tmp_path):
    tensors = load_file(extracted / WEIGHTS)
    down = sorted(k for k in tensors if k.endswith(".lora_A.weight"))[-1]
    module = down[len("base_model.model."):-len(".lora_A.weight")]
    folder = corrupted(extracted, tmp_path / "no_a", lambda t: t.pop(down))
    result = cli("validate", folder)
    assert result.exit_code == 1, result.output
    assert f"module '{module}' has no lora_A" in result.output, result.output
    assert validate(folder).check("structure").status == "failed"


def test_a_rank_against_the_config_fails_structure(extracted, tmp_path):
    folder = tmp_path / "rank"
    shutil.copytree(extracted, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["r"] = config["lora_alpha"] = 4
    (folder / "adapter_config.json").write_text(json.dumps(config))
    structure = validate(folder).check("structure")
    assert structure.status == "failed" and "but the config gives module" in structure.failures[0].message


def test_a_missing_source_is_not_checked(cli, root, extracted):
    os.rename(root / "ft", root / "ft.away")
    try:
        result = cli("validate", extracted)
    finally:
        os.rename(root / "ft.away", root / "ft")
    assert result.exit_code == 3, result.output
    assert "recompute  NOT CHECKED" in result.output and "is not there" in result.output, result.output


def test_a_missing_adapter_or_record_is_not_checked(cli, root, tmp_path):
    a, c = tmp_path / "a", tmp_path / "c"
    shutil.copytree(root / "a", a)
    shutil.copytree(root / "c", c)
    assert cli("adapters", a, c, "-o", tmp_path / "lin", "--method", "linear", "-q").exit_code == 0
    shutil.rmtree(c)
    result = cli("validate", tmp_path / "lin")
    assert result.exit_code == 3 and "NOT CHECKED" in result.output and str(c) in result.output, result.output
    os.remove(tmp_path / "lin" / "adapter_record.json")
    report = validate(tmp_path / "lin")
    assert report.check("recompute").status == "not_checked" and "no adapter_record.json" in str(report)
    assert report.check("structure").status == report.check("finite").status == "passed"


def test_library_raises_validation_failed_and_no_validate(root, tmp_path, monkeypatch):
    """A writer that moves what it writes (a bug) is caught: ValidationFailed, the folder stays."""
    from mergekit_lite import extract_lora
    from mergekit_lite.api.merge import ValidationFailed
    from mergekit_lite.output.adapter_file import AdapterFile

    result = extract_lora(root / "ft", root / "base", tmp_path / "fine", max_rank=4, validate=False)
    assert result.validation is None
    original = AdapterFile.write

    def skewed(self, name, tensor):
        original(self, name, tensor * 1.001 if name.endswith("lora_B.weight") else tensor)
    monkeypatch.setattr(AdapterFile, "write", skewed)
    with pytest.raises(ValidationFailed) as caught:
        extract_lora(root / "ft", root / "base", tmp_path / "bad", max_rank=4)
    assert caught.value.report.check("recompute").status == "failed"
    assert (tmp_path / "bad" / WEIGHTS).exists()


def test_another_device_type_compares_the_products(cli, extracted, tmp_path):
    """An extraction recorded as run on another device type: its SVD factors may differ in sign, so recompute
    compares B @ A within the stated tolerance (here the same CPU factors: error 0). --spec is refused."""
    folder = tmp_path / "cuda"
    shutil.copytree(extracted, folder)
    record = json.loads((folder / "adapter_record.json").read_text())
    (folder / "adapter_record.json").write_text(json.dumps({**record, "device": "cuda"}))
    recompute = validate(folder).check("recompute")
    assert recompute.status == "passed" and "B @ A within 1e-04" in recompute.summary, recompute
    assert recompute.numbers["max_rel_error"] == 0.0 and recompute.numbers["bit_exact"] == 0
    result = cli("validate", folder, "--spec", folder / "adapter_config.json")
    assert result.exit_code == 2 and "error: --spec: " in result.stderr, result.output
