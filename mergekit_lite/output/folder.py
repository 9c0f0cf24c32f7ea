"""The output folder's safety rules: never overwrite without asking, never inside an input, never a
folder that looks complete when it is not (everything is written to ``OUT.partial`` and renamed at the end),
never two merges writing one folder at once (``OUT.lock``), and not a run that cannot fit on the disk.
"""

from __future__ import annotations

import os
import shutil
from typing import Iterable, Optional

from ..errors import OutputError, UsageError
from ..units import format_size

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks, runs are not serialized
    fcntl = None  # type: ignore[assignment]


LEFTOVER = ("the next run of this merge deletes them, or continues from the finished shards with --resume; "
            "delete them yourself to free the space now")


def partial_path(out: str) -> str:
    return os.path.abspath(out).rstrip(os.sep) + ".partial"


def check_output(out: str, inputs: Iterable[str], overwrite: bool) -> None:
    """Refuse an output that would destroy something: run before any tensor data is read."""
    target = os.path.realpath(out)
    if os.path.exists(out):
        if not os.path.isdir(out):
            raise UsageError("exists and is not a folder", file=out, hint="choose another output path with -o")
        if os.listdir(out) and not overwrite:
            raise UsageError("output folder already exists and is not empty", file=out,
                             hint="pass --overwrite to replace it, or choose another output path with -o")
    for folder in inputs:
        source = os.path.realpath(folder)
        if _inside(target, source):
            raise UsageError(f"the output folder is inside input model folder {folder}", file=out,
                             hint="write the merged model somewhere else: inputs are never written to")
        if _inside(source, target):
            raise UsageError(f"the output folder contains input model folder {folder}", file=out,
                             hint="choose an output path that does not hold an input (it may be replaced)")


def check_free_space(out: str, needed: int) -> None:
    """Refuse a run whose tensors cannot fit in the free space of OUT's filesystem (a leftover ``OUT.partial``,
    which the run deletes first, counts as free). Checked before any tensor is read."""
    existing = os.path.abspath(out)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    try:
        free = shutil.disk_usage(existing).free + _folder_bytes(partial_path(out))
    except OSError:
        return
    if needed > free:
        raise OutputError(f"the merged tensors need {format_size(needed)} but only {format_size(free)} is free there",
                          file=out, hint="free some disk space, or write the output elsewhere with -o")


def _folder_bytes(folder: str) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                pass
    return total


class OutputLock:
    """``OUT.lock``, exclusively locked (flock) for the whole run: a second merge writing the same OUT is
    refused at once rather than interleaving its shards with the first one's. The kernel drops the lock when
    its process dies, so a lock file left by a killed run never blocks the next one."""

    def __init__(self, out: str):
        self.out = out
        self.path = os.path.abspath(out).rstrip(os.sep) + ".lock"
        self._fd: Optional[int] = None

    def __enter__(self) -> "OutputLock":
        if fcntl is None:
            return self
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            self._fd = self._lock()
        except OSError as exc:
            raise OutputError(f"cannot create the lock file: {exc.strerror}", file=self.path,
                              hint="check that the output's parent folder is writable") from None
        return self

    def _lock(self) -> int:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise OutputError(f"another merge (process {holder}) is writing this output now", file=self.out,
                                  hint="wait for it to finish, or write to another output path with -o") from None
            try:   # the previous holder may have deleted the file between our open and our lock: retry
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return fd

    def __exit__(self, *exc_info: object) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.path)    # while still holding the lock (see _lock's retry)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def start_partial(out: str, keep: bool = False) -> str:
    """Create a fresh ``OUT.partial`` folder (a leftover from an interrupted run is removed, unless ``keep``:
    ``--resume`` continues from it, see journal.py)."""
    partial = partial_path(out)
    if keep and os.path.islink(partial):
        raise UsageError("cannot resume: the partial folder is a symbolic link, which a merge never makes",
                         file=partial, hint="run without --resume to start over (the link is removed)")
    try:
        if os.path.islink(partial):
            os.unlink(partial)
        elif os.path.exists(partial) and not keep:
            shutil.rmtree(partial)
        os.makedirs(partial, exist_ok=keep)
    except OSError as exc:
        raise OutputError(f"cannot create the output folder: {exc.strerror}", file=partial,
                          hint="check that the parent folder exists and is writable") from None
    return partial


def commit_partial(partial: str, out: str) -> None:
    """Make the finished output appear under its name in one rename (replacing an old one if allowed)."""
    old = None
    try:
        fsync_dir(partial)
        if os.path.exists(out):
            if os.listdir(out):
                old = os.path.abspath(out).rstrip(os.sep) + ".old"
                if os.path.exists(old):
                    shutil.rmtree(old)
                os.rename(out, old)
            else:
                os.rmdir(out)
        os.rename(partial, out)
        fsync_dir(os.path.dirname(os.path.abspath(out)))
    except OSError as exc:
        raise OutputError(f"cannot move the finished output into place: {exc.strerror}", file=out,
                          hint=f"the complete result is in {partial}") from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
