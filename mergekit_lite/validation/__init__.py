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

Each check ends passed, failed, not checked (it applies but could not be carried out, or ran on nothing:
its summary says why) or not applicable (recompute on a plain model folder, which has no merge record; a
check the caller turned off). The verdict is FAILED if a check failed, else NOT CHECKED if a check was not
checked, else PASSED (``report.status``; `merge validate` exits 1, 3 or 0): a check that did not run never
counts as passed.

The spec is the output's ``mergekit_config.yml`` unless another is given, and the run settings it does not
hold (``--dtype``, ``--out-dtype``, ``--seed``, the device, the folder the run started in) come from the
output's ``merge_run.json`` (record.py).
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, Optional, Union

from ..engine.devices import resolve_device
from ..errors import MergeError
from ..output.run_settings import RunSettings
from ..spec.schema import Spec
from ..strategy import Strategy
from .folder import OutputFolder, read_output
from .record import NO_MERGE, MergeRecord, read_record
from .report import CheckResult, Finding, ValidationReport, not_applicable, not_checked

__all__ = ["validate", "ValidationReport", "CheckResult", "Finding"]


def validate(out: Union[str, os.PathLike], spec: Union[str, os.PathLike, dict, Spec, None] = None,
             device: str = "auto", full: bool = False, forward: bool = True, *,
             strategies: Iterable[Strategy] = (), allow_pickle: bool = False,
             allow_nonfinite: bool = False, progress: bool = False,
             trust_remote_code: bool = False, context_inputs: bool = True) -> ValidationReport:
    """Check the merged model in ``out`` and return a report: ``report.status`` is "passed", "failed" or
    "not_checked" (``report.passed``, ``report.failed``, ``report.exit_code``; ``print(report)``,
    ``report.to_json()``). Raises MergeError only when ``out`` is no folder, the device is unusable, or a
    ``spec`` passed explicitly cannot be read; everything wrong with the output is in the report.
    ``allow_pickle``: sources and models with pickle weights only are read (torch.load(weights_only=True));
    without it no pickle is ever unpickled. ``allow_nonfinite``: NaN and Inf in the output (and the sources)
    are counted but do not fail. ``forward=False`` leaves the forward pass out (not applicable). ``progress``
    shows a bar naming the check that runs and the time spent (tqdm; the notebook widget in Jupyter).
    ``trust_remote_code``: the forward check may run a model whose code is its own (config.json's auto_map,
    files in ``out``); without it that check is not checked, and says so. ``context_inputs=False`` (the validation
    after `merge run`): the forward check runs an input model only when the merged model must equal it (the
    report lists the others as not run, with why); their losses are context, computed by default here.
    A PEFT adapter folder (adapter_config.json, no config.json) gets the adapter checks (adapter.py)."""
    from .adapter import is_adapter_folder, validate_adapter

    if is_adapter_folder(out):   # a PEFT adapter folder: its own checks (adapter.py)
        if spec is not None:
            from ..errors import UsageError

            raise UsageError(f"{out} is a LoRA adapter folder: it is checked against the sources in its "
                             "adapter_record.json, not a spec", where="--spec", hint="leave out --spec")
        return validate_adapter(out, device, full, allow_nonfinite=allow_nonfinite)
    started = time.perf_counter()
    compute = resolve_device(device)
    folder = read_output(os.fspath(out))
    record = read_record(folder.path, spec)
    plan, problem = None, record.problem
    if record.spec is not None:
        plan, problem = _plan(record.spec, record.settings, list(strategies), allow_pickle, allow_nonfinite)
    try:
        from .finite import FiniteTally, check_finite
        from .structure import check_structure

        with _progress(progress) as step, _trusting(trust_remote_code):
            step("structure")
            structure = check_structure(folder, plan, problem, record.findings)
            step("recompute")
            recomputed = _recompute(folder, record, plan, problem, compute, full)
            step("forward")   # before finite: it counts NaN and Inf in what it reads (finite.py)
            tally = FiniteTally()
            forwarded = _forward(folder, record, plan, problem, compute, forward, allow_pickle, context_inputs, tally)
            step("finite")
            finite = check_finite(folder, compute, allowed=allow_nonfinite, counted=tally)
            checks = [structure, finite, recomputed, _unless_nonfinite(forwarded, finite)]
    finally:
        if plan is not None:
            plan.close()
    return ValidationReport(folder.path, str(compute), record.spec_label, full, checks,
                            time.perf_counter() - started, sources_from=record.sources_from)


@contextmanager
def _trusting(trust_remote_code: bool) -> Iterator[None]:
    """The forward check runs a model's own code only inside this, and only when the caller said so."""
    from .inference import TRUST_REMOTE_CODE

    token = TRUST_REMOTE_CODE.set(trust_remote_code)
    try:
        yield
    finally:
        TRUST_REMOTE_CODE.reset(token)


@contextmanager
def _progress(enabled: bool) -> Iterator[Callable[[str], None]]:
    """A bar over the four checks while they run, naming the one that runs and what the finished ones cost. It
    is cleared at the end: the verdict line (or the report) that follows says the same, with the total."""
    if not enabled:
        yield lambda name: None
        return
    from tqdm.auto import tqdm

    with tqdm(total=4, desc="validating", unit="check", dynamic_ncols=True, leave=False,
              bar_format="{desc}: {n_fmt}/{total_fmt} checks [{elapsed}]{postfix}") as bar:
        costs: list[tuple[str, float]] = []   # each check that ran, and when it started

        def done() -> None:
            if costs:
                name, started = costs[-1]
                costs[-1] = (name, time.perf_counter() - started)
                bar.update(1)
                bar.set_postfix_str(", ".join(f"{n} {t:.2f} s" for n, t in costs), refresh=False)

        def step(name: str) -> None:
            done()   # the check before this one
            costs.append((name, time.perf_counter()))
            bar.set_description_str(f"validating ({name})")

        yield step
        done()
        bar.set_description_str("validated")


def _recompute(folder: OutputFolder, record: MergeRecord, plan, problem: Optional[str], compute, full: bool
               ) -> CheckResult:
    from . import recompute

    if not record.is_merge:
        return not_applicable("recompute", NO_MERGE, recompute.empty_numbers(full=full))
    if record.moe:   # copied from the experts, routers from prompts: no tensor is a merge to compute again
        return not_applicable("recompute", record.problem, recompute.empty_numbers(full=full))
    if plan is None:
        return not_checked("recompute", problem or "no spec", recompute.empty_numbers(full=full))
    if record.other_tool is not None and plan.strategy.random:
        return not_checked("recompute", f"{plan.strategy.name} draws random choices, and {record.other_tool} draws "
                           "them with another generator than this tool, so its tensors cannot be recomputed here",
                           recompute.empty_numbers(full=full, other_tool=record.other_tool))
    return recompute.check_recompute(folder, plan, compute, full, record.settings.device, record.other_tool)


def _forward(folder: OutputFolder, record: MergeRecord, plan, problem: Optional[str], compute, requested: bool,
             allow_pickle: bool, context_inputs: bool, tally) -> CheckResult:
    from . import forward as forward_check

    if not requested:
        return not_applicable("forward", "not requested", forward_check.empty_numbers())
    return forward_check.check_forward(folder, record.spec, plan, compute, allow_pickle=allow_pickle,
                                       plan_problem=problem, context_inputs=context_inputs, moe=record.moe,
                                       tally=tally)


def _unless_nonfinite(forwarded: CheckResult, finite: CheckResult) -> CheckResult:
    """The forward check's result, unless the weights hold NaN or Inf that were allowed (--allow-nonfinite): then
    the logits say nothing, and the check is not checked (a NaN that was not allowed already fails finite)."""
    from . import forward as forward_check

    nonfinite = finite.numbers.get("nan", 0) + finite.numbers.get("inf", 0)
    if not nonfinite or finite.status == "failed" or forwarded.status == "not_applicable":
        return forwarded
    return not_checked("forward", f"the weights hold {nonfinite} NaN/Inf values (--allow-nonfinite), so the "
                       "logits would say nothing", forward_check.empty_numbers(), forwarded.seconds)


def _plan(spec: Spec, settings: RunSettings, strategies: list[Strategy], allow_pickle: bool,
          allow_nonfinite: bool):
    from ..plan.planner import make_plan

    try:
        return make_plan(spec, dtype=settings.dtype, out_dtype=settings.out_dtype, seed=settings.seed,
                         strategies=strategies, allow_pickle=allow_pickle, allow_nonfinite=allow_nonfinite,
                         config_from=settings.config_from), None
    except MergeError as exc:
        where = ": ".join(part for part in (exc.where, exc.what) if part)
        return None, f"cannot plan the merge from the spec ({where})"
