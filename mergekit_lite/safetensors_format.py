"""The safetensors file format: parse and check a header, build one, read and write tensor bytes.

We read headers ourselves instead of through ``safe_open`` for two reasons. Planning a merge needs only
names, dtypes, shapes and offsets, and must check them strictly (a hostile or truncated file must give a
clear error, never a crash or a silent misread). And reading a tensor with ``preadv`` into a buffer we own
keeps resident memory bounded by the tensors in flight; an mmap kept open for the whole merge would make
every input page resident (the naive loop in shared/research/bench.md peaked at 7-8 GiB that way).

Layout: 8-byte little-endian header length N, N bytes of JSON, then the data block. JSON maps each tensor
name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` relative to the data block, plus an optional
``__metadata__`` map of strings. Offsets must tile the data block exactly, without gaps or overlaps.

It also holds the one way this package opens a file of a user's folder (``open_regular``, ``read_regular``):
never through a FIFO that would block forever or a device that never ends, and never more bytes than a limit.
"""

from __future__ import annotations

import errno
import json
import math
import os
import stat
import struct
import sys
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch

from .dtypes import SAFETENSORS_TO_TORCH, TORCH_TO_SAFETENSORS, itemsize
from .errors import ModelError

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: enough to plan with, and to read its bytes later."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    path: str          # absolute file path
    start: int         # absolute byte offset in the file
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def span(self, rows: Optional[tuple[int, int]] = None) -> tuple[tuple[int, ...], int, int]:
        """(shape, file offset, bytes) of the tensor, or of the block of its rows [start, end): rows are contiguous
        in safetensors' row-major layout."""
        if rows is None:
            return tuple(self.shape), self.start, self.nbytes
        row_bytes = self.nbytes // self.shape[0] if self.shape[0] else 0
        count = rows[1] - rows[0]
        return (count, *self.shape[1:]), self.start + rows[0] * row_bytes, count * row_bytes


def read_header(path: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and check a safetensors header. Returns ({name: TensorInfo}, metadata).

    Every way a file can be broken or hostile ends in a ModelError naming the file (and the tensor): a
    short or empty file, a header length beyond the file, JSON that is invalid, nested too deeply or has
    duplicate names, an unknown dtype, a shape that does not match its byte range, byte ranges that
    overlap, leave gaps or run past the end of the file. Nothing else is raised for any input bytes.
    """
    raw, header_len, size = _raw_header(path)
    header = _parse_json(raw, path)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise ModelError("__metadata__ is not a JSON object", file=path, hint="the file is not safetensors")
    data_start = 8 + header_len
    tensors = {name: _tensor_info(path, name, entry, data_start, size) for name, entry in header.items()}
    _check_tiling(path, tensors.values(), data_start, size)
    return tensors, metadata


class NotRegularFile(OSError):
    """``open_regular`` found a FIFO, device, socket or folder where a file should be."""


class FileTooLarge(OSError):
    """``read_regular`` found more bytes than its limit."""


MAX_INT_DIGITS = getattr(sys.int_info, "default_max_str_digits", 4300)   # Python's own: beyond it int() is quadratic
_KINDS = ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"))


def open_regular(path: str, *, follow_links: bool = True) -> int:
    """A read-only descriptor of the regular file at ``path``, or NotRegularFile (an OSError).

    Opened non-blocking, because opening a FIFO for reading otherwise waits for a writer that may never come;
    then the descriptor itself is checked (fstat, so a file swapped after a check cannot slip through).
    ``follow_links=False`` refuses a symbolic link (for files this package wrote itself and reads back)."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    if not follow_links:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags)
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        os.close(fd)
        raise
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = next((f"is {name}, not a regular file" for test, name in _KINDS if test(mode)), "is not a regular file")
        raise NotRegularFile(errno.EINVAL, kind, path)
    return fd


def read_regular(path: str, limit: int, *, follow_links: bool = True) -> bytes:
    """The bytes of the regular file at ``path``, at most ``limit`` of them, else FileTooLarge (an OSError)."""
    fd = open_regular(path, follow_links=follow_links)
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(fd).st_size
        data = f.read(limit + 1) if size <= limit else b""   # read past the limit: the file may be growing
    if size > limit or len(data) > limit:
        raise FileTooLarge(errno.EFBIG, f"is {max(size, len(data)):,} bytes, more than the {limit:,} allowed", path)
    return data


def bounded_int(text: str) -> int:
    """``json``'s parse_int: an integer of at most MAX_INT_DIGITS digits, else ValueError (not Python's message,
    which suggests raising an interpreter limit)."""
    digits = len(text) - (text[0] == "-")
    if digits > MAX_INT_DIGITS:
        raise ValueError(f"holds an integer of {digits:,} digits, more than the {MAX_INT_DIGITS:,} read")
    return int(text)


def _raw_header(path: str) -> tuple[bytes, int, int]:
    """(header JSON bytes, their length, file size), after the checks that need no parsing."""
    try:
        fd = open_regular(path)
    except NotRegularFile:  # a FIFO or device would block or never end
        raise ModelError("is not a regular file", file=path, hint="give the model's safetensors files themselves"
                         ) from None
    except OSError as exc:
        raise ModelError(f"cannot read: {exc.strerror}", file=path) from None
    try:
        with os.fdopen(fd, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise ModelError(f"file is {size} bytes, too short to be safetensors", file=path,
                                 hint="the file is truncated or empty; download or copy it again")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                raise ModelError(f"header length {header_len} does not fit in a file of {size} bytes",
                                 file=path, hint="the file is truncated or not safetensors; download it again")
            return f.read(header_len), header_len, size
    except OSError as exc:
        raise ModelError(f"cannot read: {exc.strerror}", file=path) from None


def refuse_duplicates(error: Callable[[str], ModelError]) -> Callable[[list], dict]:
    """A ``json`` object_pairs_hook: a key written twice (which json.loads would silently resolve to the last
    value) raises ``error(key)``. A set keeps it linear on a header with millions of keys."""
    def hook(pairs: list) -> dict:
        seen: set = set()
        for key, _ in pairs:
            if key in seen:
                raise error(key)
            seen.add(key)
        return dict(pairs)
    return hook


def _parse_json(raw: bytes, path: str) -> dict:
    unique = refuse_duplicates(lambda name: ModelError(f"header lists tensor '{name}' twice", file=path,
                                                       hint="the file is corrupt or was crafted; download it again"))
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=unique, parse_int=bounded_int)
    except ValueError as exc:   # not UTF-8, not JSON, or an integer of thousands of digits
        raise ModelError(f"header is not valid JSON ({exc})", file=path,
                         hint="the file is corrupt or not safetensors; download it again") from None
    except RecursionError:
        raise ModelError("header JSON is nested too deeply", file=path,
                         hint="the file is corrupt or was crafted; download it again") from None
    if not isinstance(header, dict):
        raise ModelError("header is not a JSON object", file=path, hint="the file is not safetensors")
    return header


def _tensor_info(path: str, name: str, entry: object, data_start: int, size: int) -> TensorInfo:
    where = f"tensor '{name}'"
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise ModelError("header entry must have exactly dtype, shape and data_offsets", where=where, file=path)
    code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(code, str) or code not in SAFETENSORS_TO_TORCH:
        raise ModelError(f"dtype {code!r} is not supported", where=where, file=path,
                         hint="supported: " + ", ".join(SAFETENSORS_TO_TORCH))
    if not (isinstance(shape, list) and all(type(d) is int and 0 <= d < 2**53 for d in shape)):
        raise ModelError(f"shape {_short(shape)} is not a list of non-negative integers", where=where, file=path)
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int and o >= 0 for o in offsets)
            and offsets[0] <= offsets[1]):
        raise ModelError(f"data_offsets {_short(offsets)} are not [begin, end]", where=where, file=path)
    if data_start + offsets[1] > size:
        raise ModelError(f"data_offsets {offsets} end {data_start + offsets[1] - size} bytes beyond the end of the "
                         f"file ({size} bytes)", where=where, file=path,
                         hint="the file is truncated; download it again")
    dtype = SAFETENSORS_TO_TORCH[code]
    nbytes = _bounded_bytes(shape, itemsize(dtype), size)
    if nbytes != offsets[1] - offsets[0]:
        needs = f"{nbytes} bytes" if nbytes <= size else "more bytes than the file has"
        raise ModelError(f"shape {_short(shape)} of {code} needs {needs} but data_offsets span "
                         f"{offsets[1] - offsets[0]}", where=where, file=path,
                         hint="the file is corrupt; download it again")
    return TensorInfo(name, dtype, tuple(shape), os.path.abspath(path), data_start + offsets[0], nbytes)


def _bounded_bytes(shape: list[int], item: int, limit: int) -> int:
    """prod(shape) * item, stopping as soon as it exceeds ``limit`` (a crafted shape of a million huge
    dimensions would otherwise cost a multiplication of million-digit numbers)."""
    if 0 in shape:
        return 0
    total = item
    for dim in shape:
        total *= dim
        if total > limit:
            return limit + 1
    return total


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _check_tiling(path: str, tensors: Iterable[TensorInfo], data_start: int, size: int) -> None:
    """Offsets must cover the data block exactly once, as the safetensors library requires."""
    end = data_start
    previous = None
    for info in sorted(tensors, key=lambda t: (t.start, t.nbytes)):
        if info.start != end:
            what = (f"data overlaps tensor '{previous}'" if info.start < end
                    else f"data leaves a gap of {info.start - end} bytes before it")
            raise ModelError(what, where=f"tensor '{info.name}'", file=path,
                             hint="the file is corrupt or was crafted; download it again")
        end = info.start + info.nbytes
        previous = info.name
    if end != size:
        raise ModelError(f"{size - end} bytes of trailing data after the last tensor (the tensors end at byte {end})",
                         file=path, hint="the file is corrupt or was crafted; download it again")


def read_into(fd: int, offset: int, buffer: memoryview) -> None:
    """Fill ``buffer`` from ``fd`` at ``offset``; positional, so threads can share one descriptor."""
    done = 0
    while done < len(buffer):
        got = os.preadv(fd, [buffer[done:]], offset + done)
        if got == 0:
            raise EOFError(f"unexpected end of file at byte {offset + done}")
        done += got


def write_from(fd: int, offset: int, data: memoryview) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A byte view of a contiguous CPU tensor (any dtype, bfloat16 included) without copying."""
    flat = tensor.contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B") if flat.numel() else memoryview(b"")


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors hold the same bytes (any dtypes, compared in their memory order). The bytes are
    compared as the widest integer words their count and both starts allow: torch.equal compares 128 MB of
    int64 words in 16 ms on this CPU, of uint8 bytes in 89 ms, and the validation compares gigabytes."""
    x = a.contiguous().reshape(-1).view(torch.uint8)
    y = b.contiguous().reshape(-1).view(torch.uint8)
    if x.numel() != y.numel():
        return False
    for word in (torch.int64, torch.int32, torch.int16):
        size = word.itemsize
        if x.numel() % size == 0 and x.storage_offset() % size == 0 and y.storage_offset() % size == 0:
            return torch.equal(x.view(word), y.view(word))
    return torch.equal(x, y)


def build_header(entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None) -> tuple[bytes, dict[str, int]]:
    """Serialize a header for tensors stored in the given order.

    Returns (bytes to write at offset 0, {name: absolute data offset}). The JSON is padded with spaces to a
    multiple of 8 bytes, as the safetensors library does, so tensor data stays aligned.
    """
    header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    relative: dict[str, int] = {}
    for name, dtype, shape in entries:
        nbytes = math.prod(shape) * itemsize(dtype)
        header[name] = {"dtype": TORCH_TO_SAFETENSORS[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        relative[name] = offset
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    start = 8 + len(raw)
    return struct.pack("<Q", len(raw)) + raw, {name: start + rel for name, rel in relative.items()}
