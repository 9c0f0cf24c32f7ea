"""Reading an output's tensors back: whole, or in bounded chunks for reductions on the device.

A chunk is at most ``chunk_bytes`` of one tensor, read with positional reads into a fresh buffer, so
host and device memory stay at one chunk (plus its mask) whatever the size of the tensor: the largest
tensor of a 70B model (a 2 GB embedding) is scanned in 64 MiB pieces.
"""

from __future__ import annotations

import os
from typing import Callable, Iterator, Optional

import torch

from ..dtypes import itemsize
from ..errors import ModelError
from ..safetensors_format import TensorInfo, read_into

CHUNK_BYTES = 64 << 20
STAGING = 32 << 20   # bytes of stored rows read at a time into a weight of another dtype (fill_weight)


class TensorReader:
    """Reads tensors given their TensorInfo; keeps one descriptor per file until closed."""

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}
        self._buffer: Optional[torch.Tensor] = None   # chunks(reuse=True) read into this

    def read(self, info: TensorInfo) -> torch.Tensor:
        """The whole tensor, as stored (dtype and shape), on the CPU."""
        return self.read_rows(info, None)

    def read_rows(self, info: TensorInfo, rows: Optional[tuple[int, int]]) -> torch.Tensor:
        """Rows ``[start, end)`` of the tensor (the whole tensor for None), as stored, on the CPU."""
        shape, start, count = info.span(rows)
        return self._read(info, start - info.start, count).view(info.dtype).reshape(shape)

    def chunks(self, info: TensorInfo, chunk_bytes: int = CHUNK_BYTES, reuse: bool = False
               ) -> Iterator[tuple[int, torch.Tensor]]:
        """(first element index, flat CPU tensor of at most ``chunk_bytes``) over the tensor, in order. ``reuse``:
        every chunk is read into one buffer kept by the reader (the caller drops each chunk before the next), which
        spares the allocator a fresh 64 MiB of pages per chunk."""
        size = itemsize(info.dtype)
        step = max(size, chunk_bytes - chunk_bytes % size)
        for offset in range(0, info.nbytes, step):
            count = min(step, info.nbytes - offset)
            out = None
            if reuse:
                if self._buffer is None or self._buffer.numel() < count:
                    self._buffer = torch.empty(step, dtype=torch.uint8)
                out = self._buffer[:count]
            yield offset // size, self._read(info, offset, count, out).view(info.dtype)

    def _read(self, info: TensorInfo, offset: int, count: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        buffer = torch.empty(count, dtype=torch.uint8) if out is None else out
        if count:
            try:
                if info.path not in self._fds:
                    self._fds[info.path] = os.open(info.path, os.O_RDONLY)
                read_into(self._fds[info.path], info.start + offset, memoryview(buffer.numpy()))
            except (OSError, EOFError) as exc:
                raise ModelError(f"cannot read tensor '{info.name}': {exc}", file=info.path,
                                 hint="the file changed or was truncated while it was validated") from None
        return buffer

    def close(self) -> None:
        self._buffer = None
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> "TensorReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()




class Staging:
    """A uint8 buffer for a block of stored bytes before they are upcast (``fill_weight``), grown to the largest
    block asked for; one per thread that reads."""

    def __init__(self) -> None:
        self._buffer = torch.empty(0, dtype=torch.uint8)

    def __call__(self, nbytes: int) -> torch.Tensor:
        if self._buffer.numel() < nbytes:
            self._buffer = torch.empty(nbytes, dtype=torch.uint8)
        return self._buffer

    def clear(self) -> None:
        self._buffer = torch.empty(0, dtype=torch.uint8)


def fill_weight(checkpoint, name: str, weight: torch.Tensor, staging: Callable[[int], torch.Tensor],
                count: Callable[[str, torch.Tensor, int], None]) -> None:
    """Read tensor ``name`` of ``checkpoint`` (sources.Checkpoint) into ``weight``, a tensor of its shape in any
    dtype, on any device, with any strides: straight into its memory when it keeps the stored dtype on the CPU and
    is contiguous, else a block of rows at a time through ``staging(nbytes)`` (a uint8 CPU buffer), so an upcast
    weight never has its stored copy whole beside it (an embedding at 1B: 125 MB less at the forward pass's peak).
    ``count(name, stored block, its first flat index)`` sees each block as read (NaN and Inf counts)."""
    info = checkpoint.tensors[name]
    if weight.dtype == info.dtype and weight.device.type == "cpu" and weight.is_contiguous():
        count(name, checkpoint.read(name, out=_bytes_of(weight)), 0)
        return
    rows = weight if weight.dim() else weight.view(1)          # a scalar as one row
    per_row = rows.numel() // max(1, rows.shape[0])
    for start, end in _row_blocks(info):
        stored = checkpoint.read(name, (start, end) if weight.dim() else None,
                                 out=staging((end - start) * per_row * info.dtype.itemsize))
        rows[start:end].copy_(stored)
        count(name, stored, start * per_row)


def _row_blocks(info: TensorInfo) -> list[tuple[int, int]]:
    """[start, end) row ranges of a stored tensor of at most STAGING bytes each (one row at least)."""
    rows = info.shape[0] if info.shape else 1
    step = max(1, STAGING // max(1, info.nbytes // max(1, rows)))
    return [(start, min(rows, start + step)) for start in range(0, rows, step)]


def _bytes_of(weight: torch.Tensor) -> torch.Tensor:
    """The bytes of a contiguous CPU tensor, as a uint8 tensor sharing its memory."""
    return weight.view(-1).view(torch.uint8) if weight.numel() else torch.empty(0, dtype=torch.uint8)
