"""Check 2, finite: no NaN or Inf in any tensor, streamed in bounded chunks and reduced on the device.

One NaN in one weight turns every logit it touches into NaN, and a merge can make one (a division by a
zero sum of weights, an overflow when casting to float16). Every float tensor in every shard is read in
chunks of at most 64 MiB; each chunk is reduced on the device and dropped, so memory stays at one chunk. A
chunk's minimum and maximum (one reduction: NaN propagates through both, an Inf is one of them) say whether it
is finite; only a chunk that is not has its NaN and Inf counted.

The forward check reads most of these tensors whole anyway, layer by layer, to run the model. Reading the output
twice costs a second pass over every byte (from the disk: the output was written past the page cache), so the
forward check counts NaN and Inf in each tensor of the output as it reads it (``FiniteTally``), and this check then
reads only the tensors the forward check did not (a vision tower a text batch does not run, tensors the model does
not use, all of them when the model could not stream). The count is the same either way: every value of every
float tensor of the output's files, each counted once.
"""

from __future__ import annotations

import time
from typing import Optional

import torch

from ..engine.nonfinite import unravel
from .folder import OutputFolder
from .report import CheckResult, Finding, not_applicable, not_checked, outcome
from .stream import CHUNK_BYTES, TensorReader


class FiniteTally:
    """NaN and Inf of the output's tensors that another check read whole (the forward check), by tensor name."""

    def __init__(self) -> None:
        self.counts: dict[str, tuple[int, int, int]] = {}

    def add(self, name: str, tensor: torch.Tensor, offset: int = 0) -> None:
        """Count ``tensor`` (the stored one, on any device) as the output's tensor ``name``, or as its part that
        starts at flat index ``offset`` (read a block of rows at a time; 0 starts the tensor's count afresh)."""
        if not tensor.is_floating_point():
            return
        nan, inf, first = nonfinite_in(tensor.reshape(-1))
        before = self.counts.get(name, (0, 0, -1)) if offset else (0, 0, -1)
        first = before[2] if before[2] >= 0 or first < 0 else offset + first
        self.counts[name] = (before[0] + nan, before[1] + inf, first)


def check_finite(folder: OutputFolder, device: torch.device, chunk_bytes: int = CHUNK_BYTES,
                 allowed: bool = False, counted: Optional[FiniteTally] = None) -> CheckResult:
    """``allowed`` (--allow-nonfinite): NaN and Inf are counted and reported in the summary, but pass.
    ``counted``: tensors already counted as the forward check read them; only the others are read here."""
    started = time.perf_counter()
    failures: list[Finding] = []
    tensors = values = nan = inf = reused = 0
    known = counted.counts if counted is not None else {}
    ordered = sorted(folder.stored(), key=lambda info: (info.path, info.start))   # sequential reads
    with TensorReader() as reader:
        for info in ordered:
            if not info.dtype.is_floating_point:
                continue
            tensors += 1
            values += info.numel
            reused += info.name in known
            counts = known.get(info.name) or _count_nonfinite(reader, info, device, chunk_bytes)
            nan += counts[0]
            inf += counts[1]
            if counts[0] or counts[1]:
                failures.append(Finding(_describe(info.shape, *counts), tensor=info.name, file=folder.file_of(info)))
    numbers = {"tensors": tensors, "values": values, "nan": nan, "inf": inf, "tensors_nonfinite": len(failures),
               "chunk_bytes": chunk_bytes, "tensors_counted_by_forward": reused}
    if not ordered:   # nothing was scanned: no claim either way
        why = f" (the weights are pickle files: {', '.join(folder.pickles[:3])})" if folder.pickle_only else ""
        return not_checked("finite", f"no tensors to scan{why}", numbers, time.perf_counter() - started)
    if not tensors:   # only integer tensors, which cannot hold NaN or Inf
        return not_applicable("finite", f"no float tensors among {len(ordered)}: NaN and Inf cannot occur", numbers)
    summary = f"{tensors} float tensors, {values:,} values: no NaN or Inf"
    if allowed and failures:
        summary = (f"{tensors} float tensors, {values:,} values: {nan} NaN and {inf} Inf in {len(failures)} tensor(s), "
                   "allowed (--allow-nonfinite)")
        failures = []
    return outcome("finite", failures, summary, numbers, time.perf_counter() - started)


def _count_nonfinite(reader: TensorReader, info, device: torch.device, chunk_bytes: int) -> tuple[int, int, int]:
    """(NaN count, Inf count, flat index of the first non-finite value or -1) of one tensor."""
    nan = inf = 0
    first = -1
    for start, chunk in reader.chunks(info, chunk_bytes, reuse=True):
        chunk_nan, chunk_inf, at = nonfinite_in(chunk.to(device))
        nan, inf = nan + chunk_nan, inf + chunk_inf
        if first < 0 <= at:
            first = start + at
        del chunk
    return nan, inf, first


def nonfinite_in(flat: torch.Tensor) -> tuple[int, int, int]:
    """(NaN count, Inf count, index of the first non-finite value or -1) of a float tensor, flattened or not."""
    if flat.element_size() == 1:                   # float8: torch has no isfinite for it
        flat = flat.float()
    if not flat.numel():
        return 0, 0, -1
    low, high = torch.aminmax(flat)                # one reduction; NaN propagates, Inf is an extreme
    if bool(torch.isfinite(low) & torch.isfinite(high)):
        return 0, 0, -1                            # the common case: 20x cheaper than counting
    finite = torch.isfinite(flat).reshape(-1)      # (n,) bool, on the device
    bad = finite.numel() - int(finite.sum())
    chunk_nan = int(torch.isnan(flat).sum())
    return chunk_nan, bad - chunk_nan, int(torch.argmin(finite.to(torch.uint8)))   # first False


def _describe(shape: tuple[int, ...], nan: int, inf: int, first: int) -> str:
    parts = [f"{nan} NaN" if nan else "", f"{inf} Inf" if inf else ""]
    return f"{' and '.join(p for p in parts if p)}, the first at {list(unravel(first, shape))}"
