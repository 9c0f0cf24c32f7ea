"""Check 2, finite: no NaN or Inf in any tensor, streamed in bounded chunks and reduced on the device.

One NaN in one weight turns every logit it touches into NaN, and a merge can make one (a division by a
zero sum of weights, an overflow when casting to float16). Every float tensor in every shard is read in
chunks of at most 64 MiB; each chunk is reduced on the device and dropped, so memory stays at one chunk. A
chunk's minimum and maximum (one reduction: NaN propagates through both, an Inf is one of them) say whether it
is finite; only a chunk that is not has its NaN and Inf counted.
"""

from __future__ import annotations

import time

import torch

from ..engine.nonfinite import unravel
from .folder import OutputFolder
from .report import CheckResult, Finding, not_applicable, not_checked, outcome
from .stream import CHUNK_BYTES, TensorReader


def check_finite(folder: OutputFolder, device: torch.device, chunk_bytes: int = CHUNK_BYTES,
                 allowed: bool = False) -> CheckResult:
    """``allowed`` (--allow-nonfinite): NaN and Inf are counted and reported in the summary, but pass."""
    started = time.perf_counter()
    failures: list[Finding] = []
    tensors = values = nan = inf = 0
    ordered = sorted(folder.stored(), key=lambda info: (info.path, info.start))   # sequential reads
    with TensorReader() as reader:
        for info in ordered:
            if not info.dtype.is_floating_point:
                continue
            tensors += 1
            values += info.numel
            counts = _count_nonfinite(reader, info, device, chunk_bytes)
            nan += counts[0]
            inf += counts[1]
            if counts[0] or counts[1]:
                failures.append(Finding(_describe(info.shape, *counts), tensor=info.name, file=folder.file_of(info)))
    numbers = {"tensors": tensors, "values": values, "nan": nan, "inf": inf, "tensors_nonfinite": len(failures),
               "chunk_bytes": chunk_bytes}
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
        chunk = chunk.to(device)                       # (n,) in the stored dtype
        if chunk.element_size() == 1:                  # float8: torch has no isfinite for it
            chunk = chunk.float()
        low, high = torch.aminmax(chunk)               # one reduction; NaN propagates, Inf is an extreme
        if bool(torch.isfinite(low) & torch.isfinite(high)):
            continue                                   # the common case: 20x cheaper than counting
        finite = torch.isfinite(chunk)                 # (n,) bool, on the device
        bad = chunk.numel() - int(finite.sum())
        if bad:
            chunk_nan = int(torch.isnan(chunk).sum())
            nan += chunk_nan
            inf += bad - chunk_nan
            if first < 0:
                first = start + int(torch.argmin(finite.to(torch.uint8)))   # first False
        del chunk, finite
    return nan, inf, first


def _describe(shape: tuple[int, ...], nan: int, inf: int, first: int) -> str:
    parts = [f"{nan} NaN" if nan else "", f"{inf} Inf" if inf else ""]
    return f"{' and '.join(p for p in parts if p)}, the first at {list(unravel(first, shape))}"
