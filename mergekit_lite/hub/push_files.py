"""Which files of a folder a push sends, and reading them so that what is sent is exactly what was checked.

Only regular files of the kinds a model repo holds are sent, named exactly as transformers and this tool write
them (config.json, the tokenizer's files, README.md, the recipe) or matching a strict pattern (the safetensors
shards and their index). A name that merely starts like one (``tokenizer.secrets.env``) is not one of them.
The folder's top level is all that is looked at, with lstat: nothing is ever read through a link. A link or a
special file (a FIFO, a device) among the files to send stops the push, naming it, since a link could carry
any file the user can read (a private key, /etc/passwd); elsewhere in the folder it is listed and left alone,
like every other file that is not sent. A hard link is a regular file: its bytes are what is checked and sent,
wherever its other names are.

Every file to send is read before anything is sent: a *.safetensors file must start with a safetensors header,
any other file must be at most MAX_CHECKED bytes, and all of it (of weights, the header) is scanned for secrets
(secret_scan.py). At upload time each file is opened again without following links and must be the very file
the plan checked (same device, inode, size and modification time): small files are sent as the bytes read and
scanned then; weights are sent by path, and checked again to be the same file once uploaded, before the commit
that would publish them.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
import struct
from dataclasses import dataclass
from typing import Optional, Union

from ..errors import HubError, MergeError
from ..units import format_size
from .secret_scan import find_secret

CARD, RECIPE = "README.md", "mergekit_config.yml"
# The run's settings that the spec does not hold (--dtype, --seed, ...), written by `merge run`
# (run_settings.RUN_SETTINGS_FILE, not imported: it loads torch). Part of the recipe, so it is sent too.
RUN_SETTINGS = "merge_run.json"
# The files of a model repo other than weights, by the names transformers and peft save them under (the
# tokenizer's are output/companions.TOKENIZER_FILES, which a merge copies), plus the card and the recipe.
MODEL_FILES = frozenset({
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt", "merges.txt",
    "chat_template.jinja", "chat_template.json", "preprocessor_config.json", "processor_config.json",
    "adapter_config.json", CARD, RECIPE, RUN_SETTINGS})
WEIGHTS = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*\.safetensors")     # model-00001-of-00002.safetensors
INDEX = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*\.safetensors\.index\.json")
# Pickle checkpoints (loading one can run code) are never sent; checkpoint.PICKLE_SUFFIXES says the same for
# reading (not imported: checkpoint.py loads torch).
PICKLES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# A config or tokenizer file is at most a few tens of MB (Gemma's tokenizer.json, 33 MB, is the largest in common
# use); a merge copies one of up to 256 MiB (sources/user_files.COPY_LIMIT), and a push sends what a merge wrote.
MAX_CHECKED = 256 << 20
MAX_HEADER = 100_000_000         # bytes: the safetensors library's own limit on a header
NOFOLLOW = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)  # a FIFO swapped in must not block the open

LINK_HINT = "replace the link with a copy of the file, or remove it, then re-run"
SECRET_HINT = "remove it from the file (and revoke it if it was ever shared), then re-run"
CHANGED_HINT = "let whatever is writing into the folder finish, then run the same push again"
WEIGHTS_HINT = ("a push sends the safetensors files of `merge run`; remove any other file named *.safetensors, "
                "then re-run")
SPECIAL = ((stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device"),
           (stat.S_ISBLK, "a device"))


@dataclass(frozen=True)
class FileEntry:
    path: str           # the name in the folder; a subfolder's ends with '/'
    size: int
    reason: str = ""    # why it is not sent; "" for a file that is sent
    identity: tuple[int, ...] = ()   # (device, inode, size, mtime_ns) as lstat saw a file to send


def select_files(folder: str) -> tuple[list[FileEntry], list[FileEntry], list[MergeError]]:
    """The folder's top level, looked at with lstat: (files to send, entries left with the reason, refusals)."""
    sent, left, refused = [], [], []
    for name, info in _listing(folder):
        kind = stat.S_IFMT(info.st_mode)
        shown = name + "/" if kind == stat.S_IFDIR else name
        reason = _exclusion(name, kind)
        if reason:
            left.append(FileEntry(shown, info.st_size, reason))
        elif kind == stat.S_IFLNK:
            target = _readlink(os.path.join(folder, name))
            refused.append(HubError(f"is a link to {target!r}; a push never sends a link", where=name,
                                    hint=LINK_HINT))
        elif kind != stat.S_IFREG:
            what = next((what for test, what in SPECIAL if test(info.st_mode)), "a special file")
            refused.append(HubError(f"is {what}, not a regular file; a push sends regular files only", where=name,
                                    hint="remove it, then re-run"))
        else:
            sent.append(FileEntry(name, info.st_size, identity=_identity(info)))
    return sent, left, refused


def _listing(folder: str) -> list[tuple[str, os.stat_result]]:
    """(name, lstat) of each entry at the folder's top level, by name; an entry removed meanwhile is left out."""
    listed = []
    with os.scandir(folder) as entries:
        for entry in entries:
            try:
                listed.append((entry.name, entry.stat(follow_symlinks=False)))
            except FileNotFoundError:
                continue
    return sorted(listed, key=lambda item: item[0])


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:  # replaced meanwhile: what matters is that it was a link
        return "?"


def _exclusion(name: str, kind: int) -> str:
    """Why an entry is not sent; "" for a file of a model repo's kinds (which must then be a regular file)."""
    if name.startswith("."):
        return "hidden"
    if name.endswith(".partial"):
        return "left by an interrupted merge"
    if kind == stat.S_IFDIR:
        return "a subfolder: a merge writes none"
    if name.lower().endswith(PICKLES):
        return "pickle (loading one can run code)"
    if not is_model_file(name):
        return "a link, never followed" if kind == stat.S_IFLNK else (
            "not a regular file" if kind != stat.S_IFREG else "not a model file")
    return ""


def is_model_file(name: str) -> bool:
    return name in MODEL_FILES or bool(WEIGHTS.fullmatch(name) or INDEX.fullmatch(name))


def check_files(folder: str, files: list[FileEntry]) -> tuple[dict[str, bytes], list[MergeError]]:
    """Read and check every file to send: ({name: bytes} of the files other than weights, problems)."""
    contents: dict[str, bytes] = {}
    problems: list[MergeError] = []
    for entry in files:
        try:
            data = checked_bytes(folder, entry)
        except MergeError as exc:
            problems.append(exc)
            continue
        if not entry.path.endswith(".safetensors"):
            contents[entry.path] = data
    return contents, problems


def upload_sources(folder: str, files: list[FileEntry],
                   replaced: Optional[dict[str, bytes]] = None) -> list[tuple[str, Union[bytes, str]]]:
    """What to hand to the upload, checked again now: (name, the bytes that were scanned) for every file but
    the weights, (name, its path) for weights (too large to hold; see check_unchanged). ``replaced``: files
    sent as the plan changed and checked them in memory (README.md with --license), still the same file."""
    sources: list[tuple[str, Union[bytes, str]]] = []
    for entry in files:
        data = checked_bytes(folder, entry)
        data = (replaced or {}).get(entry.path, data)
        weights = entry.path.endswith(".safetensors")
        if entry.path == RUN_SETTINGS:
            data = public_record(data)
        sources.append((entry.path, os.path.join(folder, entry.path) if weights else data))
    return sources


def public_record(data: bytes) -> bytes:
    """The run record as published: without ``working_dir``, the absolute local folder the merge ran in
    (it names the user's home and folders, and means nothing on another machine)."""
    try:
        record = json.loads(data)
    except ValueError:
        return data
    if not isinstance(record, dict) or "working_dir" not in record:
        return data
    del record["working_dir"]
    return (json.dumps(record, indent=2) + "\n").encode()


def check_unchanged(folder: str, files: list[FileEntry]) -> None:
    """After the weights were uploaded by path, before the commit: each is still the very file checked (the
    other files went as the bytes checked)."""
    for entry in (f for f in files if f.path.endswith(".safetensors")):
        try:
            same = _identity(os.lstat(os.path.join(folder, entry.path))) == entry.identity
        except OSError:
            same = False
        if not same:
            raise changed(entry)


def checked_bytes(folder: str, entry: FileEntry) -> bytes:
    """The bytes of a file to send (of weights: the header), read from the very file the plan looked at and
    checked: its kind, its size, no secret in it."""
    try:
        fd = os.open(os.path.join(folder, entry.path), os.O_RDONLY | NOFOLLOW)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOENT, errno.ENXIO):  # now a link, gone, or a FIFO/socket
            raise changed(entry) from None
        raise HubError(f"cannot read: {exc.strerror}", where=entry.path, hint="check the file's permissions") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or _identity(info) != entry.identity:
            raise changed(entry)
        weights = entry.path.endswith(".safetensors")
        data = _header(f, entry) if weights else _whole(f, entry)
    found = find_secret(data)
    if found is not None:
        line, kind = found
        at = "its header" if weights else f"line {line}"
        raise HubError(f"{at} holds what looks like {kind}; a push never sends a secret", where=entry.path,
                       hint=SECRET_HINT)
    return data


def _whole(f, entry: FileEntry) -> bytes:
    if entry.size > MAX_CHECKED:
        raise HubError(f"is {format_size(entry.size)}, too large for a config or tokenizer file (at most "
                       f"{format_size(MAX_CHECKED)})", where=entry.path,
                       hint="remove it if it is not the model's, then re-run")
    data = f.read(entry.size + 1)
    if len(data) != entry.size:
        raise changed(entry)
    return data


def _header(f, entry: FileEntry) -> bytes:
    """The JSON header of a safetensors file (8-byte little-endian length N, then N bytes of JSON)."""
    prefix = f.read(8)
    if len(prefix) < 8:
        raise _not_safetensors(entry, f"it is {entry.size} bytes, too short")
    (length,) = struct.unpack("<Q", prefix)
    if length > MAX_HEADER or 8 + length > entry.size:
        raise _not_safetensors(entry, f"the header length {length} does not fit in a file of {entry.size} bytes")
    header = f.read(length)
    if len(header) != length:
        raise changed(entry)
    if not (header.lstrip().startswith(b"{") and header.rstrip().endswith(b"}")):
        raise _not_safetensors(entry, "its header is not a JSON object")
    return header


def _not_safetensors(entry: FileEntry, why: str) -> HubError:
    return HubError(f"is not a safetensors file: {why}", where=entry.path, hint=WEIGHTS_HINT)


def changed(entry: FileEntry) -> HubError:
    return HubError("changed after it was checked (it is no longer the same file); nothing was committed",
                    where=entry.path, hint=CHANGED_HINT)


def _identity(info: os.stat_result) -> tuple[int, ...]:
    return info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns


def shown(name: str) -> str:
    """A file name as printed: control characters escaped, so a name cannot write lines or terminal codes."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in name)
