"""The output folder's low-level safety: the lock that keeps two merges out of one OUT, files created without
ever following a link, a rename that never replaces, the marker that makes a partial folder recognisably ours,
and the free-space check.

What in OUT and ``OUT.partial`` is ours, and so may be replaced, is ownership.py; the checks and steps of an
output's life built on it (check before reading, start the partial folder, the final rename) are place.py.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import stat
import sys
import time
from typing import Any, Optional

from ..errors import MergeError, OutputError, UsageError
from ..sources.checkpoint import read_json_object
from ..units import format_size

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks, runs are not serialized
    fcntl = None  # type: ignore[assignment]


LEFTOVER = ("the next run of this merge deletes them, or continues from the finished shards with --resume; "
            "delete them yourself to free the space now")
MARKER = ".mergekit_lite-partial.json"      # in OUT.partial: created exclusively with the folder, says it is ours
LOCK_SUFFIX = ".mergekit_lite.lock"         # OUT + this: a name no other tool uses (not OUT.lock: `-o uv`, uv.lock)
LOCK_TEXT = "mergekit_lite lock, process {pid}\n"
_LOCK_PATTERN = re.compile(r"mergekit_lite lock, process (\d+)\n\Z")
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def partial_path(out: str) -> str:
    return os.path.abspath(out).rstrip(os.sep) + ".partial"


def lock_path(out: str) -> str:
    return os.path.abspath(out).rstrip(os.sep) + LOCK_SUFFIX


def write_new(path: str, data: bytes, replace: bool = False) -> None:
    """Create ``path`` holding ``data``, flushed to disk. The file is created exclusively (O_EXCL) and never
    through a link (O_NOFOLLOW), so nothing that was at that name is ever written to. ``replace``: an entry
    already at the name is unlinked first (the entry, never what a link points to); only for the files of a
    folder the caller knows is ours."""
    if replace:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    _write_synced(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, 0o644), data)


def append_to(path: str, data: bytes) -> None:
    """Append ``data`` to an existing file of ours and flush it to disk; never through a link."""
    _write_synced(os.open(path, os.O_WRONLY | os.O_APPEND | _NOFOLLOW | _CLOEXEC), data)


def _write_synced(fd: int, data: bytes) -> None:
    """Write all of ``data`` to ``fd``, flush it to disk and close it."""
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def write_marker(partial: str, fields: dict[str, Any]) -> None:
    write_new(os.path.join(partial, MARKER), (json.dumps({"tool": "mergekit_lite", **fields}) + "\n").encode())


def read_marker(partial: str) -> Optional[dict[str, Any]]:
    """The marker of a partial folder a merge made; None when there is none, or it is not one of ours."""
    path = os.path.join(partial, MARKER)
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return None
        marker = read_json_object(path, MARKER, partial, "")
    except (OSError, MergeError):
        return None
    return marker if marker.get("tool") == "mergekit_lite" else None


def rename_noreplace(src: str, dst: str) -> None:
    """Rename ``src`` to ``dst`` only if nothing is at ``dst`` (FileExistsError otherwise): one atomic step with
    Linux's renameat2(RENAME_NOREPLACE); elsewhere a check just before the rename."""
    if _renameat2_noreplace(src, dst):
        return
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst)
    os.rename(src, dst)


def _renameat2_noreplace(src: str, dst: str) -> bool:
    """True when renamed; False when the call is not available here (the caller falls back)."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        call = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    call.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_cwd, noreplace = -100, 1
    if call(at_cwd, os.fsencode(src), at_cwd, os.fsencode(dst), noreplace) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):   # an old kernel, or a filesystem without the flag
        return False
    raise OSError(code, os.strerror(code), dst)


def check_free_space(out: str, needed: int) -> None:
    """Refuse a run whose tensors cannot fit in the free space of OUT's filesystem (a leftover partial folder of
    ours, which the run replaces or continues, counts as free). Checked before any tensor is read."""
    existing = os.path.abspath(out)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    partial = partial_path(out)
    try:
        reclaimed = _folder_bytes(partial) if read_marker(partial) is not None and not os.path.islink(partial) else 0
        free = shutil.disk_usage(existing).free + reclaimed
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
    """``OUT.mergekit_lite.lock``, exclusively locked (flock) for the whole run: a second merge writing the same
    OUT is refused at once rather than interleaving its shards with the first one's. The kernel drops the lock
    when its process dies; the file a killed run leaves is recognised (its text) and taken over.

    The file is created exclusively and never through a link; an existing one is used only if it is a plain
    file (no other hard links) holding nothing but a lock's text, and it is removed at the end only if the name
    still holds the file this run locked."""

    def __init__(self, out: str):
        self.out = out
        self.path = lock_path(out)
        self._fd: Optional[int] = None

    def __enter__(self) -> "OutputLock":
        if fcntl is None:
            return self
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            for _ in range(100):   # the file may go away between our steps (its holder finished): try again
                self._fd = self._lock()
                if self._fd is not None:
                    return self
            raise OSError(errno.EAGAIN, "the lock file keeps changing")
        except OSError as exc:
            raise OutputError(f"cannot create the lock file: {exc.strerror}", file=self.path,
                              hint="check that the output's parent folder is writable") from None

    def _lock(self) -> Optional[int]:
        fd = self._open()
        if fd is None:
            return None
        try:
            try:   # first: the holder may be between truncating the file and writing its process id
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                found = _LOCK_PATTERN.match(os.pread(fd, 64, 0).decode(errors="replace"))
                raise OutputError(f"another merge (process {found.group(1) if found else 'unknown'}) is writing this "
                                  "output now", file=self.out,
                                  hint="wait for it to finish, or write to another output path with -o") from None
            self._check_ours(fd)   # nothing was changed yet; closing the descriptor drops the lock
            if not self._still_named(fd):
                os.close(fd)
                return None
            os.ftruncate(fd, 0)
            os.pwrite(fd, LOCK_TEXT.format(pid=os.getpid()).encode(), 0)
            return fd
        except BaseException:
            os.close(fd)
            raise

    def _open(self) -> Optional[int]:
        """A new lock file, or the one already there (opened without creating or truncating it)."""
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, 0o644)
        except FileExistsError:
            pass
        try:
            return os.open(self.path, os.O_RDWR | _NOFOLLOW | _CLOEXEC | getattr(os, "O_NONBLOCK", 0))
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP or os.path.islink(self.path):
                raise UsageError("the lock file is a symbolic link, which a merge never makes", file=self.path,
                                 hint="delete the link yourself (what it points to is not a lock), or choose another "
                                      "output path with -o") from None
            raise

    def _check_ours(self, fd: int) -> None:
        """A plain file with one name, empty (a run stopped right after creating it) or holding a lock's text."""
        info = os.fstat(fd)
        if (not stat.S_ISREG(info.st_mode) or info.st_nlink != 1 or info.st_size > 64
                or (info.st_size and not _LOCK_PATTERN.match(os.pread(fd, 64, 0).decode(errors="replace")))):
            raise UsageError("this file is where the merge keeps its lock, but it is not a lock file of mergekit_lite",
                             file=self.path, hint="move it away, or choose another output path with -o")

    def _still_named(self, fd: int) -> bool:
        """Whether the lock's name still holds this file (not replaced or removed since we opened it)."""
        try:
            named, held = os.lstat(self.path), os.fstat(fd)
        except OSError:
            return False
        return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)

    def __exit__(self, *exc_info: object) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if self._still_named(fd):
                os.unlink(self.path)    # while still holding the lock (see __enter__'s retry)
        except OSError:
            pass
        finally:
            os.close(fd)


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


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")
