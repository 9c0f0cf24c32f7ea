"""``adapter_model.safetensors`` written one tensor at a time when the shapes are known only as they come.

An extraction learns each module's rank from its SVD, so the header cannot be written first as a merge's
shards are (writer.py). Instead the header's room is reserved up front, sized for the largest shapes the
tensors can have (every rank at its maximum: no number in the final header can have more digits), the
tensors are written one after the other behind it, and the real header is written last, padded with spaces
(which the safetensors format allows and its own writer uses for alignment) to the reserved size.

Until ``close`` the file starts with eight zero bytes (a header length of 0), which every safetensors reader
rejects: an extraction cut short never leaves a file that loads as if it were complete.
"""

from __future__ import annotations

import os
import struct

import torch

from ..errors import OutputError
from ..safetensors_format import build_header, tensor_bytes, write_from

ADAPTER_WEIGHTS = "adapter_model.safetensors"
Entry = tuple[str, torch.dtype, tuple[int, ...]]


class AdapterFile:
    def __init__(self, path: str, largest: list[Entry]):
        self.path = path
        self.room = len(build_header(largest)[0])   # 8-byte length + JSON padded to a multiple of 8
        self.written: list[Entry] = []
        self.end = self.room
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            self.fd = os.open(path, flags, 0o644)
        except OSError as exc:
            raise OutputError(f"cannot create the adapter file: {exc.strerror}", file=path,
                              hint="check that the output's parent folder is writable") from None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append one tensor (any device; written in its dtype)."""
        tensor = tensor.detach().to("cpu").contiguous()
        data = tensor_bytes(tensor)
        try:
            write_from(self.fd, self.end, data)
        except OSError as exc:
            raise OutputError(f"cannot write the adapter: {exc.strerror}", file=self.path,
                              hint="free some disk space and run again") from None
        self.end += len(data)
        self.written.append((name, tensor.dtype, tuple(tensor.shape)))

    def close(self) -> None:
        """Write the header (the tensors in the order written) and flush the file to disk."""
        header = build_header(self.written)[0][8:].rstrip(b" ")
        if len(header) > self.room - 8:   # cannot happen: the room was sized for the largest shapes
            raise AssertionError(f"adapter header of {len(header)} bytes exceeds its room of {self.room - 8}")
        header += b" " * (self.room - 8 - len(header))
        try:
            write_from(self.fd, 0, memoryview(struct.pack("<Q", len(header)) + header))
            os.fsync(self.fd)
        except OSError as exc:
            raise OutputError(f"cannot write the adapter: {exc.strerror}", file=self.path,
                              hint="free some disk space and run again") from None
        finally:
            self.abandon()

    def abandon(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
