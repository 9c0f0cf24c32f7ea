"""Validation of a PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors), as `merge extract`
and `merge adapters` write it, with the report a merge's validation gives:

1. structure  - the config fields PEFT needs, every module's A/B pair with the rank its config gives it,
                modules_to_save tensors, no stray keys, and (when the base model is a local folder: the config's
                base_model_name_or_path or the recorded base) A/B shapes against the base's weights, from headers;
2. finite     - no NaN or Inf in any tensor (the merge check, streamed in bounded chunks);
3. recompute  - a sample of modules (up to 8, always the largest; all with ``full``) made again from the sources
                in ``adapter_record.json`` and compared bit-exact (adapter_recompute.py); not checked, with the
                reason, when the record or a source is missing;
4. forward    - not applicable: no forward pass is run for an adapter.
"""

from __future__ import annotations

import os
import time
from typing import Union

from ..engine.devices import resolve_device
from ..errors import ModelError
from ..output.adapter_record import read_adapter_record
from .report import CheckResult, Finding, ValidationReport, not_applicable, not_checked

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
NO_FORWARD = "not run for an adapter folder: no forward pass checks an adapter (fold it and validate the model)"


def is_adapter_folder(path: Union[str, os.PathLike]) -> bool:
    """A PEFT adapter folder: adapter_config.json and no model config.json."""
    path = os.fspath(path)
    return os.path.isfile(os.path.join(path, CONFIG)) and not os.path.exists(os.path.join(path, "config.json"))


def validate_adapter(out: Union[str, os.PathLike], device: str = "auto", full: bool = False, *,
                     allow_nonfinite: bool = False) -> ValidationReport:
    """Check the adapter folder ``out`` and return a report (statuses and verdict as ``validate``'s)."""
    from .adapter_recompute import check_adapter_recompute
    from .adapter_structure import check_adapter_structure, read_adapter_folder
    from .finite import check_finite

    started = time.perf_counter()
    compute = resolve_device(device)
    path = os.path.abspath(os.fspath(out))
    if not os.path.isdir(path):
        raise ModelError("adapter folder not found" if not os.path.exists(path) else "is a file, not a folder",
                         file=os.fspath(out), hint="give the folder `merge extract` / `merge adapters` wrote")
    record, record_problem = _record(path)
    folder, problem = read_adapter_folder(path)
    structure = check_adapter_structure(path, folder, problem, record)
    if folder is None:
        finite = not_checked("finite", f"{WEIGHTS} cannot be read", {"tensors": 0, "values": 0, "nan": 0, "inf": 0})
    else:
        finite = check_finite(folder, compute, allowed=allow_nonfinite)
    if folder is None:
        recompute = not_checked("recompute", f"{WEIGHTS} cannot be read", _numbers())
    elif record_problem:
        recompute = CheckResult("recompute", "failed", "1 problem", 0.0, _numbers(), [record_problem])
    else:
        recompute = check_adapter_recompute(path, folder, record, compute, full)
    checks = [structure, finite, recompute, not_applicable("forward", NO_FORWARD, {})]
    return ValidationReport(path, str(compute), None, full, checks, time.perf_counter() - started)


def _numbers() -> dict:
    return {"tensors": 0, "planned": 0, "bit_exact": 0, "modules": 0}


def _record(path: str):
    try:
        return read_adapter_record(path), None
    except ModelError as exc:
        return None, Finding(exc.what, file="adapter_record.json")
