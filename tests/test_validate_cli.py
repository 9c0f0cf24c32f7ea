"""`merge validate` and `merge run`'s validation: messages, exit codes, and the JSON layout docs/validation.md documents."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from helpers.models import write_spec
from helpers.validation_specs import LINEAR

from mergekit_lite import run_merge

REPO = Path(__file__).parent.parent
VALIDATION_DOC = REPO / "docs" / "validation.md"


def merged(root: Path, out: Path) -> Path:
    run_merge(LINEAR.format(root=root), out, progress=False, validate=False, max_shard_size="60kB")
    return out


def break_lm_head(out: Path) -> None:
    from mergekit_lite.validation.folder import read_output

    info = read_output(str(out)).tensors["lm_head.weight"]
    with open(info.path, "r+b") as f:
        f.seek(info.start)
        f.write(b"\x00" * 8)


def progress_only(stderr: str) -> bool:
    """Nothing on stderr but the validation's progress bar (tests/test_validate_ux.py)."""
    return all(not line.strip() or line.startswith(("validating", "validated"))
               for line in stderr.replace("\r", "\n").splitlines())


def test_validate_prints_the_report(cli, models_f32, tmp_path):
    out = merged(models_f32, tmp_path / "out")
    result = cli("validate", out, "--device", "cpu")
    assert result.exit_code == 0 and progress_only(result.stderr)
    lines = result.stdout.splitlines()
    assert re.fullmatch(rf"Validation of {re.escape(str(out))} on cpu: PASSED \(\d+\.\d s\)", lines[0])
    assert [line.split()[:2] for line in lines[1:]] == [
        ["structure", "passed"], ["finite", "passed"], ["recompute", "passed"], ["forward", "passed"]]
    assert lines[3].startswith("  recompute  passed   21 of 39 tensors merged again from 3 source(s) on cpu: "
                               "bit-exact  (")


def test_validate_failure_exits_1_with_the_report(cli, models_f32, tmp_path):
    out = merged(models_f32, tmp_path / "out")
    break_lm_head(out)
    result = cli("validate", out, "--device", "cpu", "--full")
    assert result.exit_code == 1 and progress_only(result.stderr)
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"Validation of {out} on cpu: FAILED (")
    recompute = next(i for i, line in enumerate(lines) if line.startswith("  recompute"))
    assert lines[recompute].startswith("  recompute  failed   1 problem  (")
    assert re.fullmatch(r"      model-\d{5}-of-\d{5}\.safetensors: tensor 'lm_head\.weight': differs from the "
                        r"merge recomputed from the sources: 2 of 16384 values, up to .* ulp of float32 "
                        r"\(tolerance 0\) at \[0, [01]\]", lines[recompute + 1])


def test_validate_quiet_prints_nothing_when_it_passes(cli, models_f32, tmp_path):
    out = merged(models_f32, tmp_path / "out")
    result = cli("validate", out, "--device", "cpu", "--quiet")
    assert result.exit_code == 0 and result.output == ""


def test_validate_errors(cli, tmp_path):
    result = cli("validate", tmp_path / "nope")
    assert result.exit_code == 1
    assert result.stderr == (f"error: {tmp_path}/nope: output folder not found\n"
                             "Hint: give the folder `merge run` wrote (it holds config.json)\n")
    (tmp_path / "out").mkdir()
    result = cli("validate", tmp_path / "out", "--spec", tmp_path / "missing.yaml")
    assert result.exit_code == 2
    assert result.stderr == (f"error: {tmp_path}/missing.yaml: cannot read the spec: No such file or directory\n"
                             "Hint: check the path of the YAML file\n")
    if not torch.cuda.is_available():
        result = cli("validate", tmp_path / "out", "--device", "cuda")
        assert result.exit_code == 2
        assert result.stderr == ("error: --device: CUDA was asked for but is not available\n"
                                 "Hint: use --device auto (CUDA when present, else CPU) or --device cpu\n")


# ---------------------------------------------------------------------------------------------------------
# The JSON report: field names and types are a contract (README: "merge validate --json")

FINDING = {"tensor": (str, type(None)), "file": (str, type(None)), "message": str}
CHECK = {"name": str, "status": str, "summary": str, "seconds": float, "numbers": dict, "failures": list,
         "failures_total": int}
REPORT = {"schema": int, "path": str, "passed": bool, "verdict": str, "exit_code": int, "device": str,
          "spec": (str, type(None)), "sources_from": (dict, type(None)), "full": bool, "seconds": float,
          "checks": list}
OPTIONAL_FLOAT = (float, type(None))
NUMBERS = {
    "structure": {"files": int, "tensors": int, "bytes": int, "planned_tensors": (int, type(None)),
                  "config_rules": int},
    "finite": {"tensors": int, "values": int, "nan": int, "inf": int, "tensors_nonfinite": int, "chunk_bytes": int,
               "tensors_counted_by_forward": int},
    "recompute": {"tensors": int, "planned": int, "full": bool, "bit_exact": int, "max_ulp": OPTIONAL_FLOAT,
                  "tolerance_ulp": (int, type(None)), "merged_on": (str, type(None)), "sources": int,
                  "other_tool": (str, type(None)), "computed_in": (str, type(None))},
    "forward": {"prompts": int, "tokens": int, "token_source": (str, type(None)), "logits_finite": (bool, type(None)),
                "merged_loss": OPTIONAL_FLOAT, "inputs": list, "compared_with": (str, type(None)),
                "max_logit_diff": OPTIONAL_FLOAT, "logit_tolerance": OPTIONAL_FLOAT},
}
INPUT_LOSS = {"model": str, "loss": OPTIONAL_FLOAT, "note": (str, type(None))}


def assert_layout(value: dict, layout: dict, where: str) -> None:
    assert list(value) == list(layout), where
    for key, types in layout.items():
        assert isinstance(value[key], types) and not (types is int and isinstance(value[key], bool)), \
            f"{where}.{key}: {value[key]!r}"


def assert_report_layout(report: dict) -> None:
    assert_layout(report, REPORT, "report")
    assert report["schema"] == 2
    assert (report["verdict"], report["exit_code"]) in (("passed", 0), ("failed", 1), ("not_checked", 3))
    assert report["passed"] == (report["verdict"] == "passed")
    if report["sources_from"] is not None:
        assert list(report["sources_from"]) == ["folder", "reason"]
    assert [c["name"] for c in report["checks"]] == ["structure", "finite", "recompute", "forward"]
    for check in report["checks"]:
        assert_layout(check, CHECK, check["name"])
        assert check["status"] in ("passed", "failed", "not_checked", "not_applicable")
        assert_layout(check["numbers"], NUMBERS[check["name"]], f"{check['name']}.numbers")
        for finding in check["failures"]:
            assert_layout(finding, FINDING, f"{check['name']}.failures[]")
        assert check["failures_total"] == len(check["failures"]) and (check["status"] == "failed") == bool(
            check["failures"])
    for entry in report["checks"][3]["numbers"]["inputs"]:
        assert_layout(entry, INPUT_LOSS, "forward.numbers.inputs[]")


def test_json_layout_is_stable(cli, models_f32, tmp_path):
    out = merged(models_f32, tmp_path / "out")
    passing = cli("validate", out, "--device", "cpu", "--json")
    assert passing.exit_code == 0
    report = json.loads(passing.stdout)
    assert_report_layout(report)
    assert report["passed"] is True and report["path"] == str(out) and report["spec"] == str(
        out / "mergekit_config.yml")
    break_lm_head(out)
    (out / "mergekit_config.yml").rename(tmp_path / "spec.yaml")
    failing = cli("validate", out, "--device", "cpu", "--json", "--spec", tmp_path / "spec.yaml")
    assert failing.exit_code == 1
    report = json.loads(failing.stdout)
    assert_report_layout(report)
    assert report["passed"] is False and report["spec"] == str(tmp_path / "spec.yaml")
    recompute = report["checks"][2]
    assert recompute["failures"][0]["tensor"] == "lm_head.weight"
    assert recompute["failures"][0]["file"].endswith(".safetensors")


def test_readme_documents_every_json_field():
    text = VALIDATION_DOC.read_text()
    section = text[text.index("<!-- validate-json -->"):text.index("<!-- /validate-json -->")]
    documented = {word for span in re.findall(r"`([^`]+)`", section) for word in re.findall(r"[a-z_]+", span)}
    fields = set(REPORT) | set(CHECK) | set(FINDING) | set(INPUT_LOSS)
    fields |= {key for numbers in NUMBERS.values() for key in numbers}
    assert fields <= documented, sorted(fields - documented)


# ---------------------------------------------------------------------------------------------------------
# merge run validates by default


def test_run_prints_a_verdict(cli, models_f32, tmp_path):
    spec = write_spec(tmp_path / "spec.yaml", LINEAR.format(root=models_f32))
    result = cli("run", spec, "-o", tmp_path / "out", "--device", "cpu")
    assert result.exit_code == 0
    last = result.stdout.splitlines()[-1]
    assert re.fullmatch(r"Validation passed on cpu in \d+\.\d s: structure \d+\.\d s, finite \d+\.\d s, recompute "
                        r"\d+\.\d s \(21/39 tensors bit-exact\), forward \d+\.\d s \(loss \d\.\d{3}\)", last), last
    # the inputs differ, so they are not run after a merge (their losses are context: `merge validate`)
    assert (tmp_path / "out" / "merge_run.json").exists()
    skipped = cli("run", spec, "-o", tmp_path / "out2", "--no-validate")
    assert skipped.exit_code == 0 and "Validation" not in skipped.stdout


def test_run_fails_when_the_written_output_is_wrong(cli, models_f32, tmp_path, monkeypatch):
    """A bug between the merge and the disk (here: the writer corrupts lm_head) fails `merge run`."""
    from mergekit_lite.output import writer

    original = writer.ShardWriter.write

    def corrupting(self, name, tensor, rows=None, **options):
        original(self, name, tensor * 1.001 if name == "lm_head.weight" else tensor, rows, **options)

    monkeypatch.setattr(writer.ShardWriter, "write", corrupting)
    spec = write_spec(tmp_path / "spec.yaml", LINEAR.format(root=models_f32))
    out = tmp_path / "out"
    result = cli("run", spec, "-o", out, "--device", "cpu")
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1] == (   # after the progress bars (the validation's is cleared: \r)
        f"error: validation failed; the output was written and stays in {out} for inspection")
    assert "tensor 'lm_head.weight': differs from the merge recomputed from the sources" in result.stdout
    assert (out / "config.json").exists()


def test_run_merge_returns_the_report(models_f32, tmp_path):
    result = run_merge(LINEAR.format(root=models_f32), tmp_path / "out", progress=False, device="cpu")
    assert result.validation is not None and result.validation.passed
    assert result.validation.path == str(tmp_path / "out") and result.validation.spec == "given"
    assert run_merge(LINEAR.format(root=models_f32), tmp_path / "o2", progress=False, validate=False).validation \
        is None
    assert run_merge(LINEAR.format(root=models_f32), tmp_path / "o3", dry_run=True).validation is None


@pytest.mark.parametrize("forward", [True, False])
def test_forward_can_be_left_out(models_f32, tmp_path, forward):
    from mergekit_lite import validate

    out = merged(models_f32, tmp_path / "out")
    check = validate(out, device="cpu", forward=forward).check("forward")
    assert (check.status, check.summary == "not requested") == (
        ("passed", False) if forward else ("not_applicable", True))


def readme_blocks(language: str) -> list[str]:
    text = VALIDATION_DOC.read_text()
    section = text[:text.index("## The JSON report")]
    return re.findall(rf"```{language}\n(.*?)```", section, re.S)


def test_readme_snippets_run(cli, tmp_path, monkeypatch, capsys):
    import shlex
    import shutil

    from mergekit_lite.testing.synthetic import LlamaShape, write_demo_models

    write_demo_models(str(tmp_path / "demo" / "models"), LlamaShape(), max_shard_size=60_000)
    shutil.copytree(REPO / "merge_configs", tmp_path / "merge_configs")
    shutil.copy(tmp_path / "merge_configs" / "demo.yaml", tmp_path / "other.yaml")
    monkeypatch.chdir(tmp_path)
    assert cli("run", "merge_configs/demo.yaml", "-o", "demo/merged", "--device", "cpu").exit_code == 0
    commands = [shlex.split(line, comments=True) for line in readme_blocks("bash")[0].splitlines()]
    assert len(commands) == 4
    for words in commands:
        assert words[:2] == ["merge", "validate"]
        if "cuda" in words and not torch.cuda.is_available():
            continue
        result = cli(*words[1:])
        assert result.exit_code == 0, result.output
    (python,) = readme_blocks("python")
    exec(compile(python, "docs/validation.md", "exec"), {})
    assert "Validation of " in capsys.readouterr().out


def test_forward_is_not_checked_without_transformers_or_memory(models_f32, tmp_path, monkeypatch):
    import sys

    from mergekit_lite import validate

    out = merged(models_f32, tmp_path / "out")
    monkeypatch.setitem(sys.modules, "transformers", None)     # as if not installed
    report = validate(out, device="cpu")
    assert report.status == "not_checked" and report.check("forward").summary == (
        "transformers is not installed: pip install 'mergekit-lite[validate]'")
    assert report.verdict().endswith(", forward NOT CHECKED (transformers is not installed: pip install "
                                     "'mergekit-lite[validate]')")
