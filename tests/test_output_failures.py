"""When the environment fails a merge: a full disk, a second merge into the same folder, Ctrl-C. Each gets one
clear message and exit code, and never leaves anything that looks like a finished output."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.hostile import Models, build_models, leftover_problems, linear_spec
from safetensors import SafetensorError, safe_open

from mergekit_lite.output.folder import LOCK_SUFFIX, OutputLock

pytestmark = pytest.mark.usefixtures("tiny_shards")   # shards of a few kB on the command line (conftest.py)

ROOT = Path(__file__).resolve().parent.parent
LEFTOVER = ("the next run of this merge deletes them, or continues from the finished shards with --resume; "
            "delete them yourself to free the space now")
FULL = f"Hint: free some disk space and run again ({LEFTOVER})"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Models:
    return build_models(tmp_path_factory.mktemp("tiny"))


def assert_only_partial(out: Path) -> None:
    assert leftover_problems(out) == []
    shards = list(Path(f"{out}.partial").glob("*.safetensors"))
    with pytest.raises(SafetensorError):   # the shard being written when the run stopped
        safe_open(str(max(shards, key=os.path.getmtime)), framework="pt")


def test_disk_full_while_writing_tensors(cli, tiny, tmp_path, monkeypatch):
    """A write hook: a disk with 10 kB free; a write that does not fit fails with ENOSPC, as on a full disk."""
    real_pwrite, written = os.pwrite, [0]

    def pwrite(fd, data, offset):
        if written[0] + len(data) > 10_000:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written[0] += len(data)
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    spec = linear_spec(tmp_path, tiny.a, tiny.b)
    out = tmp_path / "out"
    result = cli("run", spec, "-o", out, "--quiet", "--max-shard-size", "8kB")
    message, hint = result.stderr.splitlines()
    assert ": cannot write tensor '" in message, result.stderr
    shard, failed = message.removeprefix("error: ").split(": cannot write tensor '")
    failed, reason = failed.split("': ")
    assert (result.exit_code, reason, hint) == (1, "No space left on device", FULL)
    # the tensor named is one planned into the shard named, and that shard is the one left unfinished
    from mergekit_lite import make_plan
    from mergekit_lite.plan.shards import output_layout

    layout = {s.file: [e.name for e in s.entries] for s in output_layout(make_plan(spec), 8000)}
    assert Path(shard).parent == Path(f"{out}.partial") and failed in layout[Path(shard).name]
    with pytest.raises(SafetensorError):
        safe_open(shard, framework="pt")
    assert leftover_problems(out) == []


def _mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.decode().strip()}")


@pytest.fixture
def small_disk(tmp_path):
    """A real 64 kB filesystem (tmpfs; needs root, else the test is skipped)."""
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "64k")
    yield disk
    subprocess.run(["umount", str(disk)], check=False)


def test_not_enough_space_is_refused_before_reading(cli, tiny, small_disk, tmp_path):
    spec = linear_spec(tmp_path, tiny.a, tiny.a, tiny.b, tiny.b)
    out = small_disk / "out"
    (small_disk / "filler").write_bytes(b"\0" * 48 * 1024)
    result = cli("run", spec, "-o", out, "--quiet")
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    assert (result.exit_code, result.stderr) == (1, (
        f"error: {out}: the merged tensors need 22.85 kB but only {free / 1000:.2f} kB is free there\n"
        "Hint: free some disk space, or write the output elsewhere with -o\n"))
    assert sorted(os.listdir(small_disk)) == ["filler"]


@pytest.fixture
def disk_128k(tmp_path):
    """A real 128 kB filesystem (tmpfs; needs root, else the test is skipped)."""
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "128k")
    yield disk
    subprocess.run(["umount", str(disk)], check=False)


def test_disk_that_fills_up_during_the_merge(cli, tiny, disk_128k, tmp_path, monkeypatch):
    """Real ENOSPC from the kernel: the free-space check passes, then another writer takes the space (here the
    check is skipped, as if the disk filled up in between)."""
    import mergekit_lite.api.merge as merge

    monkeypatch.setattr(merge, "check_free_space", lambda out, needed: None)
    # 16 kB left: a 4 kB page each for the lock, the partial folder's marker and its journal, then the shards
    # run out of space
    (disk_128k / "filler").write_bytes(b"\0" * 112 * 1024)
    spec = linear_spec(tmp_path, tiny.a, tiny.b)
    out = disk_128k / "out"
    result = cli("run", spec, "-o", out, "--quiet", "--max-shard-size", "4kB")
    assert result.exit_code == 1
    message, hint = result.stderr.splitlines()
    assert message.startswith(f"error: {out}.partial/model-000") and message.endswith(": No space left on device")
    assert hint == FULL
    assert_only_partial(out)
    # the next run of this merge replaces the leftover (another merge's leftover is replaced only on --overwrite)
    (disk_128k / "filler").unlink()
    result = cli("run", spec, "-o", out, "--quiet", "--no-validate", "--max-shard-size", "4kB")
    assert result.exit_code == 0 and not Path(f"{out}.partial").exists(), result.stderr


def test_a_second_merge_into_the_same_output_is_refused(cli, tiny, tmp_path):
    spec = linear_spec(tmp_path, tiny.a, tiny.b)
    out = tmp_path / "out"
    partial = Path(f"{out}.partial")
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"the other run's work")
    with OutputLock(str(out)):
        result = cli("run", spec, "-o", out, "--quiet")
    assert (result.exit_code, result.stderr) == (1, (
        f"error: {out}: another merge (process {os.getpid()}) is writing this output now\n"
        "Hint: wait for it to finish, or write to another output path with -o\n"))
    assert (partial / "model.safetensors").read_bytes() == b"the other run's work"
    assert not out.exists() and not Path(f"{out}{LOCK_SUFFIX}").exists()


def _start_paused(tiny: Models, tmp_path: Path, out: Path) -> subprocess.Popen:
    spec = linear_spec(tmp_path, tiny.a, tiny.b, name="paused.yaml")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    process = subprocess.Popen([sys.executable, str(ROOT / "tests" / "helpers" / "paused_merge.py"), str(tmp_path), "run",
                                str(spec), "-o", str(out), "--quiet", "--no-validate"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    while not (tmp_path / "paused").exists():   # waits for a state, not for a time
        assert process.poll() is None, process.communicate()
        time.sleep(0.02)
    return process


def test_two_processes_merging_into_one_output(cli, tiny, tmp_path):
    out = tmp_path / "out"
    first = _start_paused(tiny, tmp_path, out)
    try:
        spec = linear_spec(tmp_path, tiny.b, tiny.a)
        second = subprocess.run([sys.executable, "-m", "mergekit_lite", "run", str(spec), "-o", str(out), "--quiet"],
                                capture_output=True, text=True, cwd=ROOT)
        assert (second.returncode, second.stderr) == (1, (
            f"error: {out}: another merge (process {first.pid}) is writing this output now\n"
            "Hint: wait for it to finish, or write to another output path with -o\n"))
    finally:
        (tmp_path / "go").touch()
    assert first.wait(timeout=120) == 0, first.communicate()
    assert not Path(f"{out}.partial").exists() and not Path(f"{out}{LOCK_SUFFIX}").exists()
    from mergekit_lite import validate

    assert validate(out, device="cpu", forward=False).passed


def test_sigint_mid_merge(tiny, tmp_path):
    out = tmp_path / "out"
    process = _start_paused(tiny, tmp_path, out)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert (process.returncode, stdout, stderr) == (130, "", (
        f"interrupted: {out} was not written; the unfinished files are in {out}.partial ({LEFTOVER})\n"))
    assert sorted(os.listdir(tmp_path)) == ["out.partial", "paused", "paused.yaml"]
    assert_only_partial(out)
