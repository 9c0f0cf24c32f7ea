"""Check 3 for an adapter folder, recompute: a sample of modules made again from the sources recorded in
``adapter_record.json`` (output/adapter_record.py) and compared with what was written.

- `merge extract`: each sampled module's change FT - BASE decomposed again with the recorded settings (max_rank,
  sv_epsilon, distribute_scale, svd and the module's seed for the randomized SVD) and cast to the written
  dtype: bit-exact on the device type the extraction ran on. On another device type the SVD's factors may
  differ in sign and rounding, so B @ A is compared instead, within a relative Frobenius error of
  ``TOLERANCE`` (or a few units of the written dtype's precision, if larger).
- `merge adapters`: each sampled module combined again from the recorded adapters with the recorded
  arguments and seed (lora/combination.py's ``combine_planned``, on the CPU as the command does): bit-exact.

The sample is up to ``SAMPLE`` modules, always the largest, the rest spread over the module list; ``full``
takes every module. Memory holds one module's sources and factors. A source that is gone, or a record that
is missing, leaves the check not checked with the reason: it is never reported as passed.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any, Optional

import torch

from ..errors import ModelError
from .folder import OutputFolder
from .report import CheckResult, Finding, not_checked, outcome
from .stream import TensorReader

PREFIX = "base_model.model."
SAMPLE = 8
TOLERANCE = 1e-4
PARTS = {".lora_A.weight": ("lora", "down"), ".lora_B.weight": ("lora", "up"),
         ".lora_embedding_A": ("embedding", "down"), ".lora_embedding_B": ("embedding", "up")}
NO_RECORD = ("no adapter_record.json (an adapter not made by `merge extract` / `merge adapters`, or by an older "
             "version): its sources are unknown")


def check_adapter_recompute(path: str, folder: OutputFolder, record: Optional[dict], compute: torch.device,
                            full: bool) -> CheckResult:
    started = time.perf_counter()
    modules = adapter_modules(folder)
    numbers: dict[str, Any] = {"tensors": 0, "planned": 2 * len(modules), "bit_exact": 0, "modules": 0,
                               "command": record.get("command") if record else None, "max_rel_error": None}
    if record is None:
        return not_checked("recompute", NO_RECORD, numbers)
    chosen = sample(modules, folder, full)
    run = _extract if record["command"] == "extract" else _adapters
    failures: list[Finding] = []
    try:
        reason = run(record, folder, modules, chosen, compute, numbers, failures)
    except ModelError as exc:
        reason = f"a source cannot be read ({exc.file or ''}: {exc.what})"
    seconds = time.perf_counter() - started
    if reason is not None:
        return not_checked("recompute", reason, numbers, seconds)
    numbers["modules"] = len(chosen)
    how = "bit-exact" if numbers["max_rel_error"] is None else \
        f"B @ A within {numbers['tolerance']:.0e} (relative; another device type than the run's)"
    summary = f"{numbers['tensors']}/{numbers['planned']} tensors of {len(chosen)} modules made again, {how}"
    return outcome("recompute", failures, summary, numbers, seconds)


def adapter_modules(folder: OutputFolder) -> dict[str, dict[str, str]]:
    """module -> {"kind", "down", "up"}: the keys of its factors (as named, whether the file holds both or not)."""
    modules: dict[str, dict[str, str]] = {}
    for key in folder.tensors:
        for suffix, (kind, side) in PARTS.items():
            if key.startswith(PREFIX) and key.endswith(suffix):
                module = key[len(PREFIX):-len(suffix)]
                names = [s for s, (k, _) in PARTS.items() if k == kind]
                modules[module] = {"kind": kind, "down": PREFIX + module + names[0], "up": PREFIX + module + names[1]}
    return modules


def sample(modules: dict[str, dict[str, str]], folder: OutputFolder, full: bool) -> list[str]:
    """Every module with ``full`` or when there are few; else the largest and a spread of the others."""
    names = sorted(modules)
    if full or len(names) <= SAMPLE:
        return names

    def size(name: str) -> int:
        return sum(folder.tensors[k].numel for k in (modules[name]["down"], modules[name]["up"]) if k in folder.tensors)

    largest = max(names, key=size)
    rest = [n for n in names if n != largest]
    step = len(rest) / (SAMPLE - 1)
    return [largest] + [rest[int(i * step)] for i in range(SAMPLE - 1)]


def _extract(record: dict, folder: OutputFolder, modules: dict, chosen: list[str], compute: torch.device,
             numbers: dict, failures: list[Finding]) -> Optional[str]:
    from ..dtypes import parse_dtype
    from ..lora.extract import extract_module
    from ..sources.opener import open_checkpoint

    for what, key in (("fine-tuned model", "model"), ("base model", "base_model")):
        if not isinstance(record.get(key), str) or not os.path.isdir(record[key]):
            return f"the {what} it was extracted from ({record.get(key)}) is not there"
    settings = record["settings"]
    same_device = record.get("device") == compute.type
    ft = open_checkpoint(record["model"])
    try:
        base = open_checkpoint(record["base_model"])
    except ModelError:
        ft.close()
        raise
    try:
        with TensorReader() as reader:
            for module in chosen:
                name = f"{module}.weight"
                if name not in ft.tensors or name not in base.tensors:
                    failures.append(Finding(f"the sources have no '{name}' to extract it from",
                                            tensor=modules[module]["down"]))
                    continue
                factors = extract_module(ft, base, name, modules[module]["kind"] == "embedding", settings, compute)
                dtype = parse_dtype(record["out_dtype"]) if record.get("out_dtype") else ft.tensors[name].dtype
                _compare(reader, folder, modules[module], factors.down.to(dtype), factors.up.to(dtype), same_device,
                         numbers, failures)
    finally:
        ft.close()
        base.close()
    return None


def _adapters(record: dict, folder: OutputFolder, modules: dict, chosen: list[str], compute: torch.device,
              numbers: dict, failures: list[Finding]) -> Optional[str]:
    from ..lora.adapter import open_adapter
    from ..lora.combination import combine_planned, plan_combination
    from ..lora.combine import Combination

    sources = record.get("adapters") or []
    labels = record.get("labels") or sources
    gone = [label for folder_, label in zip(sources, labels) if not os.path.isdir(folder_)]
    if gone or not sources:
        return f"the adapter {gone[0] if gone else '?'} it was combined from is not there ({', '.join(sources)})"
    combo = Combination(**{**record["combination"], "weights": tuple(record["combination"]["weights"])})
    opened = []
    try:
        for source, label in zip(sources, labels):
            opened.append(open_adapter(source, label, bool(record.get("allow_pickle"))))
        try:
            plan = plan_combination(opened, combo, bool(record.get("check_base", True)))
        except ModelError as exc:
            return f"the recorded adapters no longer combine ({exc.what})"
        planned = {m.name: m for m in plan.modules}
        failures += [Finding(f"the combination has module '{m}', the file has no factors of it")
                     for m in planned if m not in modules]
        with TensorReader() as reader:
            for module in chosen:
                if module not in planned:
                    failures.append(Finding("no module of the recorded adapters' combination",
                                            tensor=modules[module]["down"]))
                    continue
                down, up = combine_planned(plan, opened, planned[module], int(record.get("seed", 0)))
                _compare(reader, folder, modules[module], down, up, True, numbers, failures)
    finally:
        for adapter in opened:
            adapter.close()
    return None


def _compare(reader: TensorReader, folder: OutputFolder, module: dict, down: torch.Tensor, up: torch.Tensor,
             exact: bool, numbers: dict, failures: list[Finding]) -> None:
    """The written factors of one module against the recomputed ones (bit-exact, or B @ A within tolerance)."""
    written = {}
    for side, want in (("down", down), ("up", up)):
        info = folder.tensors.get(module[side])
        if info is None:
            failures.append(Finding("missing from the file, but the sources make it", tensor=module[side]))
            continue
        have = reader.read(info)
        written[side] = have
        if tuple(have.shape) != tuple(want.shape):
            failures.append(Finding(f"shape {list(have.shape)}, recomputed {list(want.shape)} (another rank)",
                                    tensor=module[side]))
        elif exact:
            numbers["tensors"] += 1
            want = want.to("cpu")
            if have.dtype == want.dtype and torch.equal(have, want):
                numbers["bit_exact"] += 1
            else:
                diff = (have.double() - want.double()).abs()
                diff = diff.nan_to_num(nan=math.inf)
                where = int(torch.argmax(diff)) if diff.numel() else 0
                failures.append(Finding(f"differs from the recomputed value: {int((diff > 0).sum())} of {have.numel()} "
                                        f"values, the largest by {float(diff.max()):.3g} (at flat index {where})",
                                        tensor=module[side]))
    if not exact and len(written) == 2 and all(tuple(written[s].shape) == tuple(w.shape)
                                               for s, w in (("down", down), ("up", up))):
        _compare_product(written, down, up, module, numbers, failures)


def _compare_product(written: dict, down: torch.Tensor, up: torch.Tensor, module: dict, numbers: dict,
                     failures: list[Finding]) -> None:
    dtype = written["down"].dtype
    tolerance = max(TOLERANCE, 8 * torch.finfo(dtype).eps) if dtype.is_floating_point else TOLERANCE
    have = written["up"].double() @ written["down"].double()
    want = up.double().cpu() @ down.double().cpu()
    norm = float(torch.linalg.matrix_norm(want)) or 1.0
    error = float(torch.linalg.matrix_norm(have - want)) / norm
    numbers["tensors"] += 2
    numbers["tolerance"] = tolerance
    numbers["max_rel_error"] = max(numbers["max_rel_error"] or 0.0, error)
    if not error <= tolerance:
        failures.append(Finding(f"B @ A differs from the recomputed one by {error:.3g} (relative), more than "
                                f"{tolerance:.0e}", tensor=module["down"]))
