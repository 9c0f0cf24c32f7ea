"""Validation never passes vacuously: each check ends passed, failed, not checked (with the reason) or not
applicable, and a check that could not run, or ran on nothing, never counts as passed.

Verdict: FAILED (exit 1) when a check failed, else NOT CHECKED (exit 3) when a check that applies could not
be carried out, else PASSED (exit 0). The harms reproduced here: an output whose every tensor was overwritten
passed when `merge validate` ran in another folder (its relative source paths did not resolve there, and the
skipped recomputation counted as passed), and the forward check unpickled a folder's pytorch_model.bin.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from helpers.hostile import hostile_pickle
from helpers.models import SHAPE, write_spec

from mergekit_lite import run_merge, validate
from mergekit_lite.testing.synthetic import write_model
from mergekit_lite.validation.folder import read_output

RELATIVE = """
merge_method: linear
models:
  - model: models/ft-a
    parameters: {weight: 0.5}
  - model: ./models/ft-b
    parameters: {weight: 0.5}
"""
NO_TRANSFORMERS = "transformers is not installed: pip install 'mergekit-lite[validate]'"


@pytest.fixture
def project(models_f32, tmp_path, monkeypatch) -> Path:
    """A merge run in proj/ with relative source paths (one of them shaped like a Hub id, as mergekit's
    examples write them); the test then runs in another folder, elsewhere/."""
    proj = tmp_path / "proj"
    for name in ("ft-a", "ft-b"):
        shutil.copytree(models_f32 / name, proj / "models" / name)
    write_spec(proj / "spec.yaml", RELATIVE)
    monkeypatch.chdir(proj)
    run_merge("spec.yaml", "out", progress=False, validate=False, max_shard_size="60kB")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    return proj


def overwrite_every_tensor(out: Path, value: float = 0.0) -> None:
    for info in read_output(str(out)).tensors.values():
        with open(info.path, "r+b") as f:
            f.seek(info.start)
            f.write(torch.full(info.shape, value, dtype=info.dtype).reshape(-1).view(torch.uint8).numpy().tobytes())


def statuses(report) -> dict[str, str]:
    return {check.name: check.status for check in report.checks}


def table(stdout: str) -> dict[str, str]:
    """`merge validate`'s table: check name -> "status  summary  (seconds)", columns unpadded."""
    rows = [re.fullmatch(r"  ([a-z]+) +(passed|failed|NOT CHECKED|not applicable) +(.*)", line)
            for line in stdout.splitlines()]
    return {row.group(1): f"{row.group(2)}  {row.group(3)}" for row in rows if row}


# ---------------------------------------------------------------------------------------------------------
# The issue: sources resolve as the run resolved them, from any folder


def test_overwritten_output_fails_from_another_folder(cli, project):
    out = project / "out"
    overwrite_every_tensor(out)
    result = cli("validate", out, "--device", "cpu")
    assert result.exit_code == 1, result.output
    assert result.stdout.splitlines()[0].startswith(f"Validation of {out} on cpu: FAILED (")
    rows = table(result.stdout)
    assert rows["recompute"].startswith("failed  21 problems  (")
    assert f"Relative source paths resolved from {project} (the folder `merge run` ran in, from merge_run.json)" \
        in result.stdout
    report = validate(out, device="cpu", forward=False)
    assert (report.status, report.exit_code, report.sources_from) == (
        "failed", 1, {"folder": str(project), "reason": "the folder `merge run` ran in, from merge_run.json"})


def test_the_run_record_names_the_folder_the_spec_ran_in(project):
    record = json.loads((project / "out" / "merge_run.json").read_text())
    assert record["working_dir"] == str(project)
    report = validate(project / "out", device="cpu", forward=False)     # the cwd is elsewhere/
    assert report.status == "passed" and report.check("recompute").numbers["bit_exact"] == 21


def test_missing_sources_are_not_checked_exit_3(cli, project):
    shutil.rmtree(project / "models" / "ft-b")
    result = cli("validate", project / "out", "--device", "cpu")
    assert result.exit_code == 3, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"Validation of {project / 'out'} on cpu: NOT CHECKED (")
    reason = (f"cannot plan the merge from the spec (models[1].model: model folder '{project}/models/ft-b' not "
              "found)")
    assert table(result.stdout)["recompute"].startswith(f"NOT CHECKED  {reason}  (")
    assert lines[-1] == ("Nothing failed, but not everything could be checked (recompute, forward): see the "
                         "reasons above. Exit code 3.")
    report = validate(project / "out", device="cpu")
    assert (report.status, report.passed, report.failed, report.exit_code) == ("not_checked", False, False, 3)
    assert report.check("recompute").summary == reason
    assert report.check("forward").status == "not_checked"     # ft-b cannot run: no claim about the comparison
    quiet = cli("validate", project / "out", "--device", "cpu", "--quiet")   # not a pass: the report is printed
    assert quiet.exit_code == 3 and quiet.stdout.splitlines()[-1] == lines[-1]


def test_an_old_record_falls_back_to_the_output_parent_and_says_so(project, monkeypatch):
    record_path = project / "out" / "merge_run.json"
    record = json.loads(record_path.read_text())
    del record["working_dir"]
    record_path.write_text(json.dumps(record))
    report = validate(project / "out", device="cpu", forward=False)      # from elsewhere/: not found there
    assert report.status == "passed"
    assert report.sources_from == {"folder": str(project), "reason": (
        "the output's parent folder: merge_run.json does not record where `merge run` ran, and the sources are "
        "not found from the current folder")}
    monkeypatch.chdir(project)
    report = validate(project / "out", device="cpu", forward=False)
    assert report.status == "passed" and report.sources_from == {
        "folder": str(project), "reason": "the current folder: merge_run.json does not record where `merge run` ran"}


def test_a_given_spec_resolves_from_the_current_folder(cli, project, tmp_path):
    """--spec is the user's file now: its relative paths mean what `merge run` would make of them here."""
    given = write_spec(tmp_path / "given.yaml", RELATIVE.replace("models/ft-a", "./models/ft-a"))
    result = cli("validate", project / "out", "--device", "cpu", "--spec", given)
    assert result.exit_code == 3, result.output
    assert table(result.stdout)["recompute"].startswith(
        "NOT CHECKED  cannot plan the merge from the spec (models[0].model: model folder './models/ft-a' not found)")
    assert f"Relative source paths resolved from {tmp_path / 'elsewhere'} (the current folder, as `merge run` " \
        "would resolve the given spec)" in result.stdout


# ---------------------------------------------------------------------------------------------------------
# What applies to which input


def test_a_plain_model_folder_says_what_it_could_not_check(cli, tmp_path):
    folder = write_model(str(tmp_path / "plain"), SHAPE)
    result = cli("validate", folder, "--device", "cpu")
    assert result.exit_code == 0, result.output
    rows = table(result.stdout)
    assert rows["recompute"].startswith(
        "not applicable  no merge record (no mergekit_config.yml or merge_run.json): the tensors were not "
        "compared with a merge; give --spec to compare them  (")
    assert rows["structure"].startswith("passed") and rows["finite"].startswith("passed")
    assert rows["forward"].startswith("passed")
    report = validate(folder, device="cpu")
    assert (report.status, report.exit_code) == ("passed", 0)
    assert report.check("recompute").status == "not_applicable"
    forward = report.check("forward")
    assert report.verdict().endswith(f", recompute not applicable (no merge record), forward {forward.seconds:.1f} s "
                                     f"(loss {forward.numbers['merged_loss']:.3f})")


def test_a_record_without_its_spec_is_not_checked(project):
    (project / "out" / "mergekit_config.yml").unlink()
    report = validate(project / "out", device="cpu", forward=False)
    assert report.status == "not_checked" and report.check("recompute").summary == (
        "the output has no mergekit_config.yml; pass the spec it was merged from (--spec)")


def test_an_unknown_method_is_not_checked(project):
    spec = project / "out" / "mergekit_config.yml"
    spec.write_text(spec.read_text().replace("merge_method: linear", "merge_method: my_plugin_method"))
    recompute = validate(project / "out", device="cpu", forward=False).check("recompute")
    assert recompute.status == "not_checked"
    assert recompute.summary.startswith("cannot plan the merge from the spec (merge_method: unknown merge method")


def test_a_tensor_that_cannot_be_recomputed_is_not_checked(project, monkeypatch):
    from mergekit_lite.errors import ModelError

    def unreadable(job, rows=None):
        raise ModelError("cannot read tensor: Input/output error", file="ft-a/model.safetensors")

    from mergekit_lite.engine import loop

    monkeypatch.setattr(loop, "read_sources", unreadable)    # the engine's reads, which recompute goes through
    monkeypatch.setattr(loop, "fetch_sources", unreadable)
    check = validate(project / "out", device="cpu", forward=False).check("recompute")
    assert (check.status, check.summary) == (
        "not_checked", "21 of 21 sampled tensors could not be recomputed (the first: 'model.embed_tokens.weight': "
        "cannot "
        "read tensor: Input/output error)")


def test_no_tensors_fails_structure_and_finite_ran_on_nothing(tmp_path):
    folder = Path(write_model(str(tmp_path / "empty"), SHAPE))
    for shard in folder.glob("*.safetensors"):
        shard.unlink()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {}}))
    report = validate(folder, device="cpu")
    assert report.status == "failed"
    assert [str(f) for f in report.check("structure").failures] == [
        "model.safetensors.index.json: the folder holds no tensors a loader would read"]
    assert (report.check("finite").status, report.check("finite").summary) == (
        "not_checked", "no tensors to scan")


def test_forward_not_requested_is_not_applicable(project):
    forward = validate(project / "out", device="cpu", forward=False).check("forward")
    assert (forward.status, forward.summary) == ("not_applicable", "not requested")


# ---------------------------------------------------------------------------------------------------------
# The forward check: what stops it is said, never passed


def test_without_transformers_validate_exits_3_and_run_says_not_checked(cli, project, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)     # as if not installed
    result = cli("validate", project / "out", "--device", "cpu")
    assert result.exit_code == 3
    assert table(result.stdout)["forward"].startswith(f"NOT CHECKED  {NO_TRANSFORMERS}  (")
    monkeypatch.chdir(project)
    ran = cli("run", "spec.yaml", "-o", project / "out2", "--device", "cpu")
    assert ran.exit_code == 0, ran.output            # the merge itself succeeded
    last = ran.stdout.splitlines()[-1]
    assert re.fullmatch(r"Validation NOT CHECKED on cpu in \d+\.\d s: structure \d+\.\d s, finite \d+\.\d s, "
                        r"recompute \d+\.\d s \(21/39 tensors bit-exact\), forward NOT CHECKED \("
                        + re.escape(NO_TRANSFORMERS) + r"\)", last)
    assert "passed" not in ran.stdout
    assert ran.stderr.endswith(f"warning: the output in {project / 'out2'} was written, but its validation could "
                               "not check everything (forward); `merge validate` says why\n")


def test_unknown_architecture_is_not_checked(tmp_path):
    folder = Path(write_model(str(tmp_path / "m"), SHAPE))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "nonesuch",
                                                    "architectures": ["NonesuchForCausalLM"]}))
    forward = validate(folder, device="cpu").check("forward")
    assert forward.status == "not_checked"
    assert forward.summary.startswith("transformers ") and forward.summary.endswith(
        " does not know model_type 'nonesuch'")


def test_a_model_that_cannot_stream_and_exceeds_the_bound_is_not_checked(project, monkeypatch):
    """Budgeted from the tensors, never from free memory: (inputs + 2) x largest float32 tensor + slack."""
    from mergekit_lite.validation import forward, streamed

    monkeypatch.setattr(streamed, "streamed_model", lambda *args, **kwargs: None)   # as if transformers converted its tensors
    monkeypatch.setattr(forward, "WHOLE_SLACK", 0)
    report = validate(project / "out", device="cpu")
    assert report.status == "not_checked" and report.check("forward").status == "not_checked"
    assert report.check("forward").summary.startswith(
        "the merged model: transformers converts its stored tensors while loading (beyond renaming them, or into "
        "stacked experts each larger than the bound below), so it cannot run layer by layer, and loading it whole "
        "in float32 needs about ")


def test_nonfinite_weights_allowed_leave_forward_not_checked(project):
    from mergekit_lite.validation.folder import read_output as read

    info = read(str(project / "out")).tensors["model.layers.1.mlp.up_proj.weight"]   # not in the sample
    with open(info.path, "r+b") as f:
        f.seek(info.start)
        f.write(torch.tensor([float("nan")]).numpy().tobytes())
    report = validate(project / "out", device="cpu", allow_nonfinite=True)
    assert statuses(report)["finite"] == "passed" and report.status == "not_checked"
    assert report.check("forward").summary == ("the weights hold 1 NaN/Inf values (--allow-nonfinite), so the "
                                               "logits would say nothing")


@pytest.fixture
def fold(models_f32, tmp_path):
    pytest.importorskip("peft")
    from mergekit_lite import fold_lora
    from mergekit_lite.testing.adapters import write_adapter

    adapter = write_adapter(str(tmp_path / "adapter"), SHAPE)
    out = tmp_path / "folded"
    fold_lora(models_f32 / "base", adapter, out, progress=False, validate=False)
    return out, Path(adapter)


def test_a_fold_whose_reference_cannot_run_is_not_checked(fold, monkeypatch):
    out, _ = fold
    assert validate(out, device="cpu").check("forward").numbers["compared_with"] is not None
    monkeypatch.setitem(sys.modules, "peft", None)            # the inference-time reference needs peft
    forward = validate(out, device="cpu").check("forward")
    assert forward.status == "not_checked" and forward.failures == []
    assert forward.summary.startswith("the merge should compute what its input computes, but ")


def test_a_fold_whose_adapter_is_gone_is_not_checked(fold):
    out, adapter = fold
    shutil.rmtree(adapter)
    report = validate(out, device="cpu")
    assert statuses(report) == {"structure": "passed", "finite": "passed", "recompute": "not_checked",
                                "forward": "not_checked"}
    assert report.exit_code == 3


# ---------------------------------------------------------------------------------------------------------
# Pickles: the forward check never unpickles without --allow-pickle, and then only with weights_only


def pickle_only_model(folder: Path) -> Path:
    """A model folder whose only weights are a pytorch_model.bin of real tensors."""
    from safetensors.torch import load_file

    source = Path(write_model(str(folder.parent / (folder.name + "-src")), SHAPE))
    shutil.copytree(source, folder)
    (folder / "model.safetensors").unlink()
    torch.save(load_file(str(source / "model.safetensors")), folder / "pytorch_model.bin")
    return folder


def hostile_model(tmp_path: Path) -> tuple[Path, Path]:
    """A model folder (config.json) whose only weights are a pickle that writes ``marker`` when unpickled."""
    marker = tmp_path / "pwned"
    folder = tmp_path / "hostile"
    hostile_pickle(folder, marker)
    config = json.loads(Path(write_model(str(tmp_path / "cfg"), SHAPE), "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config))
    return folder, marker


@pytest.fixture
def torch_loads(monkeypatch) -> list:
    """The weights_only argument of every torch.load call made while the test runs."""
    calls = []
    original = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    return calls


def test_a_pickle_only_folder_is_not_unpickled(cli, tmp_path, torch_loads):
    folder, marker = hostile_model(tmp_path)
    result = cli("validate", folder, "--device", "cpu")
    assert not marker.exists() and torch_loads == []
    assert result.exit_code == 3, result.output
    rows = table(result.stdout)
    assert rows["forward"].startswith(
        "NOT CHECKED  the only weights are pickle files (pytorch_model.bin), which can run code when loaded; "
        "pass --allow-pickle to load them with torch.load(weights_only=True)  (")
    assert rows["structure"].startswith("NOT CHECKED  the weights are pickle files (pytorch_model.bin): the "
                                        "structure is read from safetensors files only  (")
    allowed = cli("validate", folder, "--device", "cpu", "--allow-pickle")
    assert not marker.exists() and torch_loads and all(call is True for call in torch_loads)
    assert allowed.exit_code == 1, allowed.output
    assert table(allowed.stdout)["forward"].startswith("failed  1 problem  (")
    assert "pytorch_model.bin: refused by torch.load(weights_only=True): Unsupported global: GLOBAL exec" in \
        allowed.stdout


def test_with_allow_pickle_the_forward_check_loads_weights_only(tmp_path, torch_loads):
    folder = pickle_only_model(tmp_path / "pickled")
    calls = torch_loads
    report = validate(folder, device="cpu", allow_pickle=True)
    assert report.check("forward").status == "passed" and calls and all(c is True for c in calls), calls
    assert report.status == "not_checked"        # structure and finite read safetensors only
    calls.clear()
    assert validate(folder, device="cpu").check("forward").status == "not_checked" and calls == []


def test_forward_does_not_unpickle_inputs_or_adapters(project, tmp_path, torch_loads):
    """The spec names a hostile pickle as an input and as an adapter: the forward check loads neither."""
    folder, marker = hostile_model(tmp_path)
    adapter = tmp_path / "adapter"
    hostile_pickle(adapter, marker)
    (adapter / "pytorch_model.bin").rename(adapter / "adapter_model.bin")
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}))
    spec = project / "out" / "mergekit_config.yml"
    for text in (RELATIVE.replace("./models/ft-b", str(folder)), RELATIVE.replace("./models/ft-b",
                                                                                 f"models/ft-b+{adapter}")):
        spec.write_text(text)
        for allow_pickle in (False, True):
            torch_loads.clear()
            report = validate(project / "out", device="cpu", allow_pickle=allow_pickle)
            assert not marker.exists() and report.status != "passed"
            assert all(call is True for call in torch_loads) and (allow_pickle or torch_loads == []), torch_loads
            notes = [entry["note"] for entry in report.check("forward").numbers["inputs"] if entry["note"]]
            assert len(notes) == 1 and ("pickle" in notes[0] or "weights_only=True" in notes[0]), notes


def test_merge_fold_prints_its_verdict_like_merge_run(cli, models_f32, tmp_path, monkeypatch):
    """`merge fold` validated its output but never said so, nor failed when the validation failed."""
    pytest.importorskip("peft")
    from mergekit_lite.output import writer
    from mergekit_lite.testing.adapters import write_adapter

    adapter = write_adapter(str(tmp_path / "adapter"), SHAPE)
    result = cli("fold", models_f32 / "base", adapter, "-o", tmp_path / "out", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert re.fullmatch(r"Validation passed on cpu in \d+\.\d s: structure \d+\.\d s, finite \d+\.\d s, recompute "
                        r"\d+\.\d s \(21/39 tensors bit-exact\), forward \d+\.\d s \(loss \d\.\d{3}; inputs "
                        r"\d\.\d{3}-\d\.\d{3}\)",
                        result.stdout.splitlines()[-1]), result.stdout
    original = writer.ShardWriter.write

    def corrupting(self, name, tensor, rows=None):
        original(self, name, tensor * 1.001 if name == "lm_head.weight" else tensor, rows)

    monkeypatch.setattr(writer.ShardWriter, "write", corrupting)
    broken = cli("fold", models_f32 / "base", adapter, "-o", tmp_path / "out2", "--device", "cpu")
    assert broken.exit_code == 1
    assert broken.stderr.endswith(f"error: validation failed; the output was written and stays in "
                                  f"{tmp_path / 'out2'} for inspection\n")
