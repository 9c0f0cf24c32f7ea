"""`merge run --resume`: an interrupted merge continues where it stopped and gives the same bytes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import pytest
from helpers.models import write_spec

from mergekit_lite import run_merge
from mergekit_lite.output.journal import JOURNAL
from mergekit_lite.strategies.linear import STRATEGY as LINEAR

pytestmark = pytest.mark.usefixtures("tiny_shards")   # shards of a few kB on the command line (conftest.py)

ROOT = Path(__file__).resolve().parents[1]
SHARD = "4kB"   # every tensor of the tiny models gets a shard of its own: 39 shards


def spec_text(root: Path, weight: float = 0.3) -> str:
    return textwrap.dedent(f"""\
        merge_method: linear
        models:
          - model: {root}/base
            parameters: {{weight: 0.5}}
          - model: {root}/ft-a
            parameters: {{weight: {weight}}}
          - model: {root}/ft-b
            parameters: {{weight: 0.2}}
        dtype: bfloat16
        """)


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def journal_lines(out: Path) -> list[dict]:
    path = Path(str(out) + ".partial") / JOURNAL
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def interrupted(monkeypatch, spec: str, out: Path, calls: int) -> None:
    """Run the merge, interrupted (as by Ctrl-C) when the built-in linear computes its ``calls``-th tensor."""
    import mergekit_lite.strategies.linear as module

    count = [0]

    def fn(*args, **kwargs):
        count[0] += 1
        if count[0] == calls:
            raise KeyboardInterrupt
        return LINEAR.fn(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(module, "STRATEGY", replace(LINEAR, fn=fn))
        with pytest.raises(KeyboardInterrupt):
            run_merge(spec, out, max_shard_size=SHARD, progress=False, validate=False)


@pytest.fixture
def reference(models_bf16, tmp_path) -> dict[str, bytes]:
    """The uninterrupted merge's files (the output folder's name is the same in every test: the card says it)."""
    out = tmp_path / "ref" / "merged"
    run_merge(spec_text(models_bf16), out, max_shard_size=SHARD, progress=False, validate=False)
    return folder_bytes(out)


def test_merge_killed_mid_way_resumes_to_identical_bytes(models_bf16, tmp_path, reference, cli):
    spec = write_spec(tmp_path / "spec.yaml", spec_text(models_bf16))
    out = tmp_path / "run" / "merged"
    # The same merge in another process, slowed down (25 ms per tensor) so that it is killed mid-way.
    script = textwrap.dedent(f"""\
        import time
        from dataclasses import replace
        from mergekit_lite import run_merge
        import mergekit_lite.strategies.linear as linear

        def slow(*args, **kwargs):
            time.sleep(0.025)
            return linear.linear(*args, **kwargs)

        linear.STRATEGY = replace(linear.STRATEGY, fn=slow)
        run_merge({str(spec)!r}, {str(out)!r}, max_shard_size={SHARD!r}, progress=False, validate=False)
        """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    process = subprocess.Popen([sys.executable, "-c", script], env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while len(journal_lines(out)) < 1 + 5 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    stderr = process.communicate()[1].decode()
    assert process.returncode == -signal.SIGKILL, stderr
    recorded = journal_lines(out)[1:]
    shards = [name for name in reference if name.endswith(".safetensors")]
    assert 5 <= len(recorded) < len(shards) and not out.exists()
    partial = Path(str(out) + ".partial")
    kept = {r["file"]: (partial / r["file"]).stat().st_mtime_ns for r in recorded}

    result = cli("run", spec, "-o", out, "--max-shard-size", SHARD, "--resume", "--no-validate")
    assert result.exit_code == 0, result.output
    assert f"{len(shards)} shard(s); {len(recorded)} kept from the interrupted run" in result.stdout
    assert folder_bytes(out) == reference
    assert {name: (out / name).stat().st_mtime_ns for name in kept} == kept   # not written again
    assert not partial.exists()


def test_interrupted_merge_keeps_journal_of_finished_shards_only(models_bf16, tmp_path, reference, monkeypatch):
    out = tmp_path / "run" / "merged"
    interrupted(monkeypatch, spec_text(models_bf16), out, 20)
    head, *recorded = journal_lines(out)
    assert len(head["merge"]) == 64 and 0 < len(recorded) < 20
    for record in recorded:   # each recorded shard is complete: the reference's bytes
        assert (Path(str(out) + ".partial") / record["file"]).read_bytes() == reference[record["file"]]
        assert record["size"] == len(reference[record["file"]])
    result = run_merge(spec_text(models_bf16), out, max_shard_size=SHARD, progress=False, resume=True,
                       validate=False)
    assert result.resumed_shards == len(recorded) and folder_bytes(out) == reference


def test_a_corrupted_shard_is_computed_again(models_bf16, tmp_path, reference, caplog, monkeypatch):
    out = tmp_path / "run" / "merged"
    interrupted(monkeypatch, spec_text(models_bf16), out, 20)
    recorded = [r["file"] for r in journal_lines(out)[1:]]
    damaged = Path(str(out) + ".partial") / recorded[1]
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 1
    damaged.write_bytes(bytes(data))
    result = run_merge(spec_text(models_bf16), out, max_shard_size=SHARD, progress=False, resume=True,
                       validate=False)
    assert result.resumed_shards == len(recorded) - 1
    assert f"{recorded[1]} changed after it was recorded as finished; computing it again" in caplog.text
    assert folder_bytes(out) == reference


def test_resume_of_a_different_merge_is_refused(models_bf16, tmp_path, cli, monkeypatch):
    out = tmp_path / "run" / "merged"
    interrupted(monkeypatch, spec_text(models_bf16), out, 10)
    other = write_spec(tmp_path / "other.yaml", spec_text(models_bf16, weight=0.4))
    started = json.loads((Path(str(out) + ".partial") / JOURNAL).read_text().splitlines()[0])["started"]
    result = cli("run", other, "-o", out, "--max-shard-size", SHARD, "--resume", "--no-validate")
    assert result.exit_code == 2
    assert result.stderr == (
        f"error: {out}.partial: the partial output belongs to a different merge (started {started} from a spec): "
        "the spec, the inputs, the options or the mergekit_lite version differ\n"
        "Hint: resume with exactly the same spec, inputs and options, or run with --overwrite instead of --resume to "
        "start over (the partial folder is replaced)\n")
    # A different shard size is a different layout: refused too. Another merge's partial folder is replaced only
    # with --overwrite (tests/test_ownership.py).
    assert cli("run", other, "-o", out, "--max-shard-size", "8kB", "--resume", "--no-validate").exit_code == 2
    assert cli("run", other, "-o", out, "--max-shard-size", SHARD, "--quiet", "--no-validate",
               "--overwrite").exit_code == 0


def test_partial_without_journal_is_refused_and_resume_without_partial_just_merges(models_bf16, tmp_path, cli,
                                                                                    reference, monkeypatch):
    spec = write_spec(tmp_path / "spec.yaml", spec_text(models_bf16))
    out = tmp_path / "run" / "merged"
    interrupted(monkeypatch, spec_text(models_bf16), out, 10)
    partial = Path(str(out) + ".partial")
    (partial / JOURNAL).unlink()
    result = cli("run", spec, "-o", out, "--max-shard-size", SHARD, "--resume", "--no-validate")
    assert result.exit_code == 2
    assert result.stderr == (
        f"error: {partial}: cannot resume: the partial folder has no readable journal of finished shards "
        f"({JOURNAL})\nHint: run without --resume to start over (the partial folder is replaced)\n")
    # a folder of that name that no merge made is never resumed from, nor replaced
    shutil.rmtree(partial)
    partial.mkdir()
    (partial / "model-00001-of-00039.safetensors").write_bytes(b"junk")
    result = cli("run", spec, "-o", out, "--max-shard-size", SHARD, "--resume", "--no-validate")
    assert (result.exit_code, result.stderr) == (2, (
        f"error: {partial}: this folder was not made by a merge (it has no .mergekit_lite-partial.json; found "
        "model-00001-of-00039.safetensors), and a merge writes its unfinished output under this name\nHint: a merge "
        "writes its unfinished output under this name: move it away (or delete it yourself), or choose another "
        "output path with -o\n"))
    assert (partial / "model-00001-of-00039.safetensors").read_bytes() == b"junk"
    (partial / "model-00001-of-00039.safetensors").unlink()
    partial.rmdir()
    result = cli("run", spec, "-o", out, "--max-shard-size", SHARD, "--resume", "--quiet", "--no-validate")
    assert result.exit_code == 0 and folder_bytes(out) == reference


def test_crash_after_the_last_shard_resumes_with_every_shard_kept(models_bf16, tmp_path, reference, monkeypatch):
    """Killed after all shards were written but before the output was renamed into place."""
    import mergekit_lite.api.merge as api

    out = tmp_path / "run" / "merged"
    with monkeypatch.context() as patch:
        patch.setattr(api, "write_run_settings", lambda *args: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            run_merge(spec_text(models_bf16), out, max_shard_size=SHARD, progress=False, validate=False)
    shards = [name for name in reference if name.endswith(".safetensors")]
    assert len(journal_lines(out)) == 1 + len(shards)
    result = run_merge(spec_text(models_bf16), out, max_shard_size=SHARD, progress=False, resume=True,
                       validate=False)
    assert result.resumed_shards == len(shards) and folder_bytes(out) == reference


# ---------------------------------------------------------------- a tampered partial folder (hostile inputs)

NO_JOURNAL = (f"cannot resume: the partial folder has no readable journal of finished shards ({JOURNAL})\n"
              "Hint: run without --resume to start over (the partial folder is replaced)\n")


@pytest.mark.parametrize("head", ["[]", '"merge"', "42", "{not json", ""])
def test_a_journal_that_is_not_one_is_refused(models_bf16, tmp_path, cli, monkeypatch, head):
    spec = write_spec(tmp_path / "spec.yaml", spec_text(models_bf16))
    out = tmp_path / "run" / "merged"
    interrupted(monkeypatch, spec_text(models_bf16), out, 10)
    partial = Path(str(out) + ".partial")
    (partial / JOURNAL).write_text(head + "\n")
    result = cli("run", spec, "-o", out, "--max-shard-size", SHARD, "--resume", "--no-validate")
    assert (result.exit_code, result.stderr) == (2, f"error: {partial}: {NO_JOURNAL}")


def test_journal_records_outside_the_plan_are_never_read_or_kept(models_bf16, tmp_path, reference, monkeypatch):
    """Records of files the layout does not plan (a path out of the folder, a made-up name) and records with
    a wrong CRC are dropped; only the planned, intact shards are kept, and the result is the same bytes."""
    out = tmp_path / "run" / "merged"
    interrupted(monkeypatch, spec_text(models_bf16), out, 10)
    partial = Path(str(out) + ".partial")
    lines = (partial / JOURNAL).read_text().splitlines()
    first = json.loads(lines[1])
    outside = tmp_path / "secret.bin"
    outside.write_bytes(b"not a shard")
    forged = [{"file": "../../secret.bin", "size": 11, "crc32": 0},
              {"file": "model-99999-of-99999.safetensors", "size": 1, "crc32": 0},
              {**first, "crc32": first["crc32"] ^ 1},
              {"file": 7, "size": "x"}]
    (partial / JOURNAL).write_text("\n".join([lines[0], *lines[2:], *map(json.dumps, forged)]) + "\n")
    read = []
    import mergekit_lite.output.journal as resume

    real_crc = resume.file_crc32
    monkeypatch.setattr(resume, "file_crc32", lambda path: read.append(Path(path).resolve()) or real_crc(path))
    result = run_merge(spec_text(models_bf16), out, max_shard_size=SHARD, progress=False, resume=True,
                       validate=False)
    assert outside.resolve() not in read and all(p.parent == partial.resolve() for p in read)
    # kept: the records after the first (which was replaced by one with a wrong CRC and computed again)
    assert result.resumed_shards == len(lines) - 2 and folder_bytes(out) == reference
    assert outside.read_bytes() == b"not a shard"


def test_symbolic_links_in_the_partial_folder_are_refused(models_bf16, tmp_path, cli, monkeypatch):
    """A planted link (to a file the merge would then overwrite) is never followed: resuming is refused."""
    spec = write_spec(tmp_path / "spec.yaml", spec_text(models_bf16))
    out = tmp_path / "run" / "merged"
    interrupted(monkeypatch, spec_text(models_bf16), out, 10)
    partial = Path(str(out) + ".partial")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    unfinished = max(int(line["file"][6:11]) for line in journal_lines(out)[1:]) + 1
    link = partial / f"model-{unfinished:05d}-of-00039.safetensors"
    link.unlink(missing_ok=True)
    link.symlink_to(victim)
    for flags in (["--resume"], []):   # not followed, and not removed either: it is not the merge's
        result = cli("run", spec, "-o", out, "--max-shard-size", SHARD, "--no-validate", *flags)
        assert (result.exit_code, result.stderr) == (2, (
            f"error: {partial}: the partial output folder holds files that no merge wrote ({link.name} (a symbolic "
            "link))\nHint: move them out of it and run again\n"))
        assert victim.read_text() == "precious" and link.is_symlink()
    # the partial folder itself a link: refused with or without --resume; neither it nor its target is touched
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("kept")
    shutil.rmtree(partial)
    partial.symlink_to(elsewhere, target_is_directory=True)
    for flags in (["--resume"], []):
        result = cli("run", spec, "-o", out, "--max-shard-size", SHARD, "--no-validate", *flags)
        assert (result.exit_code, result.stderr) == (2, (
            f"error: {partial}: the partial output folder is a symbolic link, which a merge never makes\n"
            "Hint: a merge writes its unfinished output under this name: move it away (or delete it yourself), or "
            "choose another output path with -o\n"))
        assert partial.is_symlink() and sorted(os.listdir(elsewhere)) == ["keep.txt"]
    partial.unlink()
    result = cli("run", spec, "-o", out, "--max-shard-size", SHARD, "--quiet", "--no-validate")
    assert result.exit_code == 0 and (elsewhere / "keep.txt").read_text() == "kept"
    assert sorted(os.listdir(elsewhere)) == ["keep.txt"] and out.is_dir() and not out.is_symlink()


def test_a_shard_file_replaced_by_a_link_is_not_written_through(tmp_path):
    """The writer itself never follows a link (O_NOFOLLOW), whatever the caller checked before."""
    import torch

    from mergekit_lite.errors import OutputError
    from mergekit_lite.output.writer import ShardWriter
    from mergekit_lite.plan.shards import Entry

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "shard.safetensors").symlink_to(victim)
    with pytest.raises(OutputError, match="shard.safetensors: cannot write: Too many levels of symbolic links"):
        ShardWriter(str(tmp_path / "shard.safetensors"), [Entry("w", torch.float32, (2, 2))])
    assert victim.read_text() == "precious"
