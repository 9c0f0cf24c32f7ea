"""Validation: prove that a merged model is what its spec asked for.

``validate(out)`` runs four checks on an output folder, on the GPU when there is one and on the CPU
otherwise, with the same code:

1. structure  - every shard readable, the index consistent with the shards, the tensors exactly the planned
                ones (names, shapes, dtypes) and consistent with config.json;
2. finite     - no NaN or Inf anywhere (streamed in bounded chunks, reduced on the device);
3. recompute  - a sample of tensors (all with ``full``) merged again from the sources and compared with
                what was written (bit-exact on the device type the merge ran on);
4. forward    - the model runs in transformers on a fixed batch: finite logits, its loss beside each input's,
                and equal logits where the merge should compute what an input computes.

The spec is the output's ``mergekit_config.yml`` unless another is given, and the run settings it does not
hold (``--dtype``, ``--out-dtype``, ``--seed``, the device) come from the output's ``merge_run.json``.
"""

from __future__ import annotations

import os
import time
from typing import Iterable, Optional, Union

from ..engine.devices import resolve_device
from ..errors import MergeError, ModelError
from ..output.run_settings import RUN_SETTINGS_FILE, RunSettings, read_run_settings
from ..spec.schema import Spec, load_spec
from ..strategy import Strategy
from .folder import read_output
from .report import SKIPPED, CheckResult, Finding, ValidationReport

SPEC_FILE = "mergekit_config.yml"

__all__ = ["validate", "ValidationReport", "CheckResult", "Finding"]


def validate(out: Union[str, os.PathLike], spec: Union[str, os.PathLike, dict, Spec, None] = None,
             device: str = "auto", full: bool = False, forward: bool = True, *,
             strategies: Iterable[Strategy] = (), allow_pickle: bool = False,
             allow_nonfinite: bool = False) -> ValidationReport:
    """Check the merged model in ``out`` and return a report (``report.passed``, ``print(report)``,
    ``report.to_json()``). Raises MergeError only when ``out`` is no folder, the device is unusable, or a
    ``spec`` passed explicitly cannot be read; everything wrong with the output is in the report.
    ``allow_pickle``: sources with pickle weights only are read (torch.load(weights_only=True));
    ``allow_nonfinite``: NaN and Inf in the output (and the sources) are counted but do not fail."""
    started = time.perf_counter()
    compute = resolve_device(device)
    folder = read_output(os.fspath(out))
    extra: list[Finding] = []
    try:
        settings = read_run_settings(folder.path) or RunSettings()
    except ModelError as exc:
        settings = RunSettings()
        extra.append(Finding(exc.what, file=RUN_SETTINGS_FILE))
    spec_obj, spec_label, problem = _spec(folder.path, spec)
    plan = None
    if spec_obj is not None:
        plan, problem = _plan(spec_obj, settings, list(strategies), allow_pickle, allow_nonfinite)
    try:
        from . import forward as forward_check
        from . import recompute
        from .finite import check_finite
        from .structure import check_structure

        checks = [check_structure(folder, plan, problem, extra),
                  check_finite(folder, compute, allowed=allow_nonfinite)]
        if plan is None:
            checks.append(CheckResult("recompute", SKIPPED, problem or "no spec",
                                      numbers=recompute.empty_numbers(full=full)))
        else:
            checks.append(recompute.check_recompute(folder, plan, compute, full, settings.device))
        nonfinite = checks[1].numbers["nan"] + checks[1].numbers["inf"]
        if forward and allow_nonfinite and nonfinite:
            checks.append(CheckResult("forward", SKIPPED, f"the weights hold {nonfinite} NaN/Inf values "
                                      "(--allow-nonfinite), so the logits would say nothing",
                                      numbers=forward_check.empty_numbers()))
        elif forward:
            checks.append(forward_check.check_forward(folder, spec_obj, plan, compute))
        else:
            checks.append(CheckResult("forward", SKIPPED, "not requested", numbers=forward_check.empty_numbers()))
    finally:
        if plan is not None:
            plan.close()
    return ValidationReport(folder.path, str(compute), spec_label, full, checks, time.perf_counter() - started)


def _spec(folder: str, spec: Union[str, os.PathLike, dict, Spec, None]
          ) -> tuple[Optional[Spec], Optional[str], Optional[str]]:
    """(spec, where it came from, why there is none). An explicit spec must load; the output's own may not
    (a mergekit output can use keys this tool refuses), which only skips the checks that need it."""
    if spec is not None:
        loaded = load_spec(spec)
        return loaded, loaded.file or "given", None
    path = os.path.join(folder, SPEC_FILE)
    if not os.path.exists(path):
        return None, None, f"the output has no {SPEC_FILE}; pass the spec it was merged from (--spec)"
    try:
        return load_spec(path), path, None
    except MergeError as exc:
        return None, path, f"cannot read {SPEC_FILE}: {exc.what}"


def _plan(spec: Spec, settings: RunSettings, strategies: list[Strategy], allow_pickle: bool,
          allow_nonfinite: bool):
    from ..plan.planner import make_plan

    try:
        return make_plan(spec, dtype=settings.dtype, out_dtype=settings.out_dtype, seed=settings.seed,
                         strategies=strategies, allow_pickle=allow_pickle, allow_nonfinite=allow_nonfinite), None
    except MergeError as exc:
        where = ": ".join(part for part in (exc.where, exc.what) if part)
        return None, f"cannot plan the merge from the spec ({where})"
