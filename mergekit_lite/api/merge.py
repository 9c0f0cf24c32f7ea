"""The library entry points: ``load_spec`` and ``run_merge``, for notebooks and scripts."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Optional, Union

import torch

from ..engine.devices import resolve_device
from ..engine.executors import check_executor
from ..errors import Interrupted, ModelError, OutputError, UsageError
from ..output.companions import check_tokenizer_files, write_companions
from ..output.folder import LEFTOVER, OutputLock, check_free_space
from ..output.journal import fingerprint
from ..output.place import Place, check_path, check_place, commit_partial, start_partial
from ..output.remote_code import remote_code_files
from ..output.run_settings import settings_for, write_run_settings
from ..plan.planner import MergePlan, dtype_setting, make_plan
from ..spec.schema import SpecLike, load_spec
from ..strategy import Strategy
from ..units import parse_size
from .failed import ValidationFailed  # noqa: F401  (run_merge raises it; kept importable from here)

if TYPE_CHECKING:
    from ..hub.push import PushResult
    from ..validation import ValidationReport

log = logging.getLogger("mergekit_lite")


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
    stages: tuple[str, ...] = ()   # a multi-stage file: one line per stage, what it did (merged, kept)

    def __str__(self) -> str:
        from ..units import format_size

        if self.dry_run:
            return f"Would write {self.tensors} tensors ({format_size(self.bytes)}) to {self.path}."
        resumed = f"; {self.resumed_shards} kept from the interrupted run" if self.resumed_shards else ""
        return (f"Merged {self.tensors} tensors ({format_size(self.bytes)}, {self.shards} shard(s){resumed}) into "
                f"{self.path} in {self.seconds:.1f} s.")

    def __repr__(self) -> str:
        from ..units import format_size

        verdict = "not validated" if self.validation is None else f"validation {self.validation.status}"
        if self.dry_run:
            return f"<MergeResult dry run: {self.tensors} tensors ({format_size(self.bytes)}) to {self.path!r}>"
        pushed = f", pushed to {self.pushed.repo_id}" if self.pushed is not None else ""
        return (f"<MergeResult {self.tensors} tensors ({format_size(self.bytes)}, {self.shards} shard(s)) in "
                f"{self.path!r}, {verdict}{pushed}>")

    def _repr_html_(self) -> str:
        """Jupyter: a small table; the dry run's plan and the validation's checks in full."""
        from html import escape

        from ..units import format_size

        rows = [("output", self.path), ("tensors", self.tensors), ("size", format_size(self.bytes)),
                ("shards", self.shards if not self.dry_run else None), ("seconds", f"{self.seconds:.1f}"),
                ("validation", None if self.dry_run else
                 self.validation.status if self.validation is not None else "not validated"),
                ("pushed to", self.pushed.url if self.pushed is not None else None),
                *[("warning", w) for w in self.warnings]]
        table = "".join(f"<tr><th>{key}</th><td style='text-align:left'>{escape(str(value))}</td></tr>"
                        for key, value in rows if value is not None)
        title = "Dry run: nothing was written" if self.dry_run else "Merge result"
        html = f"<p><b>{title}</b></p><table>{table}</table>"
        if self.summary:
            html += f"<pre>{escape(self.summary)}</pre>"
        if self.validation is not None:
            html += self.validation._repr_html_()
        return html


@dataclass(frozen=True)
class MergeSettings:
    """How a merge runs, beyond what the spec says: one field per ``merge run`` option.

    ``allow_pickle``: load local models that have only pickle weights, with torch.load(weights_only=True).
    ``allow_nonfinite``: merge inputs that hold NaN or Inf instead of refusing them.
    ``push_to_hub="org/name"`` then uploads the result (``private`` applies to a new repo), unless its
    validation failed; ``license`` (a Hub license id) and ``base_models`` (Hub ids the merge comes from, for a
    merge of local folders) go into the pushed card's front matter, as `merge push --license --base-model` does.
    ``resume`` continues an interrupted merge of the same spec from its partial folder;
    ``executor="ray"`` computes the shards on a Ray cluster (``ray_address``; default: a local one).
    mergekit's options: ``copy_tokenizer``/``write_model_card`` (False: no tokenizer files / no README.md),
    ``allow_crimes`` (merge models whose config.json name different ``architectures``, with a warning; shapes
    are still checked), ``trust_remote_code`` (copy the code files config.json's ``auto_map`` names into the
    output), ``num_threads`` (merging threads; default one per core).
    """

    max_shard_size: Union[str, int] = "5GB"
    dtype: Optional[str] = None          # the precision to merge in (None: the spec's)
    out_dtype: Optional[str] = None      # the precision to write (None: the spec's)
    device: str = "auto"
    seed: int = 0
    overwrite: bool = False             # replace an earlier merge's output at OUT (never a folder of other files)
    dry_run: bool = False
    progress: bool = True               # False: no progress bar at all, huggingface_hub's download bars included
    validate: bool = True
    allow_pickle: bool = False
    allow_nonfinite: bool = False
    push_to_hub: Optional[str] = None
    private: bool = False
    license: Optional[str] = None        # with push_to_hub: the pushed card's license (a Hub license id)
    base_models: tuple[str, ...] = ()    # with push_to_hub: Hub ids added to the pushed card's base_model
    resume: bool = False
    executor: str = "local"
    ray_address: Optional[str] = None
    config_from: Optional[str] = None    # the model whose config.json the output takes (plan/configs.py)
    copy_tokenizer: bool = True
    write_model_card: bool = True
    allow_crimes: bool = False
    trust_remote_code: bool = False
    num_threads: Optional[int] = None
    strict: bool = True                 # a failed validation raises ValidationFailed; False: warns and returns
    intermediate_dir: Optional[str] = None   # multi-stage files: where named stages go (default OUT.stages)
    fuse: bool = False                  # multi-stage files: one pass, no intermediate written (api/stages.py)


def run_merge(spec: SpecLike, out: Union[str, os.PathLike], settings: Optional[MergeSettings] = None, *,
              strategies: Iterable[Strategy] = (), **changes: Any) -> MergeResult:
    """Merge the models a spec describes into the folder ``out``.

    ``spec`` is a YAML file path, a YAML string, a dict, or a Spec. ``settings`` (a MergeSettings) says how;
    keyword arguments change single fields (``run_merge(spec, out, overwrite=True)``). ``strategies`` adds
    merge methods that are not built in (they take precedence by name). Raises a MergeError subclass on bad
    input. With ``validate`` (the default) the written output is checked (``mergekit_lite.validate``) and the
    report is ``result.validation`` (``.status``: passed, failed or not_checked). A failed validation raises
    ValidationFailed (``.report``, ``.result``; nothing is pushed), or with ``strict=False`` warns and returns;
    either way the output stays in place. A not checked validation never raises.
    ``result.pushed`` says where a push went. Ctrl-C raises ``errors.Interrupted`` (a KeyboardInterrupt)
    saying what was left behind. A multi-stage file (mergekit-multi's, several YAML documents) runs its
    stages in order (api/stages.py): ``result`` is the final stage's, ``result.stages`` says what each did.
    """
    from contextlib import nullcontext

    from ..hub.client import quiet_hub
    from ..spec.stages import multi_stage_source
    from .stages import run_stages

    run = dataclasses.replace(settings or MergeSettings(), **changes)
    with quiet_hub(True) if not run.progress else nullcontext():   # no huggingface_hub bar either (downloads)
        source = multi_stage_source(spec)   # refuses a mergekit-moe file
        if source is not None:
            _check_settings(run)   # the final stage's settings (a push's token, ...), before any stage runs
            return run_stages(source, os.fspath(out), run, list(strategies), merge_one=merge_spec,
                              result=MergeResult)
        if run.intermediate_dir is not None or run.fuse:
            raise UsageError("--intermediate-dir and --fuse apply to multi-stage files only (several YAML "
                             "documents)", where="intermediate_dir" if run.intermediate_dir is not None else "fuse",
                             hint="drop the option, or give a multi-stage file")
        return merge_spec(spec, out, run, list(strategies))


def merge_spec(spec: SpecLike, out: Union[str, os.PathLike], run: MergeSettings, strategies: list[Strategy],
               stage_digest: Optional[str] = None, recipe: Optional[str] = None,
               plan: Optional[MergePlan] = None) -> MergeResult:
    """run_merge of one spec. ``stage_digest`` (a stage of a multi-stage file) goes into merge_run.json,
    ``recipe`` (the whole multi-stage file) onto the card; ``plan``: the spec already planned (a fused run)."""
    started = time.perf_counter()
    out = os.fspath(out)
    spec = load_spec(spec)
    if spec.raw.get("output") == "adapter":   # base+adapter inputs combined into one adapter (docs/adapters.md)
        from .adapter_spec import run_adapter_spec

        return run_adapter_spec(spec, out, run, MergeResult)
    shard_bytes, device = _check_settings(run)
    merge_plan = plan if plan is not None else make_plan(
        spec, dtype=run.dtype, out_dtype=run.out_dtype, seed=run.seed, strategies=strategies,
        allow_pickle=run.allow_pickle, allow_nonfinite=run.allow_nonfinite, config_from=run.config_from)
    log.info("%s of %d model(s): %d tensors (%s) on %s, merged in %s, written as %s, shards of at most %s, "
             "seed %d%s", merge_plan.strategy.name, len(merge_plan.checkpoints), len(merge_plan.jobs),
             _size(merge_plan.total_bytes), device, run.dtype or "the spec's dtype",
             run.out_dtype or "the spec's out_dtype", _size(shard_bytes), run.seed,
             f", {run.num_threads} merging thread(s)" if run.num_threads else "")
    try:
        check_architectures(merge_plan, run.allow_crimes)
        code_files = remote_code_files(merge_plan, run.trust_remote_code)
        check_path(out)   # before a lock file is made next to it
        check_free_space(out, merge_plan.total_bytes)
        if run.copy_tokenizer:
            check_tokenizer_files(merge_plan)
        if run.dry_run:
            _check_place(merge_plan, out, shard_bytes, device, run)
            return _dry_run(merge_plan, out, shard_bytes, run, started)
        with OutputLock(out):   # held until validated: a second run cannot replace OUT under the validation
            place = _check_place(merge_plan, out, shard_bytes, device, run)   # under the lock: no other run moves
            warming = _warm(merge_plan) if run.validate else None
            result = _execute(merge_plan, place, shard_bytes, device, started, run, code_files,
                              (stage_digest, recipe))
            if warming is not None:
                warming.wait()
                result = dataclasses.replace(result, validation=_validate(merge_plan, out, device, strategies, run))
    finally:
        merge_plan.close()
    if result.validation is not None and result.validation.failed:
        return _failed(result, out, run)
    return _push(result, out, run) if run.push_to_hub else result


def _failed(result: MergeResult, out: str, run: MergeSettings) -> MergeResult:
    """A validation that failed stops the push, and raises ValidationFailed (``strict=False``: warns)."""
    if run.push_to_hub:
        log.warning("not pushed to %s: the validation failed (after a look at the report, "
                    "`merge push %s --repo %s` pushes it anyway)", run.push_to_hub, out, run.push_to_hub)
    if run.strict:
        raise ValidationFailed(result, run.push_to_hub)
    warnings.warn(f"the validation of {result.path} failed: {result.validation.verdict()}", stacklevel=3)
    return result


def _check_settings(run: MergeSettings) -> tuple[int, torch.device]:
    """What can be wrong with the settings alone, before any input is opened: the shard size and device."""
    if run.private and not run.push_to_hub:
        raise UsageError("--private only applies with --push-to-hub", where="private",
                         hint="add --push-to-hub ORG/NAME, or drop --private")
    _check_card_settings(run)
    if run.push_to_hub:  # a missing token or offline mode fails now, not after the merge
        from ..hub.push import check_push_target

        check_push_target(run.push_to_hub, where="push_to_hub")
    try:
        shard_bytes = parse_size(run.max_shard_size)
    except ValueError as exc:
        raise UsageError(str(exc), where="max_shard_size") from None
    if run.num_threads is not None and (isinstance(run.num_threads, bool) or not isinstance(run.num_threads, int)
                                        or run.num_threads < 1):
        raise UsageError(f"{run.num_threads!r} is not a number of threads", where="num_threads",
                         hint="give a whole number of at least 1, e.g. -j 4")
    device = resolve_device(run.device)
    check_executor(run.executor, run.ray_address)
    return shard_bytes, device


def _check_card_settings(run: MergeSettings) -> None:
    """license / base_models: what `merge push` checks, before the merge instead of after it."""
    if not run.license and not run.base_models:
        return
    given = "license" if run.license else "base_models"
    if not run.push_to_hub:
        raise UsageError(f"{'--license' if run.license else '--base-model'} only applies with --push-to-hub",
                         where=given, hint="add --push-to-hub ORG/NAME, or `merge push OUT --repo ORG/NAME` "
                                           "with it later")
    if not run.write_model_card:
        raise UsageError("there would be no README.md (model card) to write the license or base models into",
                         where=given, hint="drop --no-write-model-card")
    from ..hub.push_plan import check_card_options

    if isinstance(run.base_models, str):
        raise UsageError(f"base_models={run.base_models!r} is one string", where="base_models",
                         hint="give a list of Hub ids: base_models=['org/name']")
    check_card_options(run.license, run.base_models)


def _size(size: int) -> str:
    from ..units import format_size

    return format_size(size)


def check_architectures(merge_plan: MergePlan, allow_crimes: bool) -> None:
    """Models whose config.json name different ``architectures`` are refused, as mergekit does, unless
    ``allow_crimes`` (its --allow-crimes): then a warning, and the planner's checks still hold (every merged
    tensor's shape agrees, the behaviour keys of plan/configs.py agree or --config-from chose)."""
    from ..plan.configs import merged_models

    found: dict[tuple[str, ...], list[str]] = {}
    for ref in merged_models(merge_plan.spec, merge_plan.checkpoints):
        checkpoint = merge_plan.checkpoints[ref]
        names = checkpoint.config.get("architectures") if isinstance(checkpoint.config, dict) else None
        if isinstance(names, list) and names:
            found.setdefault(tuple(str(name) for name in names), []).append(checkpoint.label)
    if len(found) < 2:
        return
    described = "; ".join(f"{', '.join(names)} ({', '.join(labels)})" for names, labels in found.items())
    if not allow_crimes:
        raise ModelError(f"the models' config.json name different architectures: {described}",
                         file=merge_plan.spec.file,
                         hint="merge models of one architecture; to mix them anyway (mergekit's crime), add "
                              "--allow-crimes (allow_crimes=True): tensor shapes are still checked")
    message = (f"mixing architectures (--allow-crimes): {described}; the output's config.json names "
               f"{', '.join(merge_plan.config.get('architectures') or ['?'])}. Still checked: every merged tensor's "
               "name and shape, and the config settings that change what the model computes")
    merge_plan.warnings.append(message)
    log.warning("%s", message)


def _check_place(merge_plan: MergePlan, out: str, shard_bytes: int, device: torch.device,
                 run: MergeSettings) -> Place:
    """Before any tensor is read: what is at OUT and OUT.partial, and that nothing there is lost (output/place.py)."""
    from ..plan.shards import output_layout

    merge = fingerprint(merge_plan, output_layout(merge_plan, shard_bytes), device)
    inputs = [folder for checkpoint in merge_plan.checkpoints.values() for folder in checkpoint.folders]
    return check_place(out, inputs, merge_plan.spec.file, merge, overwrite=run.overwrite, resume=run.resume)


def _dry_run(merge_plan: MergePlan, out: str, shard_bytes: int, run: MergeSettings, started: float) -> MergeResult:
    from ..plan.describe import describe_plan

    then = f"\nThen push to the Hub repo {run.push_to_hub}." if run.push_to_hub else ""
    return MergeResult(out, len(merge_plan.jobs), merge_plan.total_bytes, time.perf_counter() - started,
                       dry_run=True, warnings=merge_plan.warnings,
                       summary=describe_plan(merge_plan, out, shard_bytes) + then)


def _warm(merge_plan: MergePlan):
    """The forward check's imports, started in a thread while the merge writes (validation/warm.py)."""
    from ..validation.warm import start

    adapters = any(getattr(checkpoint, "adapters", None) for checkpoint in merge_plan.checkpoints.values())
    return start(merge_plan.config, adapters)


def _validate(merge_plan: MergePlan, out: str, device: torch.device, strategies: list[Strategy],
              run: MergeSettings) -> "ValidationReport":
    from ..validation import validate as validate_output

    try:   # trust_remote_code: the forward check may run the code files copied into the output
        return validate_output(out, merge_plan.spec, device=device, strategies=strategies,
                               allow_pickle=run.allow_pickle, allow_nonfinite=run.allow_nonfinite,
                               progress=run.progress, trust_remote_code=run.trust_remote_code,
                               context_inputs=False)   # inputs' losses: `merge validate`
    except KeyboardInterrupt:
        raise Interrupted(f"{out} is complete but was not validated; run `merge validate {out}`") from None


def _push(result: MergeResult, out: str, run: MergeSettings) -> MergeResult:
    """Last: after the output was written and its validation found nothing wrong (a failed one stops the push:
    _failed). One that could not check everything (NOT CHECKED: no transformers for the forward pass, say)
    does not, since what it checked passed, but the log says what went unchecked."""
    if result.validation is not None and not result.validation.passed:
        log.warning("pushing to %s though the validation could not check everything: %s", run.push_to_hub,
                    "; ".join(f"{c.name}: {c.summary}" for c in result.validation.unchecked))
    from ..hub.push import push_to_hub as push

    return dataclasses.replace(result, pushed=push(result.path, run.push_to_hub, private=run.private,
                                                   progress=run.progress, license=run.license,
                                                   base_models=run.base_models))


def _execute(merge_plan: MergePlan, place: Place, shard_bytes: int, device: torch.device, started: float,
             run: MergeSettings, code_files: list[tuple[str, str]],
             stage: tuple[Optional[str], Optional[str]] = (None, None)) -> MergeResult:
    from ..engine.executors import open_output
    from ..engine.progress import byte_progress

    out = place.out
    partial = start_partial(place, merge_plan.spec.file, resume=run.resume)
    try:
        pending = open_output(merge_plan, partial, max_shard_size=shard_bytes, device=device, resume=run.resume)
        with byte_progress(merge_plan.total_bytes, enabled=run.progress) as advance:
            shards = pending.write(advance, executor=run.executor, ray_address=run.ray_address,
                                   threads=run.num_threads)
        try:
            write_companions(merge_plan, partial, shards, name=os.path.basename(os.path.abspath(out)),
                             tokenizer=run.copy_tokenizer, card=run.write_model_card, code_files=code_files,
                             recipe=stage[1])
            write_run_settings(partial, settings_for(dtype_setting(run.dtype, "dtype"),
                                                     dtype_setting(run.out_dtype, "out_dtype"), run.seed, device,
                                                     config_from=merge_plan.config_from, stage=stage[0]))
        except OSError as exc:
            raise OutputError(f"cannot write {os.path.basename(exc.filename or '') or 'a file'}: {exc.strerror}",
                              file=partial, hint=f"free some disk space and run again ({LEFTOVER})") from None
        pending.finish()
    except KeyboardInterrupt:
        raise Interrupted(f"{out} was not written; the unfinished files are in {partial} ({LEFTOVER})") from None
    commit_partial(place)
    seconds = time.perf_counter() - started
    log.info("merged %d tensors into %s in %.1f s", len(merge_plan.jobs), out, seconds)
    return MergeResult(os.path.abspath(out), len(merge_plan.jobs), shards.total_size, seconds, len(shards.files),
                       warnings=merge_plan.warnings, resumed_shards=len(pending.done))


