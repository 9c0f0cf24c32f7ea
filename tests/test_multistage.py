"""Multi-stage files (mergekit-multi's format) through `merge run`: the same tensors as mergekit-multi 0.1.5,
the graph checked whole before any tensor is read, stages kept on a rerun when their spec and inputs are the
same and computed again when an input changed, stage folders of someone else's never replaced."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from helpers.models import SHAPE, SHARD, read_folder
from test_sparsifiers import stable_mergekit_sort  # noqa: F401  (fixture)

from mergekit_lite import SpecError, run_merge
from mergekit_lite.testing.synthetic import write_model

LINEAR_SLERP = """name: soup
merge_method: linear
models:
  - model: {root}/ft-a
    parameters: {{weight: 0.6}}
  - model: {root}/ft-b
    parameters: {{weight: 0.4}}
dtype: float32
---
# the final stage: no name
merge_method: slerp
base_model: {root}/base
models:
  - model: {root}/base
  - model: soup
parameters:
  t: [0.2, 0.7]
dtype: float32
"""

TA_TIES = """name: deltas
merge_method: task_arithmetic
base_model: {root}/base
models:
  - model: {root}/ft-a
    parameters: {{weight: 0.7}}
  - model: {root}/ft-b
    parameters: {{weight: 0.5}}
dtype: float32
---
merge_method: ties
base_model: {root}/base
models:
  - model: deltas
    parameters: {{weight: 1.0, density: 0.6}}
  - model: {root}/ft-c
    parameters: {{weight: 0.5, density: 0.8}}
dtype: float32
"""


def write(tmp_path: Path, text: str, name: str = "multi.yml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def run_mergekit_multi(spec: Path, intermediate: Path, out: Path) -> None:
    pytest.importorskip("mergekit")
    from click.testing import CliRunner
    from mergekit.scripts.multimerge import main

    result = CliRunner().invoke(main, [str(spec), "--intermediate-dir", str(intermediate), "--out-path", str(out),
                                       "--quiet", "--no-copy-tokenizer", "--no-write-model-card"])
    assert result.exit_code == 0, result.output


def assert_equal_tensors(ours: Path, theirs: Path) -> None:
    a, b = read_folder(ours), read_folder(theirs)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype == torch.float32, name
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("recipe", ["linear_slerp", "ta_ties"])
def test_same_tensors_as_mergekit_multi(cli, models_f32, tmp_path, recipe, stable_mergekit_sort):  # noqa: F811
    spec = write(tmp_path, {"linear_slerp": LINEAR_SLERP, "ta_ties": TA_TIES}[recipe].format(root=models_f32))
    result = cli("run", spec, tmp_path / "out", "--no-validate")
    assert result.exit_code == 0, result.output
    run_mergekit_multi(spec, tmp_path / "mk-stages", tmp_path / "mk-out")
    name = "soup" if recipe == "linear_slerp" else "deltas"
    assert_equal_tensors(tmp_path / "out.stages" / name, tmp_path / "mk-stages" / name)
    assert_equal_tensors(tmp_path / "out", tmp_path / "mk-out")
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"stage '{name}': Merged 39 tensors") and lines[1].startswith("stage final: Merged")


def test_card_shows_every_stage_and_the_stages_are_ordinary_outputs(cli, models_f32, tmp_path):
    text = LINEAR_SLERP.format(root=models_f32)
    spec = write(tmp_path, text)
    assert cli("run", spec, "-o", tmp_path / "out", "--quiet", "--no-validate").exit_code == 0
    card = (tmp_path / "out" / "README.md").read_text()
    assert text.split("---")[0].strip() in card and text.split("---")[1].strip() in card
    assert "multi-stage spec" in card
    # each stage is a complete output: its own card, its spec with the stage names replaced by folders
    stage = tmp_path / "out.stages" / "soup"
    assert {"README.md", "merge_run.json", "mergekit_config.yml", "config.json"} <= set(os.listdir(stage))
    assert "multi-stage" not in (stage / "README.md").read_text()
    final_spec = (tmp_path / "out" / "mergekit_config.yml").read_text()
    assert f"model: {tmp_path / 'out.stages' / 'soup'}" in final_spec and "name:" not in final_spec
    assert cli("validate", tmp_path / "out", "--quiet").exit_code == 0   # it finds the intermediate model


def stat_of(path: Path) -> tuple[int, int]:
    info = os.stat(path)
    return info.st_ino, info.st_mtime_ns


def test_rerun_keeps_up_to_date_stages_and_recomputes_after_an_input_changed(cli, models_f32, tmp_path):
    root = tmp_path / "models"
    for name in ("base", "ft-a", "ft-b"):
        shutil.copytree(models_f32 / name, root / name)
    spec = write(tmp_path, LINEAR_SLERP.format(root=root))
    out, stage = tmp_path / "out", tmp_path / "out.stages" / "soup"
    assert cli("run", spec, out, "--no-validate", "--quiet").exit_code == 0
    files = {n: stat_of(stage / n) for n in os.listdir(stage)}
    final = {n: stat_of(out / n) for n in os.listdir(out)}
    before = read_folder(out)

    again = cli("run", spec, out, "--no-validate")
    assert again.exit_code == 0, again.output
    assert again.stdout.splitlines() == [
        f"stage 'soup': {stage} is up to date (same stage spec and inputs), kept",
        f"stage final: {out} is up to date (same stage spec and inputs), kept"]
    assert {n: stat_of(stage / n) for n in os.listdir(stage)} == files
    assert {n: stat_of(out / n) for n in os.listdir(out)} == final

    # ft-b is rewritten with other weights: the stage and the final one are computed again
    shutil.rmtree(root / "ft-b")
    write_model(str(root / "ft-b"), SHAPE, dtype=torch.float32, seed=0, delta_seed=7,
                max_shard_size=SHARD)
    changed = cli("run", spec, out, "--no-validate", "--overwrite")
    assert changed.exit_code == 0, changed.output
    assert [line.split(":")[0] for line in changed.stdout.splitlines()] == ["stage 'soup'", "stage final"]
    assert "Merged" in changed.stdout and "kept" not in changed.stdout
    assert stat_of(stage / "model.safetensors") != files["model.safetensors"]
    after = read_folder(out)
    assert any(not torch.equal(before[n], after[n]) for n in before)
    # and they are what a fresh run gives
    fresh = tmp_path / "fresh"
    assert cli("run", spec, fresh, "--no-validate", "--quiet").exit_code == 0
    assert_equal_tensors(out, fresh)


def test_a_user_folder_at_a_stage_is_never_replaced(cli, models_f32, tmp_path):
    spec = write(tmp_path, LINEAR_SLERP.format(root=models_f32))
    mine = tmp_path / "out.stages" / "soup"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("mine")
    result = cli("run", spec, tmp_path / "out", "--quiet")
    assert result.exit_code == 2
    assert result.stderr == (
        f"error: {spec} (document 1): name: stage 'soup' is written to {mine}, but this folder was not written by "
        f"a merge (it has no merge_run.json; found notes.txt), so a merge never replaces it\n"
        "Hint: move your files out of that folder, or give the stages another folder with --intermediate-dir "
        "(a stage replaces only its own earlier output)\n")
    assert os.listdir(mine) == ["notes.txt"] and (mine / "notes.txt").read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == ["multi.yml", "out.stages"]
    # elsewhere, with --intermediate-dir, it runs
    result = cli("run", spec, tmp_path / "out", "--intermediate-dir", tmp_path / "work", "--quiet", "--no-validate")
    assert result.exit_code == 0, result.output
    assert os.listdir(tmp_path / "work") == ["soup"] and os.listdir(mine) == ["notes.txt"]
    # a user folder at OUT is refused before any stage runs
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "a.txt").write_text("theirs")
    result = cli("run", spec, tmp_path / "theirs", "--quiet")
    assert result.exit_code == 2 and result.stderr.startswith(
        f"error: {tmp_path / 'theirs'}: this folder was not written by a merge (it has no merge_run.json; found "
        "a.txt), so a merge never replaces it\n")
    assert not (tmp_path / "theirs.stages").exists() and os.listdir(tmp_path / "theirs") == ["a.txt"]


@pytest.mark.parametrize("text, message", [
    ("name: soup\nmerge_method: linear\nmodels: [{model: ROOT/ft-a}]\n---\n"
     "merge_method: linear\nmodels: [{model: ROOT/ft-b}, {model: sopu}]\n",
     "FILE (document 2): models[1].model: 'sopu' is neither a stage of this file nor a local folder. Did you mean "
     "'soup'?\nHint: name a stage (name: ...) of this file, a local model folder or a Hub repo (org/name)\n"),
    ("name: a\nmerge_method: linear\nmodels: [{model: ROOT/ft-a}]\n---\n"
     "name: b\nmerge_method: linear\nmodels: [{model: a}]\n",
     "FILE: every document has a name, so none is the final output\nHint: leave out the name of the stage to "
     "write to OUT (mergekit-multi's final merge)\n"),
    ("name: a\nmerge_method: passthrough\nslices:\n  - sources: [{model: a, layer_range: [0, 2]}]\n---\n"
     "merge_method: linear\nmodels: [{model: a}]\n",
     "FILE (document 1): slices[0].sources[0].model: the stages form a cycle: a -> a\nHint: a stage can only use "
     "stages that do not use it, directly or through others\n"),
    ("name: a\nmerge_method: linear\nmodels: [{model: ROOT/ft-a, parameters: {wieght: 1}}]\n---\n"
     "merge_method: linear\nmodels: [{model: a}]\n",
     "FILE (document 1): models[0].parameters.wieght: unknown parameter. Did you mean 'weight'?"
     "\nHint: linear takes: weight, normalize\n"),
])
def test_graph_errors_before_anything_is_read(cli, models_f32, tmp_path, text, message):
    spec = write(tmp_path, text.replace("ROOT", str(models_f32)))
    result = cli("run", spec, tmp_path / "out", "--quiet")
    assert (result.exit_code, result.stderr) == (2, "error: " + message.replace("FILE", str(spec)))
    assert sorted(os.listdir(tmp_path)) == ["multi.yml"]


def test_library_call_and_dry_run(models_f32, tmp_path):
    spec = write(tmp_path, LINEAR_SLERP.format(root=models_f32))
    planned = run_merge(spec, tmp_path / "out", dry_run=True, progress=False)
    would = "Would write 39 tensors (723.20 kB) to"
    assert planned.dry_run and planned.stages == (f"stage 'soup': {would} {tmp_path / 'out.stages' / 'soup'}.",
                                                  f"stage final: {would} {tmp_path / 'out'}.")
    assert "stage 'soup': 39 tensors" in planned.summary   # the final stage planned from the stage's plan
    assert sorted(os.listdir(tmp_path)) == ["multi.yml"]
    result = run_merge(spec.read_text(), tmp_path / "out", progress=False, validate=False)   # YAML text works too
    assert result.path == str(tmp_path / "out") and len(result.stages) == 2
    moe = write(tmp_path, "base_model: x\ngate_mode: hidden\nexperts: [{source_model: y}]\n", "moe.yml")
    with pytest.raises(SpecError, match=r"this is a mergekit-moe file: run `merge moe .*moe.yml -o OUT`"):
        run_merge(moe, tmp_path / "moe-out")


def test_resume_continues_the_interrupted_stage(models_f32, tmp_path, monkeypatch):
    """Ctrl-C in the middle of stage 'soup' (its 20th tensor); --resume keeps its finished shards, then runs
    the final stage; the result is the bytes of an uninterrupted run."""
    from dataclasses import replace

    import mergekit_lite.strategies.linear as linear

    spec = write(tmp_path, LINEAR_SLERP.format(root=models_f32))
    calls, original = [0], linear.STRATEGY

    def fn(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 20:
            raise KeyboardInterrupt
        return original.fn(*args, **kwargs)

    settings = dict(max_shard_size="4kB", progress=False, validate=False)
    with monkeypatch.context() as patch:
        patch.setattr(linear, "STRATEGY", replace(original, fn=fn))
        with pytest.raises(KeyboardInterrupt):
            run_merge(spec, tmp_path / "out", **settings)
    assert (tmp_path / "out.stages" / "soup.partial").is_dir() and not (tmp_path / "out.stages" / "soup").exists()
    result = run_merge(spec, tmp_path / "out", resume=True, **settings)
    assert "kept from the interrupted run" in result.stages[0] and result.stages[1].startswith("stage final: Merged")
    run_merge(spec, tmp_path / "clean", **settings)
    assert_equal_tensors(tmp_path / "out.stages" / "soup", tmp_path / "clean.stages" / "soup")
    assert_equal_tensors(tmp_path / "out", tmp_path / "clean")


@pytest.mark.parametrize("recipe", ["linear_slerp", "ta_ties"])
@pytest.mark.parametrize("fixture", ["models_f32", "models_bf16"])
def test_fuse_gives_the_bytes_of_the_staged_run(cli, tmp_path, request, recipe, fixture):
    """bf16 inputs without dtype: float32: the intermediate is written in bfloat16, so the fused run must round
    it as the staged run did before the next stage reads it."""
    root = request.getfixturevalue(fixture)
    text = {"linear_slerp": LINEAR_SLERP, "ta_ties": TA_TIES}[recipe].format(root=root)
    spec = write(tmp_path, text if fixture == "models_f32" else text.replace("dtype: float32\n", ""))
    assert cli("run", spec, tmp_path / "staged", "--no-validate", "--quiet").exit_code == 0
    fused = cli("run", spec, tmp_path / "fused", "--fuse")
    assert fused.exit_code == 0, fused.output
    name = "soup" if recipe == "linear_slerp" else "deltas"
    assert fused.stdout.splitlines()[0] == (f"stage '{name}': fused (computed in memory as the final stage needed "
                                            f"it; {tmp_path / 'fused.stages' / name} not written)")
    assert "warning: not validated by recomputation" in fused.stderr
    assert not (tmp_path / "fused.stages").exists()
    staged, one_pass = read_folder(tmp_path / "staged"), read_folder(tmp_path / "fused")
    assert sorted(staged) == sorted(one_pass)
    dtype = torch.float32 if fixture == "models_f32" else torch.bfloat16
    for tensor in staged:
        assert staged[tensor].dtype == one_pass[tensor].dtype == dtype, tensor
        assert torch.equal(staged[tensor].view(torch.uint8), one_pass[tensor].view(torch.uint8)), tensor
    assert (tmp_path / "staged" / "config.json").read_text() == (tmp_path / "fused" / "config.json").read_text()


@pytest.mark.parametrize("first, reason", [
    ("name: soup\nmerge_method: passthrough\nslices:\n  - sources: [{model: ROOT/ft-a, layer_range: [0, 4]}]\n",
     "stage 'soup' merges layer slices, not whole models"),
    ("name: soup\nmerge_method: linear\nmodels: [{model: ROOT/ft-a}, {model: ROOT/ft-b}]\n"
     "tokenizer_source: union\n", "stage 'soup' merges tokenizers (tokenizer_source), which remaps embedding rows "
                                   "by token"),
    ("name: soup\nmerge_method: linear\nmodels: [{model: ROOT/ft-a}]\n---\nname: unused\n"
     "merge_method: linear\nmodels: [{model: ROOT/ft-b}]\n",
     "stage 'unused' is used by no other stage, and --fuse writes only the final model"),
])
def test_fuse_is_refused_where_it_cannot_give_the_same_bytes(cli, models_f32, tmp_path, first, reason):
    final = "merge_method: linear\nmodels: [{model: soup}, {model: ROOT/ft-c}]\n"
    spec = write(tmp_path, (first + "---\n" + final).replace("ROOT", str(models_f32)))
    result = cli("run", spec, tmp_path / "out", "--fuse")
    assert (result.exit_code, result.stderr) == (2, f"error: --fuse: --fuse cannot run this file: {reason}\n"
                                                    "Hint: run without --fuse: each named stage is written to its "
                                                    "folder, and a rerun keeps those that are up to date\n")
    assert sorted(os.listdir(tmp_path)) == ["multi.yml"]
