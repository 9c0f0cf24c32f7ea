"""Check 3, recompute: merge a sample of tensors again from the sources and compare with what was written.

The recomputation is the same plan (made again from the spec and the recorded run settings) through the
engine's own pieces and paths (``engine.loop.computed_pieces``: row blocks of element-wise merges, the chunked
bodies of whole-tensor strategies on the CPU, whole tensors otherwise), under the merge's torch thread setting
(one intra-op thread on the CPU, ``engine.loop.merge_arithmetic``: a reduction split over two threads adds in
another order), and each piece is compared with the bytes written for it, so it holds what the merge held. What
it can differ in is everything that happens around the arithmetic when merging at scale: the streaming, the
byte offsets in the shards, the cast, the shard layout. Those bugs give wrong bytes, not wrong shapes, and only
this check sees them.

Tolerance rule: on the device type the merge ran on, the result must be bit-identical. On another device
type (merged on the CPU, validated on CUDA) float32 arithmetic may round differently in its last bit, which
can move the rounded output by one unit in the last place of the output dtype, so each value may differ by
at most 1 ulp of the output dtype at its magnitude. Non-float tensors must always be identical.

Outputs of other tools (mergekit's: its mergekit_config.yml without our merge_run.json) are judged by how
they were computed. mergekit computes in the spec's ``dtype`` (else the inputs' dtype); in float32 it gives
our bits, so the 1-ulp rule holds. In bfloat16 or float16 every add and multiply rounds, and a result much
smaller than its inputs (a task vector, weights of both signs) can differ by hundreds of ulp of its own
magnitude. Such a value passes when |written - recomputed| <= (n + 2) * eps(dtype) * max(|inputs|, |result|)
elementwise, with n the number of inputs: the rounding error bound of that arithmetic. A wrong tensor, a wrong
weight or a flipped bit is far outside it and still fails.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Optional

import torch

from ..dtypes import dtype_name
from ..engine.nonfinite import unravel
from ..errors import MergeError
from ..plan.jobs import TensorJob
from ..plan.planner import MergePlan
from ..safetensors_format import same_bytes
from .folder import OutputFolder
from .report import CheckResult, Finding, not_checked, number, outcome
from .stream import TensorReader

CHUNK_VALUES = 1 << 22      # values compared at once on the device (float64: 32 MiB per operand)


@dataclass(frozen=True)
class Comparison:
    differing: int          # values whose bits differ
    max_ulp: float          # largest difference, in units in the last place of the stored dtype (inf: NaN vs number)
    worst: int              # flat index of the largest difference

    @property
    def identical(self) -> bool:
        return self.differing == 0


def sample_jobs(plan: MergePlan, full: bool) -> list[TensorJob]:
    """Every job with ``full``; else the tensors outside the layers (embeddings, final norm, lm_head) and every
    tensor of the first and the last layer: the places where layout and tying bugs show first."""
    if full:
        return list(plan.jobs)
    layers = [job.layer for job in plan.jobs if job.layer is not None]
    ends = {min(layers), max(layers)} if layers else set()
    return [job for job in plan.jobs if job.layer is None or job.layer in ends]


@dataclass
class _Tally:
    """The comparison of one tensor, added up piece by piece."""
    differing: int = 0
    max_ulp: float = 0.0
    worst: int = -1
    half: Optional[torch.dtype] = None       # another tool's half-precision arithmetic, when it could explain it
    rounded: bool = True                     # every differing piece within that arithmetic's rounding bound
    unmerged: Optional[list[bool]] = None    # per source: every piece equals that source's tensor, unmerged

    def add(self, result: Comparison, offset: int) -> None:
        self.differing += result.differing
        if result.differing and (result.max_ulp > self.max_ulp or self.worst < 0):
            self.max_ulp, self.worst = result.max_ulp, offset + result.worst

    @property
    def comparison(self) -> Comparison:
        return Comparison(self.differing, self.max_ulp, self.worst)


def check_recompute(folder: OutputFolder, plan: MergePlan, device: torch.device, full: bool,
                    merged_on: Optional[str], other_tool: Optional[str] = None) -> CheckResult:
    """Each sampled tensor merged again piece by piece as the loop merges it (engine.loop.computed_pieces: row
    blocks of element-wise merges, whole tensors otherwise, under the merge's torch thread setting) and each
    piece compared with the bytes written for it, so memory holds what the merge held."""
    from ..engine.loop import merge_arithmetic
    from ..engine.memory import reuse_freed_memory

    started = time.perf_counter()
    tolerance = 0 if merged_on == device.type and other_tool is None else 1
    rounded = 0                        # tensors of another tool within the bound of its half-precision arithmetic
    computed_in: Optional[torch.dtype] = None
    jobs = sample_jobs(plan, full)
    failures: list[Finding] = []
    unreadable: list[Finding] = []     # tensors whose sources could not be read: not checked, not failed
    exact = 0
    worst_ulp = 0.0
    with TensorReader() as reader, merge_arithmetic(device), reuse_freed_memory():
        for job in jobs:
            info = folder.tensors.get(job.name)
            if info is None or info.shape != job.shape or info.dtype != job.dtype:
                failures.append(Finding("cannot be compared: it is missing or has another shape or dtype than "
                                        "planned (see structure)", tensor=job.name))
                continue
            try:
                tally = _recompute_job(plan, job, info, reader, device, other_tool)
            except MergeError as exc:
                unreadable.append(Finding(f"cannot be recomputed: {exc.what}", tensor=job.name, file=exc.file))
                continue
            result = tally.comparison
            worst_ulp = max(worst_ulp, result.max_ulp)
            if result.identical:
                exact += 1
            elif job.dtype.is_floating_point and result.max_ulp > tolerance and tally.half is not None \
                    and tally.rounded:
                rounded, computed_in = rounded + 1, tally.half
            elif not job.dtype.is_floating_point or result.max_ulp > tolerance:
                failures.append(Finding(_mismatch(job, tally, tolerance), tensor=job.name,
                                        file=folder.file_of(info)))
    numbers = empty_numbers(tensors=len(jobs), planned=len(plan.jobs), full=full, bit_exact=exact,
                            max_ulp=number(worst_ulp), tolerance_ulp=tolerance, merged_on=merged_on,
                            sources=len(plan.checkpoints), other_tool=other_tool,
                            computed_in=dtype_name(computed_in) if computed_in is not None else None)
    seconds = time.perf_counter() - started
    if not jobs:
        return not_checked("recompute", "the spec's plan has no tensors to recompute", numbers, seconds)
    if unreadable and not failures:
        first = unreadable[0]
        return not_checked("recompute", f"{len(unreadable)} of {len(jobs)} sampled tensors could not be recomputed "
                           f"(the first: '{first.tensor}': {first.message.removeprefix('cannot be recomputed: ')})",
                           numbers, seconds)
    how = "bit-exact" if exact == len(jobs) else f"{exact} bit-exact, all within {tolerance} ulp"
    if rounded:
        how = (f"{exact} bit-exact, {len(jobs) - exact - rounded} within {tolerance} ulp, {rounded} within the rounding "
               f"of {dtype_name(computed_in)} arithmetic: computed by {other_tool} in {dtype_name(computed_in)}, "
               f"differences up to {worst_ulp:.0f} ulp are expected")
    summary = (f"{len(jobs)} of {len(plan.jobs)} tensors merged again from {len(plan.checkpoints)} source(s) "
               f"on {device.type}: {how}")
    return outcome("recompute", failures + unreadable, summary, numbers, seconds)


def _recompute_job(plan: MergePlan, job: TensorJob, info, reader: TensorReader, device: torch.device,
                   other_tool: Optional[str]) -> _Tally:
    """One tensor merged again and compared with the written bytes, one piece (a row block, or the whole
    tensor) at a time."""
    from ..engine.loop import computed_pieces, merge_threads

    tally = _Tally(half=_half_precision(plan, job) if other_tool is not None else None,
                   unmerged=[True] * len(job.sources))
    row_values = math.prod(job.shape[1:]) if job.shape else 1
    for rows, expected, inputs in computed_pieces(plan, job, device, merge_threads()):
        written = reader.read_rows(info, rows)
        result = compare(written, expected, device)
        tally.add(result, rows[0] * row_values if rows is not None else 0)
        if not result.identical:
            if tally.half is not None and tally.rounded:
                tally.rounded = within_rounding(written, expected, inputs, tally.half)
            for i, tensor in enumerate(inputs):
                tally.unmerged[i] = tally.unmerged[i] and _same_bytes(tensor, written, job.dtype)
        else:
            tally.unmerged = [False] * len(job.sources)
        del written, expected, inputs
    return tally


def _same_bytes(tensor: torch.Tensor, written: torch.Tensor, dtype: torch.dtype) -> bool:
    return (tensor.dtype.is_floating_point and tensor.shape == written.shape and
            same_bytes(tensor.to(dtype), written))


def empty_numbers(**known) -> dict:
    numbers = {"tensors": 0, "planned": 0, "full": False, "bit_exact": 0, "max_ulp": None, "tolerance_ulp": None,
               "merged_on": None, "sources": 0, "other_tool": None, "computed_in": None}
    numbers.update(known)
    return numbers


def _half_precision(plan: MergePlan, job: TensorJob) -> Optional[torch.dtype]:
    """The dtype another tool computed this tensor in, when narrower than float32: the spec's ``dtype``, else
    the narrowest floating dtype the inputs are stored in (mergekit's rule); None for float32 or wider."""
    stored = [source.info.dtype for source in job.sources]
    dtype = plan.spec.dtype or min((d for d in stored if d.is_floating_point),
                                   key=lambda d: torch.finfo(d).bits, default=None)
    return dtype if dtype is not None and torch.finfo(dtype).bits < 32 else None


def within_rounding(written: torch.Tensor, expected: torch.Tensor, raw: list[torch.Tensor],
                    dtype: torch.dtype) -> bool:
    """|written - expected| <= (n + 2) eps(dtype) max(|inputs|, |expected|) everywhere (n inputs): the error
    bound of computing the merge in ``dtype``. Inputs of another shape (a layout's slice) bound by |expected|."""
    inputs = [t.reshape(-1) for t in raw if t.shape == expected.shape and t.dtype.is_floating_point]
    flat_written, flat_expected = written.reshape(-1), expected.reshape(-1)
    factor = (len(raw) + 2) * torch.finfo(dtype).eps
    for start in range(0, flat_expected.numel(), CHUNK_VALUES):   # float64 in bounded chunks
        part = slice(start, start + CHUNK_VALUES)
        scale = flat_expected[part].to(torch.float64).abs()
        for tensor in inputs:
            scale = torch.maximum(scale, tensor[part].to(torch.float64).abs())
        diff = (flat_written[part].to(torch.float64) - flat_expected[part].to(torch.float64)).abs()
        if not bool((diff <= factor * scale).all()):
            return False
    return True


def compare(written: torch.Tensor, expected: torch.Tensor, device: torch.device,
            chunk_values: int = CHUNK_VALUES) -> Comparison:
    """Compare two tensors of one dtype value by value, in chunks on ``device``."""
    flat_written, flat_expected = written.reshape(-1), expected.reshape(-1)
    if same_bytes(flat_written, flat_expected):
        return Comparison(0, 0.0, -1)
    differing, max_ulp, worst = 0, 0.0, -1
    for start in range(0, flat_written.numel(), chunk_values):
        a = flat_written[start:start + chunk_values].to(device)
        b = flat_expected[start:start + chunk_values].to(device)
        if a.dtype.is_floating_point:
            ulps = ulp_distance(a, b)
        else:
            ulps = (a != b).to(torch.float64) * float("inf")
        differing += int((ulps > 0).sum())
        chunk_max, chunk_at = torch.max(ulps, dim=0)
        if float(chunk_max) > max_ulp or worst < 0:
            max_ulp, worst = float(chunk_max), start + int(chunk_at)
    return Comparison(differing, max_ulp, worst)


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in units in the last place of their dtype at max(|a|, |b|); 0 where equal (NaN == NaN here),
    inf where only one is NaN or the infinities differ. Computed in float64, which holds every difference of
    float32 (or narrower) values exactly."""
    finfo = torch.finfo(a.dtype)
    x, y = a.to(torch.float64), b.to(torch.float64)
    scale = torch.maximum(x.abs(), y.abs()).nan_to_num(nan=1.0, posinf=1.0).clamp(min=finfo.tiny)
    _, exponent = torch.frexp(scale)                       # scale = m * 2**exponent, m in [0.5, 1)
    ulp = torch.ldexp(torch.full_like(scale, finfo.eps), exponent - 1)
    distance = (x - y).abs() / ulp
    distance = torch.where(distance.isnan(), torch.full_like(distance, float("inf")), distance)
    same = (x == y) | (x.isnan() & y.isnan())
    return torch.where(same, torch.zeros_like(distance), distance)


def _mismatch(job: TensorJob, tally: _Tally, tolerance: int) -> str:
    result = tally.comparison
    at = list(unravel(result.worst, job.shape))
    size = f"{result.max_ulp:.3g} ulp" if result.max_ulp != float("inf") else "NaN or Inf vs a number"
    text = (f"differs from the merge recomputed from the sources: {result.differing} of {math.prod(job.shape)} "
            f"values, up to {size} of {dtype_name(job.dtype)} (tolerance {tolerance}) at {at}")
    for source, unmerged in zip(job.sources, tally.unmerged or ()):
        if unmerged:
            return text + f"; it is {source.checkpoint.label}'s tensor, unmerged"
    return text
