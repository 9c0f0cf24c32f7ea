"""Writing output shards whose layout is planned before any tensor is computed.

Shapes and dtypes are known from the plan, so each shard's header is written first and every tensor is
then written straight into its place with a positional write. Nothing accumulates in memory: the peak does
not grow with the shard size (mergekit holds a whole shard, 5 GB by default, in RAM before writing it).
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..errors import OutputError
from ..plan.planner import MergePlan
from ..plan.shards import Entry, ShardPlan, file_order
from ..safetensors_format import build_header, tensor_bytes, write_from
from .crc import crc32, crc32_combine
from .direct_io import DirectStream
from .folder import LEFTOVER

INDEX_NAME = "model.safetensors.index.json"
_FULL_HINT = f"free some disk space and run again ({LEFTOVER})"


@dataclass(frozen=True)
class ShardRecord:
    """A finished shard as written: its size and CRC-32 (of the whole file), for resuming; ``inputs``: the CRC-32
    of the input bytes it was computed from (journal.InputChecksums), set by the loop."""

    file: str
    size: int
    crc32: int
    inputs: Optional[int] = None


def file_crc32(path: str, chunk: int = 64 << 20) -> int:
    """CRC-32 of a whole file (zlib's, as zip and cksum-like tools compute it)."""
    crc = 0
    with open(path, "rb", buffering=0) as f:
        buffer = bytearray(chunk)
        view = memoryview(buffer)
        while True:
            got = f.readinto(buffer)
            if not got:
                return crc
            crc = crc32(view[:got], crc)


class ShardWriter:
    """One output safetensors file: tensors written into their planned places, the header last.

    Until ``close`` writes the header, the file starts with zero bytes (a header length of 0), which every
    safetensors reader rejects: a shard cut short by a full disk, a crash or Ctrl-C can never be loaded as if
    it were complete, with zeros where tensors are missing. The stream below carries those zeros in the
    header's place, while its CRC-32 is taken over the real header, so the CRC is the finished file's.

    Tensors arriving in file order (the engine's order) form one sequential stream: it goes to the disk
    with O_DIRECT where the filesystem allows (direct_io.py), and its CRC-32 is computed on the way. Any
    other order still works: from the first out-of-order write on, bytes go through the page cache to their
    offsets, and the CRC is computed by reading the file back on close.
    """

    def __init__(self, path: str, entries: Sequence[Entry], metadata: dict[str, str] | None = None,
                 direct: bool = True):
        header, offsets = build_header([(e.name, e.dtype, e.shape) for e in file_order(entries)], metadata)
        self.path = path
        self._entries = {e.name: e for e in entries}
        self._offsets = offsets
        self._missing = {e.name: e.nbytes for e in entries}   # bytes not yet written, per tensor
        self.size = len(header) + sum(e.nbytes for e in entries)
        self._crc: Optional[int] = 0
        self._finished = False
        self._streamed = 0                     # the sequential stream covers bytes [0, _streamed)
        self._direct: Optional[DirectStream] = None
        try:
            # never through a symbolic link planted in the partial folder
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o644)
            os.ftruncate(self._fd, self.size)
            if direct:
                self._direct = DirectStream.open(path)
            self._header = header
            self._append(memoryview(bytes(len(header))), crc_of=memoryview(header))
        except OSError as exc:
            self.abort()
            raise OutputError(f"cannot write: {exc.strerror}", file=path,
                              hint=_FULL_HINT if exc.errno == errno.ENOSPC else
                              "check the permissions of the output folder") from None

    def write(self, name: str, tensor: torch.Tensor, rows: Optional[tuple[int, int]] = None) -> Optional[int]:
        """Write a whole tensor, or the block of its rows [start, end), into its planned place. Returns the
        CRC-32 of the bytes written when it was computed (in the sequential stream, where the shard's CRC is
        combined from it), else None."""
        entry = self._entries[name]
        shape, offset = entry.shape, self._offsets[name]
        if rows is not None:
            shape = (rows[1] - rows[0], *entry.shape[1:])
            offset += rows[0] * (entry.nbytes // entry.shape[0])
        if tensor.dtype != entry.dtype or tuple(tensor.shape) != shape:
            raise AssertionError(f"{name}: planned {entry.dtype} {shape}, got {tensor.dtype} {tuple(tensor.shape)}")
        data = tensor_bytes(tensor)
        crc = None
        try:
            if self._crc is not None and offset == self._streamed:
                crc = self._append(data)
            else:
                self._leave_stream()
                write_from(self._fd, offset, data)
        except OSError as exc:
            raise self._write_error(exc, name) from None
        self._missing[name] -= len(data)
        return crc

    def _write_error(self, exc: OSError, name: Optional[str] = None) -> OutputError:
        """The tensor whose bytes did not reach the disk: ``name``, or where the staged O_DIRECT stream failed
        (its bytes may belong to tensors handed over earlier)."""
        if self._direct is not None:
            failed_at = max(self._direct.on_disk, len(self._header))
            name = next(n for n, start in sorted(self._offsets.items(), key=lambda item: -item[1])
                        if start <= failed_at)
        return OutputError(f"cannot write tensor '{name}': {exc.strerror}", file=self.path, hint=_FULL_HINT)

    def _append(self, data: memoryview, crc_of: Optional[memoryview] = None) -> int:
        """Stream ``data``; returns the CRC-32 of ``crc_of`` (default: of ``data``), also added to the shard's."""
        checked = data if crc_of is None else crc_of
        crc = crc32(checked)
        self._crc = crc32_combine(self._crc, crc, len(checked))
        if self._direct is not None:
            self._direct.append(data)
        else:
            write_from(self._fd, self._streamed, data)
        self._streamed += len(data)
        return crc

    def _leave_stream(self) -> None:
        """Out-of-order writes follow: flush the stream and write through the page cache from now on."""
        self._crc = None
        if self._direct is None:
            return
        try:
            self._direct.finish()    # zero padding past the stream lands where nothing was written yet
        except OSError as exc:
            raise self._write_error(exc) from None
        finally:
            direct, self._direct = self._direct, None
            direct.close()

    @property
    def complete(self) -> bool:
        return not any(self._missing.values())

    def close(self) -> ShardRecord:
        """Flush to disk. A shard is complete only when every planned byte was written."""
        if not self.complete:
            raise AssertionError(f"{self.path}: tensors not fully written: "
                                 f"{sorted(n for n, left in self._missing.items() if left)[:3]}")
        try:
            if self._direct is not None:
                try:
                    self._direct.finish()
                except OSError as exc:
                    raise self._write_error(exc) from None
                os.ftruncate(self._fd, self.size)    # drop the last block's padding
            write_from(self._fd, 0, memoryview(self._header))   # last: the shard is now loadable
            os.fsync(self._fd)
            self._finished = True
        except OSError as exc:
            raise OutputError(f"cannot write the header: {exc.strerror}", file=self.path, hint=_FULL_HINT) from None
        finally:
            self.abort()
        crc = self._crc if self._crc is not None and self._streamed == self.size else file_crc32(self.path)
        return ShardRecord(os.path.basename(self.path), self.size, crc)

    def abort(self) -> None:
        """Close the file. An unfinished shard is cut to zero bytes: it frees the space at once (a full disk),
        no reader can take it for a finished one, and no sparse holes are left to fault on when mapped (on a
        full tmpfs, reading a hole through mmap is a SIGBUS). A resumed run recomputes it."""
        direct, self._direct = self._direct, None
        if direct is not None:
            direct.close()
        fd, self._fd = getattr(self, "_fd", None), None
        if fd is not None:
            try:
                if not self._finished:
                    os.ftruncate(fd, 0)
            except OSError:
                pass
            finally:
                os.close(fd)


@dataclass(frozen=True)
class WrittenShards:
    """What the loop wrote: file names, which tensor is where, and the tensor bytes."""

    files: list[str]
    weight_map: dict[str, str]
    total_size: int
    seconds: float


def written_shards(plan: MergePlan, layout: Sequence[ShardPlan], seconds: float = 0.0) -> WrittenShards:
    return WrittenShards([s.file for s in layout], {e.name: s.file for s in layout for e in s.entries},
                         sum(j.nbytes for j in plan.jobs), seconds)
