"""Validation as a user meets it: a progress bar naming the running check, outputs of other tools judged by how
they compute (mergekit in bfloat16), `merge fold --no-validate`."""

from __future__ import annotations

import pytest
import torch
from helpers.validation_specs import TASK_ARITHMETIC

from mergekit_lite import validate
from mergekit_lite.validation.folder import read_output

BF16 = TASK_ARITHMETIC + "dtype: bfloat16\n"


@pytest.fixture(scope="module")
def mergekit_bf16(models_bf16, tmp_path_factory):
    """mergekit's output of a task arithmetic spec it computes in bfloat16 (its mergekit_config.yml, no
    merge_run.json): independent of this tool, and rounded differently than our float32 arithmetic."""
    from helpers.mergekit_oracle import run_mergekit

    spec = BF16.format(root=models_bf16)
    out = run_mergekit(spec, tmp_path_factory.mktemp("mk") / "out")
    (out / "mergekit_config.yml").write_text(spec)
    return out


def test_mergekit_bf16_output_passes_within_its_rounding(mergekit_bf16):
    report = validate(mergekit_bf16, device="cpu", forward=False)
    recompute = report.check("recompute")
    assert recompute.status == "passed", str(report)
    numbers = recompute.numbers
    # It did differ by more than 1 ulp (the old rule failed it), and the report says why that is expected.
    assert numbers["max_ulp"] > 1 and numbers["bit_exact"] < numbers["tensors"]
    assert (numbers["other_tool"], numbers["computed_in"]) == ("mergekit", "bfloat16")
    assert "computed by mergekit in bfloat16, differences up to" in recompute.summary


def test_mergekit_bf16_output_with_a_wrong_tensor_still_fails(mergekit_bf16, tmp_path):
    import shutil

    out = tmp_path / "broken"
    shutil.copytree(mergekit_bf16, out)
    info = read_output(str(out)).tensors["model.norm.weight"]
    with open(info.path, "r+b") as f:   # the first value becomes 2.0 (bfloat16 0x4000): far outside any rounding
        f.seek(info.start)
        f.write(torch.tensor([2.0], dtype=torch.bfloat16).view(torch.uint8).numpy().tobytes())
    recompute = validate(out, device="cpu", forward=False).check("recompute")
    assert recompute.status == "failed"
    assert [f.tensor for f in recompute.failures] == ["model.norm.weight"]


def test_own_outputs_keep_the_bit_exact_rule(models_bf16, tmp_path):
    from mergekit_lite import run_merge

    out = tmp_path / "ours"
    run_merge(BF16.format(root=models_bf16), out, progress=False, validate=False)
    numbers = validate(out, device="cpu", forward=False).check("recompute").numbers
    assert numbers["tolerance_ulp"] == 0 and numbers["bit_exact"] == numbers["tensors"]
    assert numbers["other_tool"] is None and numbers["computed_in"] is None


def test_validate_shows_which_check_runs(cli, mergekit_bf16, capsys):
    result = cli("validate", mergekit_bf16, "--device", "cpu")
    assert "validating" in result.stderr and "4/4 checks" in result.stderr, result.stderr
    assert result.stdout.startswith(f"Validation of {mergekit_bf16} on cpu: ")
    quiet = cli("validate", mergekit_bf16, "--device", "cpu", "--quiet")
    assert "validating" not in quiet.stderr
    as_json = cli("validate", mergekit_bf16, "--device", "cpu", "--json")
    assert "validating" not in as_json.stderr


def test_fold_no_validate(cli, models_f32, tmp_path):
    from helpers.models import SHAPE

    from mergekit_lite.testing.adapters import write_adapter

    adapter = write_adapter(str(tmp_path / "adapter"), SHAPE)
    folded = cli("fold", models_f32 / "base", adapter, "-o", tmp_path / "out", "--no-validate", "--device", "cpu")
    assert folded.exit_code == 0, folded.output
    assert folded.stdout.startswith("Folded") and "Validation" not in folded.output
    validated = cli("fold", models_f32 / "base", adapter, "-o", tmp_path / "out2", "--device", "cpu")
    assert validated.exit_code == 0 and "Validation" in validated.stdout, validated.output


def test_mergekit_output_of_a_random_method_is_not_checked_not_failed(models_f32, tmp_path):
    from helpers.mergekit_oracle import run_mergekit

    spec = (f"merge_method: dare_linear\nbase_model: {models_f32}/base\nmodels:\n"
            f"  - model: {models_f32}/ft-a\n    parameters: {{weight: 0.5, density: 0.5}}\n"
            f"  - model: {models_f32}/ft-b\n    parameters: {{weight: 0.5, density: 0.5}}\ndtype: float32\n")
    out = run_mergekit(spec, tmp_path / "out", seed=0)
    (out / "mergekit_config.yml").write_text(spec)
    report = validate(out, device="cpu", forward=False)
    recompute = report.check("recompute")
    assert (report.status, recompute.status) == ("not_checked", "not_checked"), str(report)
    assert "mergekit draws them with another generator" in recompute.summary
