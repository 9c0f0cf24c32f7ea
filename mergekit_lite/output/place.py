"""Where a merge's output goes, and the only things there it may replace.

Checked before any tensor is read (``check_place``; the dry run shows the same refusals): the output path
names a folder that can be created or replaced (not empty, not the current folder or one holding it, not a
link), no input and not the spec lives in OUT or OUT.partial, OUT is absent, an empty folder or (with
``--overwrite``) an output of ours, and OUT.partial is absent, empty, or our own partial folder: of this merge
(continued with ``--resume``, else started over) or, with ``--overwrite``, of another one.

Everything is written to OUT.partial (marked as ours when made) and renamed into place at the end
(``commit_partial``), and only if OUT is still what was checked: an OUT that appeared meanwhile, or an output
that changed or gained files of someone else's, is left as it is and the finished result stays in OUT.partial.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import tempfile
from dataclasses import dataclass
from typing import Iterable, Optional

from ..errors import OutputError, UsageError
from .folder import MARKER, fsync_dir, now, partial_path, read_marker, rename_noreplace, write_marker
from .ownership import describe, listing, not_our_output, output_names, partial_names, remove_ours, strangers

log = logging.getLogger("mergekit_lite")

NEW_FOLDER = "give the path of a new folder, e.g. -o merged"
NOT_OURS = ("choose another output path with -o, or move your files out of the folder first (--overwrite replaces "
            "only the output of an earlier merge, or an empty folder)")
MOVE_PARTIAL = ("a merge writes its unfinished output under this name: move it away (or delete it yourself), or "
                "choose another output path with -o")
Identity = tuple[int, int]   # (st_dev, st_ino): "still the folder that was checked"


@dataclass(frozen=True)
class Place:
    """What is at the output's place, as checked before the merge (and again under its lock)."""

    out: str                      # as the user gave it, for messages
    path: str                     # absolute
    partial: str
    merge: str                    # the merge's fingerprint (journal.py): which partial folder is this merge's
    found: Optional[Identity]     # OUT as checked; None: there was nothing
    empty: bool                   # OUT was an empty folder
    partial_state: str            # "absent", "empty", "this merge" or "replace" (another merge's, --overwrite)


def check_place(out: str, inputs: Iterable[str], spec_file: Optional[str], merge: str, *, overwrite: bool,
                resume: bool) -> Place:
    """Refuse an output that would destroy something or fail at the end; run before any tensor data is read."""
    check_path(out)
    path, partial = os.path.abspath(out), partial_path(out)
    _check_inputs(out, path, partial, inputs, spec_file)
    try:
        found, empty = _check_out(out, path, overwrite)
        state = _check_partial(partial, merge, overwrite, resume)
    except OSError as exc:
        raise OutputError(f"cannot look at the output's place: {exc.strerror}", file=exc.filename or out,
                          hint="check the permissions of the output's parent folder") from None
    return Place(out, path, partial, merge, found, empty, state)


def check_path(out: str) -> None:
    """The output path names a folder a merge can create or replace (checked before anything is made next to it)."""
    if out == "":
        raise UsageError("the output path is empty", hint=NEW_FOLDER)
    path = os.path.abspath(out)
    if os.path.islink(path):
        raise UsageError(f"the output path is a symbolic link (to {os.readlink(path)}); a merge replaces the folder at "
                         "its path, never what a link points to", file=out,
                         hint="give the folder itself as -o, or choose another output path")
    try:
        here = os.path.realpath(os.getcwd())
    except OSError:   # the current folder was deleted: it cannot be the output
        return
    if _inside(here, os.path.realpath(path)):
        raise UsageError("the output path is the current folder or one that holds it, which a merge cannot replace "
                         "(it writes a new folder and renames it into place)", file=out, hint=NEW_FOLDER)


def _check_inputs(out: str, path: str, partial: str, inputs: Iterable[str], spec_file: Optional[str]) -> None:
    """No input inside OUT or OUT.partial (both are replaced), no output inside an input, the spec not inside."""
    target, unfinished = _located(path), _located(partial)
    for folder in inputs:
        source = os.path.realpath(folder)
        if _inside(target, source):
            raise UsageError(f"the output folder is inside input model folder {folder}", file=out,
                             hint="write the merged model somewhere else: inputs are never written to")
        if _inside(source, target):
            raise UsageError(f"the output folder contains input model folder {folder}", file=out,
                             hint="choose an output path that does not hold an input (it may be replaced)")
        if _inside(source, unfinished):
            raise UsageError(f"the partial output folder contains input model folder {folder}", file=partial,
                             hint="move the model out of it (a merge replaces that folder) and give its new path")
    if spec_file is not None:
        spec = os.path.realpath(spec_file)
        places = ((target, f"the output folder {out}"), (unfinished, f"the partial output folder {partial}"))
        for folder, name in places:
            if _inside(spec, folder):
                raise UsageError(f"the spec file is inside {name}, which this merge replaces", file=spec_file,
                                 hint=f"copy it elsewhere first (e.g. cp {spec_file} spec.yaml) and run that copy")


def _check_out(out: str, path: str, overwrite: bool) -> tuple[Optional[Identity], bool]:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None, False
    if not stat.S_ISDIR(info.st_mode):
        raise UsageError("exists and is not a folder", file=out, hint="choose another output path with -o")
    if not os.listdir(path):
        return (info.st_dev, info.st_ino), True
    problem = not_our_output(path)
    if problem:
        raise UsageError(f"{problem}, so a merge never replaces it", file=out, hint=NOT_OURS)
    if not overwrite:
        raise UsageError("output folder already exists and is not empty", file=out,
                         hint="pass --overwrite to replace it, or choose another output path with -o")
    return (info.st_dev, info.st_ino), False


def _check_partial(partial: str, merge: str, overwrite: bool, resume: bool) -> str:
    try:
        mode = os.lstat(partial).st_mode
    except FileNotFoundError:
        return "absent"
    if stat.S_ISLNK(mode) or not stat.S_ISDIR(mode):
        kind = "folder is a symbolic link" if stat.S_ISLNK(mode) else "path is not a folder"
        raise UsageError(f"the partial output {kind}, which a merge never makes", file=partial, hint=MOVE_PARTIAL)
    if not os.listdir(partial):
        return "empty"
    marker = read_marker(partial)
    if marker is None:
        why = f"it has no {MARKER}" if not os.path.lexists(os.path.join(partial, MARKER)) else \
            f"its {MARKER} was not written by mergekit_lite"
        raise UsageError(f"this folder was not made by a merge ({why}; found {describe(listing(partial))}), and a "
                         "merge writes its unfinished output under this name", file=partial, hint=MOVE_PARTIAL)
    found = strangers(partial, partial_names)
    if found:
        raise UsageError(f"the partial output folder holds files that no merge wrote ({describe(found)})",
                         file=partial, hint="move them out of it and run again")
    if marker.get("merge") == merge:
        return "this merge"
    started = f" (started {marker.get('started')} from {marker.get('spec') or 'a spec'})"
    if resume:
        raise UsageError(f"the partial output belongs to a different merge{started}: the spec, the inputs, the "
                         "options or the mergekit_lite version differ", file=partial,
                         hint="resume with exactly the same spec, inputs and options, or run with --overwrite instead "
                              "of --resume to start over (the partial folder is replaced)")
    if not overwrite:
        raise UsageError(f"the partial output folder holds the unfinished output of a different merge{started}; it is "
                         "kept", file=partial, hint="finish that merge with --resume and its own spec and options, or "
                                                    "pass --overwrite to replace it with this merge")
    return "replace"


def start_partial(place: Place, spec_file: Optional[str], resume: bool) -> str:
    """The partial folder to write into: ours from an interrupted run of this merge (``resume``), or a new one,
    made exclusively and marked as ours (a leftover of ours is removed first, file by file)."""
    partial = place.partial
    if place.partial_state == "this merge" and resume:
        return partial
    try:
        if place.partial_state in ("this merge", "replace"):
            found = remove_ours(partial, partial_names)
            if found:
                raise UsageError(f"the partial output folder holds files that no merge wrote ({describe(found)})",
                                 file=partial, hint="move them out of it and run again")
        elif place.partial_state == "empty":
            os.rmdir(partial)
        os.mkdir(partial)
        write_marker(partial, {"merge": place.merge, "spec": spec_file, "started": now(), "out": place.path})
    except OSError as exc:
        raise OutputError(f"cannot create the output folder: {exc.strerror}", file=partial,
                          hint="check that the parent folder exists and is writable") from None
    return partial


def commit_partial(place: Place) -> None:
    """Make the finished output appear under its name in one rename, replacing only what was checked."""
    fsync_dir(place.partial)
    aside = _clear_the_way(place)
    try:
        rename_noreplace(place.partial, place.path)
    except OSError as exc:
        _put_back(place, aside)
        if isinstance(exc, FileExistsError):
            raise _left_alone(place, "appeared while the merge ran (something else created it)") from None
        raise OutputError(f"cannot move the finished output into place: {exc.strerror}", file=place.out,
                          hint=_finished_hint(place)) from None
    fsync_dir(os.path.dirname(place.path))
    try:
        os.unlink(os.path.join(place.path, MARKER))
    except OSError:
        pass
    if aside is not None:
        _remove_replaced(aside)


def _clear_the_way(place: Place) -> Optional[str]:
    """Get what was at OUT out of the way, if it is still what was checked; the folder holding the old output
    (moved aside, removed after the rename) or None."""
    try:
        info = os.lstat(place.path)
    except FileNotFoundError:
        info = None
    if place.found is None:
        if info is not None:
            raise _left_alone(place, "appeared while the merge ran (something else created it)")
        return None
    if info is None or (info.st_dev, info.st_ino) != place.found or not stat.S_ISDIR(info.st_mode):
        raise _left_alone(place, "changed while the merge ran (it is no longer the folder that was checked)")
    try:
        if place.empty:
            try:
                os.rmdir(place.path)   # only ever removes an empty folder
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                raise _appeared(place, listing(place.path)) from None
            return None
        aside = tempfile.mkdtemp(prefix=os.path.basename(place.path) + ".mergekit_lite-replaced-",
                                 dir=os.path.dirname(place.path))
        os.rename(place.path, os.path.join(aside, "old"))
    except OSError as exc:
        raise OutputError(f"cannot move the old output aside: {exc.strerror}", file=place.out,
                          hint=_finished_hint(place)) from None
    _check_moved(place, aside)
    return aside


def _check_moved(place: Place, aside: str) -> None:
    """The output moved aside is the folder that was checked, and still holds only what a merge writes; else
    it goes back to its place."""
    old = os.path.join(aside, "old")
    try:
        moved = os.lstat(old)
        found = strangers(old, output_names(old))
        changed = (moved.st_dev, moved.st_ino) != place.found or not_our_output(old) is not None
    except OSError:
        found, changed = [], True
    if found or changed:
        _put_back(place, aside)
        if found:
            raise _appeared(place, found)
        raise _left_alone(place, "changed while the merge ran (it is no longer the folder that was checked)")


def _put_back(place: Place, aside: Optional[str]) -> None:
    """Return the old output moved aside to its place (when the rename of the new one failed)."""
    if aside is None:
        return
    try:
        rename_noreplace(os.path.join(aside, "old"), place.path)
        os.rmdir(aside)
    except OSError as exc:
        raise OutputError(f"the finished output could not take its place, and what was there is now "
                          f"{os.path.join(aside, 'old')} ({exc.strerror})", file=place.out,
                          hint=_finished_hint(place)) from None


def _remove_replaced(aside: str) -> None:
    old = os.path.join(aside, "old")
    try:
        found = remove_ours(old, output_names(old))
        if not found:
            os.rmdir(aside)
            return
        log.warning("kept %s: files that no merge wrote appeared in it (%s)", old, describe(found))
    except OSError as exc:
        log.warning("could not remove the replaced output %s: %s; delete it yourself", old, exc.strerror)


def _appeared(place: Place, found: list[str]) -> OutputError:
    return _left_alone(place, f"files that no merge wrote appeared in it while the merge ran ({describe(found)})")


def _left_alone(place: Place, what: str) -> OutputError:
    return OutputError(f"{what}, so it was left as it is", file=place.out, hint=_finished_hint(place))


def _finished_hint(place: Place) -> str:
    return (f"the finished output is in {place.partial}: rename it to keep it (mv {place.partial} NEW_NAME), since "
            "a later run of this merge starts that folder over")


def _located(path: str) -> str:
    """``path`` with the links of its parent folders resolved, but not a link at its last part."""
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)
