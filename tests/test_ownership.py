"""Nothing of the user's is ever lost to the output's place: what appears or changes while a merge runs is left as
it is (the finished result stays in OUT.partial), the lock file is the merge's own, and --resume never mixes the
shards of an input that changed (same size and mtime, other bytes) with shards of the new one.

The refusals of a single run (a folder of the user's at OUT, OUT.partial, the lock's name, ...) are cases of the
hostile-input catalogue (tests/helpers/hostile/ownership.py)."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers.hostile import Models, build_models, linear_spec
from helpers.hostile.catalogue import TINY
from helpers.models import SHAPE, SHARD, write_spec
from test_resume import SHARD as SMALL_SHARDS
from test_resume import folder_bytes, interrupted, journal_lines, spec_text

from mergekit_lite import run_merge
from mergekit_lite.testing.adapters import write_adapter
from mergekit_lite.testing.synthetic import write_model

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("tiny_shards")
LOCK_SUFFIX = ".mergekit_lite.lock"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Models:
    return build_models(tmp_path_factory.mktemp("tiny"))


def finished_hint(out: Path) -> str:
    partial = f"{out}.partial"
    return (f"Hint: the finished output is in {partial}: rename it to keep it (mv {partial} NEW_NAME), since a later "
            "run of this merge starts that folder over\n")


def start_paused(tiny: Models, tmp_path: Path, out: Path, *extra: str) -> subprocess.Popen:
    """`merge run` in another process, paused while it writes tensors (tests/helpers/paused_merge.py)."""
    spec = linear_spec(tmp_path, tiny.a, tiny.b, name="paused.yaml")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    process = subprocess.Popen([sys.executable, str(ROOT / "tests" / "helpers" / "paused_merge.py"), str(tmp_path),
                                "run", str(spec), "-o", str(out), "--quiet", "--no-validate", *extra],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    while not (tmp_path / "paused").exists():   # waits for a state, not for a time
        assert process.poll() is None, process.communicate()
        time.sleep(0.02)
    return process


def resume_paused(tmp_path: Path, process: subprocess.Popen) -> tuple[int, str]:
    (tmp_path / "go").touch()
    _, stderr = process.communicate(timeout=120)
    return process.returncode, stderr


def assert_complete(folder: Path, tiny: Models) -> None:
    """The folder holds the finished merge of a and b (validated: structure, finite, recomputed bit-exact)."""
    from mergekit_lite import validate

    report = validate(folder, device="cpu", forward=False)
    assert report.passed, report


@pytest.mark.parametrize("what", ["a folder of files", "an empty folder", "a file"])
def test_output_created_while_the_merge_runs_is_left_alone(tiny, tmp_path, what):
    out = tmp_path / "out"
    process = start_paused(tiny, tmp_path, out)
    if what == "a file":
        out.write_text("someone else's file")
    else:
        out.mkdir()
        if what == "a folder of files":
            (out / "thesis.tex").write_text("\\chapter{Results}")
    code, stderr = resume_paused(tmp_path, process)
    assert (code, stderr) == (1, f"error: {out}: appeared while the merge ran (something else created it), so it was "
                                 f"left as it is\n{finished_hint(out)}")
    if what == "a file":
        assert out.read_text() == "someone else's file"
    else:
        assert sorted(os.listdir(out)) == (["thesis.tex"] if what == "a folder of files" else [])
    if what == "a folder of files":
        assert (out / "thesis.tex").read_text() == "\\chapter{Results}"
    assert_complete(Path(f"{out}.partial"), tiny)
    assert not [n for n in os.listdir(tmp_path) if "lock" in n]


def test_files_added_to_the_output_while_an_overwrite_runs_are_kept(tiny, tmp_path):
    out = tmp_path / "out"
    run_merge(str(linear_spec(tmp_path, tiny.a, tiny.b)), out, progress=False, validate=False)
    before = folder_bytes(out)
    process = start_paused(tiny, tmp_path, out, "--overwrite")
    (out / "notes.txt").write_text("my notes")
    code, stderr = resume_paused(tmp_path, process)
    assert (code, stderr) == (1, f"error: {out}: files that no merge wrote appeared in it while the merge ran "
                                 f"(notes.txt), so it was left as it is\n{finished_hint(out)}")
    assert folder_bytes(out) == {**before, "notes.txt": b"my notes"}
    assert_complete(Path(f"{out}.partial"), tiny)
    assert sorted(os.listdir(tmp_path)) == ["go", "out", "out.partial", "paused", "paused.yaml", "spec.yaml"]


def test_an_output_replaced_while_an_overwrite_runs_is_kept(tiny, tmp_path):
    out = tmp_path / "out"
    run_merge(str(linear_spec(tmp_path, tiny.a, tiny.b)), out, progress=False, validate=False)
    process = start_paused(tiny, tmp_path, out, "--overwrite")
    out.rename(tmp_path / "moved")
    out.mkdir()
    (out / "thesis.tex").write_text("\\chapter{Results}")
    code, stderr = resume_paused(tmp_path, process)
    assert (code, stderr) == (1, f"error: {out}: changed while the merge ran (it is no longer the folder that was "
                                 f"checked), so it was left as it is\n{finished_hint(out)}")
    assert folder_bytes(out) == {"thesis.tex": b"\\chapter{Results}"}
    assert_complete(tmp_path / "moved", tiny)


def test_an_empty_output_that_gets_files_while_the_merge_runs_is_kept(tiny, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    process = start_paused(tiny, tmp_path, out)
    (out / "notes.txt").write_text("my notes")
    code, stderr = resume_paused(tmp_path, process)
    assert (code, stderr) == (1, f"error: {out}: files that no merge wrote appeared in it while the merge ran "
                                 f"(notes.txt), so it was left as it is\n{finished_hint(out)}")
    assert folder_bytes(out) == {"notes.txt": b"my notes"}


def test_overwriting_our_own_output_leaves_nothing_else_behind(cli, tiny, tmp_path):
    spec = linear_spec(tmp_path, tiny.a, tiny.b)
    out = tmp_path / "out"
    assert cli("run", spec, "-o", out, "--quiet", "--no-validate").exit_code == 0
    first = folder_bytes(out)
    spec = linear_spec(tmp_path, tiny.a, tiny.sharded, name="other.yaml")
    result = cli("run", spec, "-o", out, "--quiet", "--no-validate", "--overwrite")
    assert (result.exit_code, result.stderr) == (0, "")
    assert folder_bytes(out) != first and not any(n.startswith(".") for n in os.listdir(out))
    assert sorted(os.listdir(tmp_path)) == ["other.yaml", "out", "spec.yaml"]
    # merge fold follows the same rules: its own output is replaced
    write_adapter(str(tmp_path / "adapter"), TINY)
    folded = ["fold", tiny.a, tmp_path / "adapter", "-o", tmp_path / "folded", "--no-check-base", "--quiet"]
    assert cli(*folded).exit_code == 0
    assert (cli(*folded, "--overwrite").exit_code, sorted(os.listdir(tmp_path))) == (
        0, ["adapter", "folded", "other.yaml", "out", "spec.yaml"])


# ---------------------------------------------------------------- checked before any tensor is read

@pytest.fixture
def no_tensor_reads(monkeypatch):
    """Reading any tensor fails the test: the refusals below belong to the planning phase."""
    from mergekit_lite.sources.checkpoint import Checkpoint

    def read(self, name, rows=None):
        raise AssertionError(f"tensor {name} was read")

    monkeypatch.setattr(Checkpoint, "read", read)


def test_the_current_folder_as_output_is_refused_before_reading(cli, tiny, tmp_path, monkeypatch, no_tensor_reads):
    spec = linear_spec(tmp_path, tiny.a, tiny.b)
    (tmp_path / "new").mkdir()
    monkeypatch.chdir(tmp_path / "new")
    for out in (".", str(tmp_path / "new"), ".."):
        result = cli("run", spec, "-o", out, "--quiet", "--no-validate")
        assert (result.exit_code, result.stderr) == (2, (
            f"error: {out}: the output path is the current folder or one that holds it, which a merge cannot replace "
            "(it writes a new folder and renames it into place)\n"
            "Hint: give the path of a new folder, e.g. -o merged\n"))
    assert sorted(os.listdir(tmp_path)) == ["new", "spec.yaml"] and os.listdir(tmp_path / "new") == []


def test_the_dry_run_shows_the_same_refusals(cli, tiny, tmp_path, no_tensor_reads):
    spec = linear_spec(tmp_path, tiny.a, tiny.b)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("\\chapter{Results}")
    result = cli("run", spec, "-o", mine, "--overwrite", "--dry-run")
    assert (result.exit_code, result.stderr.splitlines()[0]) == (2, (
        f"error: {mine}: this folder was not written by a merge (it has no merge_run.json; found thesis.tex), so a "
        "merge never replaces it"))
    assert sorted(os.listdir(tmp_path)) == ["mine", "spec.yaml"] and os.listdir(mine) == ["thesis.tex"]


def test_a_link_as_output_is_refused_before_reading(cli, tiny, tmp_path, no_tensor_reads):
    spec = linear_spec(tmp_path, tiny.a, tiny.b)
    (tmp_path / "real").mkdir()
    (tmp_path / "out").symlink_to(tmp_path / "real", target_is_directory=True)
    result = cli("run", spec, "-o", tmp_path / "out", "--quiet", "--no-validate")
    assert result.exit_code == 2 and "is a symbolic link" in result.stderr
    assert sorted(os.listdir(tmp_path)) == ["out", "real", "spec.yaml"]


# ---------------------------------------------------------------- the lock file

def test_a_lock_file_replaced_during_the_run_is_not_removed(tiny, tmp_path, monkeypatch):
    """The run removes its lock file only if the name still holds the file it created."""
    import mergekit_lite.api.merge as api

    real_execute, replaced = api._execute, []

    def execute(*args, **kwargs):
        (lock,) = [p for p in tmp_path.iterdir() if p.name.endswith("lock")]
        lock.unlink()
        lock.write_text("another tool's file")
        replaced.append(lock)
        return real_execute(*args, **kwargs)

    monkeypatch.setattr(api, "_execute", execute)
    run_merge(str(linear_spec(tmp_path, tiny.a, tiny.b)), tmp_path / "out", progress=False, validate=False)
    assert replaced[0].read_text() == "another tool's file"


def test_a_hard_link_at_the_lock_name_is_refused(cli, tiny, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    lock = tmp_path / f"out{LOCK_SUFFIX}"
    os.link(victim, lock)
    result = cli("run", linear_spec(tmp_path, tiny.a, tiny.b), "-o", tmp_path / "out", "--quiet", "--no-validate")
    assert (result.exit_code, result.stderr) == (2, (
        f"error: {lock}: this file is where the merge keeps its lock, but it is not a lock file of mergekit_lite\n"
        "Hint: move it away, or choose another output path with -o\n"))
    assert victim.read_text() == "precious" and not (tmp_path / "out").exists()


@pytest.mark.parametrize("left", ["", "mergekit_lite lock, process 999999\n"])
def test_a_lock_left_by_a_killed_run_is_taken_over(cli, tiny, tmp_path, left):
    lock = tmp_path / f"out{LOCK_SUFFIX}"
    lock.write_text(left)
    result = cli("run", linear_spec(tmp_path, tiny.a, tiny.b), "-o", tmp_path / "out", "--quiet", "--no-validate")
    assert (result.exit_code, result.stderr) == (0, "")
    assert not lock.exists()


# ---------------------------------------------------------------- the partial folder

def test_a_partial_folder_of_a_different_merge_needs_overwrite(models_bf16, tmp_path, cli, monkeypatch):
    out = tmp_path / "run" / "merged"
    interrupted(monkeypatch, spec_text(models_bf16), out, 10)
    partial = Path(f"{out}.partial")
    before = folder_bytes(partial)
    other = write_spec(tmp_path / "other.yaml", spec_text(models_bf16, weight=0.4))
    started = journal_lines(out)[0]["started"]
    result = cli("run", other, "-o", out, "--max-shard-size", SMALL_SHARDS, "--quiet", "--no-validate")
    assert (result.exit_code, result.stderr) == (2, (
        f"error: {partial}: the partial output folder holds the unfinished output of a different merge (started "
        f"{started} from a spec); it is kept\nHint: finish that merge with --resume and its own spec and options, or "
        "pass --overwrite to replace it with this merge\n"))
    assert folder_bytes(partial) == before
    result = cli("run", other, "-o", out, "--max-shard-size", SMALL_SHARDS, "--quiet", "--no-validate", "--overwrite")
    assert (result.exit_code, result.stderr) == (0, "") and not partial.exists()


@pytest.mark.parametrize("resume", [False, True])
def test_a_partial_folder_of_ours_holding_a_users_file_is_refused(models_bf16, tmp_path, cli, monkeypatch, resume):
    spec = write_spec(tmp_path / "spec.yaml", spec_text(models_bf16))
    out = tmp_path / "run" / "merged"
    interrupted(monkeypatch, spec_text(models_bf16), out, 10)
    partial = Path(f"{out}.partial")
    (partial / "notes.txt").write_text("mine")
    (partial / "drafts").mkdir()
    result = cli("run", spec, "-o", out, "--max-shard-size", SMALL_SHARDS, "--quiet", "--no-validate",
                 *(["--resume"] if resume else []))
    assert (result.exit_code, result.stderr) == (2, (
        f"error: {partial}: the partial output folder holds files that no merge wrote (drafts/, notes.txt)\n"
        "Hint: move them out of it and run again\n"))
    assert (partial / "notes.txt").read_text() == "mine" and (partial / "drafts").is_dir()


def test_a_leftover_of_the_same_merge_is_started_over_without_resume(models_bf16, tmp_path, cli, monkeypatch):
    spec = write_spec(tmp_path / "spec.yaml", spec_text(models_bf16))
    out = tmp_path / "run" / "merged"
    interrupted(monkeypatch, spec_text(models_bf16), out, 10)
    result = cli("run", spec, "-o", out, "--max-shard-size", SMALL_SHARDS, "--quiet", "--no-validate")
    assert (result.exit_code, result.stderr) == (0, "")
    assert sorted(os.listdir(out.parent)) == ["merged"]


# ---------------------------------------------------------------- --resume and inputs that changed

@pytest.fixture
def own_models(models_bf16, tmp_path) -> Path:
    """A copy of the bf16 models this test may change."""
    shutil.copytree(models_bf16, tmp_path / "models")
    return tmp_path / "models"


def replace_in_place(folder: Path, delta_seed: int, tmp_path: Path) -> None:
    """Give every weight file of ``folder`` other tensors with the same size and modification time (the way a
    tool that preserves timestamps, like `cp -p` or `rsync -t`, would leave it)."""
    other = tmp_path / f"other-{delta_seed}"
    write_model(str(other), SHAPE, dtype=torch.bfloat16, seed=0, delta_seed=delta_seed, max_shard_size=SHARD)
    for source in sorted(other.glob("*.safetensors")):
        target = folder / source.name
        stat = target.stat()
        data = source.read_bytes()
        assert len(data) == stat.st_size and data != target.read_bytes()
        with open(target, "r+b") as f:
            f.write(data)
        os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        assert (target.stat().st_size, target.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)


def test_resume_recomputes_shards_of_an_input_that_changed_with_the_same_size_and_mtime(own_models, tmp_path,
                                                                                         monkeypatch, caplog):
    monkeypatch.setattr(logging.getLogger("mergekit_lite"), "propagate", True)   # a CLI run in this process may
    caplog.set_level(logging.WARNING, logger="mergekit_lite")                      # have changed both
    out = tmp_path / "run" / "merged"
    interrupted(monkeypatch, spec_text(own_models), out, 20)
    recorded = [r["file"] for r in journal_lines(out)[1:]]
    assert recorded
    replace_in_place(own_models / "ft-b", 7, tmp_path)
    result = run_merge(spec_text(own_models), out, max_shard_size=SMALL_SHARDS, progress=False, resume=True,
                       validate=False)
    fresh = tmp_path / "fresh" / "merged"
    run_merge(spec_text(own_models), fresh, max_shard_size=SMALL_SHARDS, progress=False, validate=False)
    assert result.resumed_shards == 0 and folder_bytes(out) == folder_bytes(fresh)
    assert (f"{recorded[0]}: an input it was computed from changed since the interrupted run "
            f"({own_models}/ft-b); computing it again") in caplog.text


def test_resume_keeps_shards_when_an_input_comes_back_with_the_same_bytes(own_models, tmp_path, monkeypatch,
                                                                         reference):
    """A new copy of the same file (another inode, another mtime): verified by content and kept."""
    out = tmp_path / "run" / "merged"
    interrupted(monkeypatch, spec_text(own_models), out, 20)
    recorded = journal_lines(out)[1:]
    for path in sorted((own_models / "ft-a").glob("*.safetensors")):
        copy = path.with_suffix(".copy")
        shutil.copyfile(path, copy)
        os.replace(copy, path)
    result = run_merge(spec_text(own_models), out, max_shard_size=SMALL_SHARDS, progress=False, resume=True,
                       validate=False)
    assert result.resumed_shards == len(recorded) and folder_bytes(out) == reference


@pytest.fixture
def reference(own_models, tmp_path) -> dict[str, bytes]:
    out = tmp_path / "ref" / "merged"
    run_merge(spec_text(own_models), out, max_shard_size=SMALL_SHARDS, progress=False, validate=False)
    return folder_bytes(out)


def test_a_hard_link_in_the_partial_folder_is_never_written_through(models_bf16, tmp_path, cli, monkeypatch):
    """A shard name of our partial folder hard-linked to a file of the user's: --resume refuses it (the shard
    would be written again through the link); a fresh run removes the name only, never the file's bytes."""
    spec = write_spec(tmp_path / "spec.yaml", spec_text(models_bf16))
    out = tmp_path / "run" / "merged"
    interrupted(monkeypatch, spec_text(models_bf16), out, 10)
    partial = Path(f"{out}.partial")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    unfinished = max(int(line["file"][6:11]) for line in journal_lines(out)[1:]) + 1
    link = partial / f"model-{unfinished:05d}-of-00039.safetensors"
    link.unlink(missing_ok=True)
    os.link(victim, link)
    result = cli("run", spec, "-o", out, "--max-shard-size", SMALL_SHARDS, "--no-validate", "--resume")
    assert (result.exit_code, result.stderr) == (2, (
        f"error: {partial}: cannot resume: {link.name} in the partial folder is a file with other hard links, which "
        "a merge never writes\nHint: move it out of the partial folder and run again\n"))
    result = cli("run", spec, "-o", out, "--max-shard-size", SMALL_SHARDS, "--no-validate", "--quiet")
    assert (result.exit_code, result.stderr, victim.read_text()) == (0, "", "precious")
