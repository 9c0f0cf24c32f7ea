"""The library entry points: ``load_spec`` and ``run_merge``, for notebooks and scripts."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Optional, Union

import torch

from .devices import resolve_device
from .dtypes import parse_dtype
from .errors import Interrupted, OutputError, UsageError
from .executors import check_executor
from .outdir import LEFTOVER, OutputLock, check_free_space, check_output, commit_partial, start_partial
from .plan import MergePlan, plan_merge
from .run_settings import RunSettings, settings_for, write_run_settings
from .spec import Spec, load_spec
from .strategy import Strategy
from .units import parse_size

if TYPE_CHECKING:
    from .hub_push import PushResult
    from .validation import ValidationReport

log = logging.getLogger("mergekit_lite")
SpecLike = Union[str, os.PathLike, dict, Spec]


@dataclass(frozen=True)
class MergeResult:
    """What a merge produced."""

    path: str                 # the output folder (for a dry run: where it would be written)
    tensors: int
    bytes: int                # tensor bytes written (the index's total_size)
    seconds: float
    shards: int = 0
    dry_run: bool = False
    warnings: list[str] = field(default_factory=list)
    summary: str = ""         # for a dry run: the plan, as `merge run --dry-run` prints it
    validation: Optional["ValidationReport"] = None   # None when not validated (validate=False, dry run)
    pushed: Optional["PushResult"] = None   # with push_to_hub: where the model went
    resumed_shards: int = 0   # shards an interrupted run had finished, verified and kept (--resume)

    def __str__(self) -> str:
        from .units import format_size

        if self.dry_run:
            return f"Would write {self.tensors} tensors ({format_size(self.bytes)}) to {self.path}."
        resumed = f"; {self.resumed_shards} kept from the interrupted run" if self.resumed_shards else ""
        return (f"Merged {self.tensors} tensors ({format_size(self.bytes)}, {self.shards} shard(s){resumed}) into "
                f"{self.path} in {self.seconds:.1f} s.")


def make_plan(spec: SpecLike, *, dtype: Optional[str] = None, out_dtype: Optional[str] = None, seed: int = 0,
              strategies: Iterable[Strategy] = (), allow_pickle: bool = False,
              allow_nonfinite: bool = False) -> MergePlan:
    """Check a spec and plan the merge from the inputs' headers, without reading tensor data."""
    return plan_merge(load_spec(spec), strategies=strategies, dtype=_dtype(dtype, "--dtype"),
                      out_dtype=_dtype(out_dtype, "--out-dtype"), seed=seed, allow_pickle=allow_pickle,
                      allow_nonfinite=allow_nonfinite)


def run_merge(spec: SpecLike, out: Union[str, os.PathLike], *, max_shard_size: Union[str, int] = "5GB",
              dtype: Optional[str] = None, out_dtype: Optional[str] = None, device: str = "auto",
              overwrite: bool = False, dry_run: bool = False, seed: int = 0,
              strategies: Iterable[Strategy] = (), progress: bool = True, validate: bool = True,
              allow_pickle: bool = False, allow_nonfinite: bool = False, push_to_hub: Optional[str] = None,
              private: bool = False, resume: bool = False, executor: str = "local",
              ray_address: Optional[str] = None) -> MergeResult:
    """Merge the models a spec describes into the folder ``out``.

    ``spec`` is a YAML file path, a YAML string, a dict, or a Spec. ``strategies`` adds merge methods
    that are not built in (they take precedence by name). Raises a MergeError subclass on bad input.
    With ``validate`` (the default) the written output is checked (``mergekit_lite.validate``) and the
    report is ``result.validation``; a failed validation does not raise and leaves the output in place.
    ``allow_pickle``: load local models that have only pickle weights, with torch.load(weights_only=True).
    ``allow_nonfinite``: merge inputs that hold NaN or Inf instead of refusing them.
    ``push_to_hub="org/name"`` then uploads the result (see hub_push.push_to_hub; ``private`` applies to a
    new repo), unless its validation failed; ``result.pushed`` says where it went.
    ``resume`` continues an interrupted merge of the same spec from its partial folder (resume.py);
    ``executor="ray"`` computes the shards on a Ray cluster (executors/).
    Ctrl-C raises ``errors.Interrupted`` (a KeyboardInterrupt) saying what was left behind.
    """
    started = time.perf_counter()
    if private and not push_to_hub:
        raise UsageError("--private only applies with --push-to-hub", where="--private",
                         hint="add --push-to-hub ORG/NAME, or drop --private")
    if push_to_hub:  # a missing token or offline mode fails now, not after the merge
        from .hub_push import check_push_target

        check_push_target(push_to_hub)
    out = os.fspath(out)
    try:
        shard_bytes = parse_size(max_shard_size)
    except ValueError as exc:
        raise UsageError(str(exc), where="--max-shard-size") from None
    compute_device = resolve_device(device)
    check_executor(executor, ray_address)
    strategies = list(strategies)
    merge_plan = make_plan(spec, dtype=dtype, out_dtype=out_dtype, seed=seed, strategies=strategies,
                           allow_pickle=allow_pickle, allow_nonfinite=allow_nonfinite)
    settings = settings_for(_dtype(dtype, "--dtype"), _dtype(out_dtype, "--out-dtype"), seed, compute_device)
    try:
        check_output(out, [f for c in merge_plan.checkpoints.values() for f in c.folders], overwrite)
        check_free_space(out, merge_plan.total_bytes)
        from .outfiles import check_tokenizer_files

        check_tokenizer_files(merge_plan)
        if dry_run:
            from .summary import describe_plan

            return MergeResult(out, len(merge_plan.jobs), merge_plan.total_bytes, time.perf_counter() - started,
                               dry_run=True, warnings=merge_plan.warnings,
                               summary=describe_plan(merge_plan, out, shard_bytes) +
                               (f"\nThen push to the Hub repo {push_to_hub}." if push_to_hub else ""))
        with OutputLock(out):   # held until validated: a second run cannot replace OUT under the validation
            result = _execute(merge_plan, out, shard_bytes, compute_device, progress, started, settings,
                              RunOptions(resume, executor, ray_address))
            if validate:
                from .validation import validate as validate_output

                try:
                    report = validate_output(out, merge_plan.spec, device=compute_device, strategies=strategies,
                                             allow_pickle=allow_pickle, allow_nonfinite=allow_nonfinite)
                except KeyboardInterrupt:
                    raise Interrupted(f"{out} is complete but was not validated; run `merge validate {out}`") from None
                result = dataclasses.replace(result, validation=report)
    finally:
        merge_plan.close()
    if push_to_hub:  # last: after the output was written and passed its validation
        if result.validation is not None and not result.validation.passed:
            log.warning("not pushed to %s: the validation failed (after a look at the report, "
                        "`merge push %s --repo %s` pushes it anyway)", push_to_hub, out, push_to_hub)
            return result
        from .hub_push import push_to_hub as push

        result = dataclasses.replace(result, pushed=push(result.path, push_to_hub, private=private,
                                                         progress=progress))
    return result


@dataclass(frozen=True)
class RunOptions:
    """How the shards are computed: continuing an interrupted run, and where (executors/)."""

    resume: bool = False
    executor: str = "local"
    ray_address: Optional[str] = None


def _execute(merge_plan: MergePlan, out: str, shard_bytes: int, device: torch.device, progress: bool,
             started: float, settings: RunSettings, run: RunOptions = RunOptions()) -> MergeResult:
    from .executors import open_output
    from .outfiles import write_companions
    from .progress import byte_progress

    partial = start_partial(out, keep=run.resume)
    try:
        pending = open_output(merge_plan, partial, max_shard_size=shard_bytes, device=device, resume=run.resume)
        with byte_progress(merge_plan.total_bytes, enabled=progress) as advance:
            shards = pending.write(advance, executor=run.executor, ray_address=run.ray_address)
        try:
            write_companions(merge_plan, partial, shards, name=os.path.basename(os.path.abspath(out)))
            write_run_settings(partial, settings)
        except OSError as exc:
            raise OutputError(f"cannot write {os.path.basename(exc.filename or '') or 'a file'}: {exc.strerror}",
                              file=partial, hint=f"free some disk space and run again ({LEFTOVER})") from None
        pending.finish()
    except KeyboardInterrupt:
        raise Interrupted(f"{out} was not written; the unfinished files are in {partial} ({LEFTOVER})") from None
    commit_partial(partial, out)
    seconds = time.perf_counter() - started
    log.info("merged %d tensors into %s in %.1f s", len(merge_plan.jobs), out, seconds)
    return MergeResult(os.path.abspath(out), len(merge_plan.jobs), shards.total_size, seconds, len(shards.files),
                       warnings=merge_plan.warnings, resumed_shards=len(pending.done))


def _dtype(name: Optional[str], where: str) -> Optional[torch.dtype]:
    if name is None:
        return None
    try:
        return parse_dtype(name)
    except ValueError as exc:
        raise UsageError(str(exc), where=where) from None
