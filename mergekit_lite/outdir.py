"""The output folder's safety rules: never overwrite without asking, never inside an input, and never a
folder that looks complete when it is not (everything is written to ``OUT.partial`` and renamed at the end).
"""

from __future__ import annotations

import os
import shutil
from typing import Iterable

from .errors import OutputError, UsageError


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


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def start_partial(out: str, keep: bool = False) -> str:
    """Create a fresh ``OUT.partial`` folder (a leftover from an interrupted run is removed, unless ``keep``:
    ``--resume`` continues from it, see resume.py)."""
    partial = partial_path(out)
    try:
        if os.path.exists(partial) and not keep:
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
