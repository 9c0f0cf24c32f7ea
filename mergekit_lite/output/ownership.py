"""What in the output's place is ours: the only things a merge ever deletes or replaces.

- An output of ours (``--overwrite`` may replace it): a real folder (not a link) with a ``merge_run.json`` that
  mergekit_lite wrote, holding nothing but plain files with the names a merge writes, and of the shard files
  only those its index lists (``model.safetensors`` alone without an index).
- A partial folder of ours: a real folder with the marker a merge creates exclusively when it makes the folder
  (folder.py), holding nothing but plain files with the names a merge writes there (shards, companions, the
  journal).

Anything else (a file of the user's, a subfolder, a link, another tool's output) makes the folder not ours, and
the caller refuses it, naming what was found. Removal goes name by name through a descriptor of the folder
(never following a link) and ends with rmdir, which fails rather than delete what appeared meanwhile.
"""

from __future__ import annotations

import os
import re
import stat
from typing import Callable, Optional

from ..errors import MergeError
from ..sources.checkpoint import read_json_object
from .companions import TOKENIZER_FILES
from .folder import MARKER
from .journal import JOURNAL
from .run_settings import RUN_SETTINGS_FILE
from .writer import INDEX_NAME

# What `merge extract` and `merge adapters` write (an adapter folder) besides README.md and the run record.
ADAPTER_OUTPUT_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_record.json")
SHARD_NAME = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors\Z")
# The files a finished merge writes besides its shards (the marker stays only if a run stopped right after its
# final rename, before removing it).
OUTPUT_FILES = frozenset({INDEX_NAME, RUN_SETTINGS_FILE, "config.json", "README.md", "mergekit_config.yml",
                          *TOKENIZER_FILES, MARKER, *ADAPTER_OUTPUT_FILES})
PARTIAL_FILES = OUTPUT_FILES | {JOURNAL}
SHOWN = 5   # names listed in a message


def describe(names: list[str]) -> str:
    """``notes/, thesis.tex`` (and how many more)."""
    shown = ", ".join(names[:SHOWN])
    return shown + (f" and {len(names) - SHOWN} more" if len(names) > SHOWN else "")


def listing(folder: str) -> list[str]:
    """The folder's entries as a message shows them: ``notes/`` for a folder, ``x (a symbolic link)``."""
    return sorted(_shown(folder, name) for name in os.listdir(folder))


def _shown(folder: str, name: str) -> str:
    mode = os.lstat(os.path.join(folder, name)).st_mode
    if stat.S_ISLNK(mode):
        return f"{name} (a symbolic link)"
    return f"{name}/" if stat.S_ISDIR(mode) else name


def strangers(folder: str, ours: Callable[[str], bool]) -> list[str]:
    """What in ``folder`` a merge did not write: entries that are not plain files or have a name not ``ours``."""
    found = []
    for name in os.listdir(folder):
        if not ours(name) or not stat.S_ISREG(os.lstat(os.path.join(folder, name)).st_mode):
            found.append(_shown(folder, name))
    return sorted(found)


def partial_names(name: str) -> bool:
    return name in PARTIAL_FILES or SHARD_NAME.match(name) is not None


def output_names(out: str) -> Callable[[str], bool]:
    """The names of an output of ours: its companions and the shards its index lists (or model.safetensors)."""
    shards = {"model.safetensors"}
    index = os.path.join(out, INDEX_NAME)
    if os.path.lexists(index):
        try:
            weight_map = read_json_object(index, INDEX_NAME, out, "").get("weight_map")
        except MergeError:
            weight_map = None
        shards = {s for s in weight_map.values() if isinstance(s, str)} if isinstance(weight_map, dict) else set()
    return lambda name: name in OUTPUT_FILES or (SHARD_NAME.match(name) is not None and name in shards)


def not_our_output(out: str) -> Optional[str]:
    """Why the folder ``out`` is not an output this tool wrote (a clause for a message); None when it is one."""
    record = os.path.join(out, RUN_SETTINGS_FILE)
    if not os.path.lexists(record):
        return f"this folder was not written by a merge (it has no {RUN_SETTINGS_FILE}; found {describe(listing(out))})"
    try:
        if not stat.S_ISREG(os.lstat(record).st_mode):
            raise OSError(f"{RUN_SETTINGS_FILE} is not a file")
        tool = read_json_object(record, RUN_SETTINGS_FILE, out, "").get("tool")
    except (OSError, MergeError):
        return f"this folder was not written by mergekit_lite (its {RUN_SETTINGS_FILE} cannot be read)"
    if tool != "mergekit_lite":
        return f"this folder was not written by mergekit_lite (its {RUN_SETTINGS_FILE} names another tool)"
    found = strangers(out, output_names(out))
    return f"the folder holds files that no merge wrote ({describe(found)})" if found else None


def remove_ours(folder: str, ours: Callable[[str], bool]) -> list[str]:
    """Delete the folder if everything in it is ours: [] when done. Otherwise delete nothing (or, if something
    appeared meanwhile, nothing more) and return what is not ours."""
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0))
    try:
        names = os.listdir(fd)
        found = sorted(n for n in names if not ours(n) or not stat.S_ISREG(os.stat(n, dir_fd=fd,
                                                                                      follow_symlinks=False).st_mode))
        if found:
            return [_shown(folder, name) for name in found]
        for name in names:
            os.unlink(name, dir_fd=fd)
    finally:
        os.close(fd)
    try:
        os.rmdir(folder)
    except OSError:
        left = listing(folder)
        if not left:
            raise
        return left
    return []
