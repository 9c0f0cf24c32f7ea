"""``merge run FILE OUT --fuse``: a multi-stage file in one pass over the original inputs, no stage written.

Each named stage is planned from its inputs' headers, in order, and becomes a ``StageCheckpoint``
(plan/stages.py) for the stages after it: reading one of its tensors computes it in memory by the merge
loop's own pieces and paths (engine/loop.py: compute_whole), in the dtype the stage would have written. The
final stage is then an ordinary merge into OUT, so its bytes are those of the staged run. Not validated by
recomputation: `merge validate` rebuilds an output from its spec's inputs, and a fused output's intermediate
models were never written (run without --fuse to have them, and the same bytes).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Callable

from ..errors import UsageError
from ..plan.planner import dtype_setting, plan_merge
from ..plan.stages import StageCheckpoint, fuse_refusal
from ..sources.checkpoint import Checkpoint
from ..spec.references import ModelRef
from ..spec.schema import Spec
from ..spec.stages import Stage, in_document
from ..strategy import Strategy

if TYPE_CHECKING:
    from .merge import MergeResult, MergeSettings

log = logging.getLogger("mergekit_lite")
STAGED = "run without --fuse: each named stage is written to its folder, and a rerun keeps those that are up to date"
NOT_VALIDATED = ("not validated by recomputation: the intermediate stages of a fused run were never written; "
                 "the staged run (without --fuse) writes the same bytes and can be validated")


def run_fused(stages: list[Stage], specs: list[Spec], folders: dict[str, str], text: str, out: str,
              run: "MergeSettings", strategies: list[Strategy], merge_one: Callable[..., "MergeResult"]
              ) -> "MergeResult":
    """The final stage of ``stages`` (in order, with their rewritten ``specs``) into ``out``, fused."""
    from ..engine.devices import resolve_device
    from ..engine.loop import compute_whole

    named = [(s.name, spec, tuple(s.uses)) for s, spec in zip(stages, specs)]
    reason = fuse_refusal(named, set(folders.values()), strategies)
    if reason is None and run.executor != "local":
        reason = "the stages are computed in this process (--executor local)"
    if reason is None and run.resume:
        reason = "a fused run has no finished stage to resume from; --resume continues the final stage only when " \
                 "the stages are written"
    if reason is not None:
        raise UsageError(f"--fuse cannot run this file: {reason}", where="fuse", hint=STAGED)
    device = resolve_device(run.device)

    def compute(plan, job):
        return compute_whole(plan, job, device)

    by_folder = {folder: name for name, folder in folders.items()}
    made: dict[str, StageCheckpoint] = {}
    try:
        for stage, spec in zip(stages[:-1], specs[:-1]):
            with in_document(stage, spec.file):
                plan = _plan(spec, run, strategies, _provided(spec, by_folder, made), final=False)
            made[stage.name] = StageCheckpoint.of(stage.name, folders[stage.name], plan, compute)
        with in_document(stages[-1], specs[-1].file):
            final = _plan(specs[-1], run, strategies, _provided(specs[-1], by_folder, made), final=True)
    except BaseException:
        for checkpoint in made.values():
            checkpoint.close()
        raise
    log.warning("%s", NOT_VALIDATED)
    result = merge_one(specs[-1], out, dataclasses.replace(run, validate=False), strategies, None, text, plan=final)
    return dataclasses.replace(result, warnings=[*result.warnings, NOT_VALIDATED])


def dry_run_stages(stages: list[Stage], specs: list[Spec], folders: dict[str, str], out: str,
                   run: "MergeSettings", strategies: list[Strategy], merge_one: Callable[..., "MergeResult"]
                   ) -> "MergeResult":
    """``--dry-run`` of a multi-stage file: each stage planned from its inputs' headers, a later stage from
    the plans of the stages it uses (StageCheckpoints that are never read), and checked as `merge run
    --dry-run` checks a spec. The result is the final stage's, its summary every stage's."""
    by_folder = {folder: name for name, folder in folders.items()}
    made: dict[str, StageCheckpoint] = {}
    lines, summaries = [], []
    for stage, spec in zip(stages, specs):
        final = stage.name is None
        stage_run = run if final else intermediate_settings(run)
        with in_document(stage, spec.file):
            plan = _plan(spec, stage_run, strategies, _provided(spec, by_folder, made), final=final)
            if not final:
                made[stage.name] = StageCheckpoint.of(stage.name, folders[stage.name], plan, _never_read)
            done = merge_one(spec, out if final else folders[stage.name], stage_run, strategies, plan=plan)
        lines.append(f"stage {repr(stage.name) if not final else 'final'}: {done}")
        summaries.append(f"{lines[-1]}\n{done.summary}")
    return dataclasses.replace(done, stages=tuple(lines), summary="\n\n".join(summaries))


def intermediate_settings(run: "MergeSettings") -> "MergeSettings":
    """An intermediate stage runs with the user's settings, except that it replaces only its own earlier
    output (--overwrite: a folder of someone else's is still refused), is not pushed (nor are the push's
    card settings applied), and takes the model's config by the default rule (--config-from names a model
    of the final stage)."""
    resets = {"overwrite": True, "push_to_hub": None, "private": False, "config_from": None, "license": None,
              "base_models": (), "intermediate_dir": None}
    names = {f.name for f in dataclasses.fields(run)}
    return dataclasses.replace(run, **{key: value for key, value in resets.items() if key in names})


def _never_read(plan, job):
    raise AssertionError("a dry run reads no tensor")


def _provided(spec: Spec, by_folder: dict[str, str], made: dict[str, StageCheckpoint]) -> dict[ModelRef, Checkpoint]:
    """The spec's references to stages, each with its StageCheckpoint."""
    return {ref: made[by_folder[ref.model.path]] for ref, _ in spec.references() if ref.model.path in by_folder}


def _plan(spec: Spec, run: "MergeSettings", strategies: list[Strategy], provided: dict[ModelRef, Checkpoint],
          final: bool):
    return plan_merge(spec, strategies=strategies, dtype=dtype_setting(run.dtype, "dtype"),
                      out_dtype=dtype_setting(run.out_dtype, "out_dtype"), seed=run.seed,
                      allow_pickle=run.allow_pickle, allow_nonfinite=run.allow_nonfinite,
                      config_from=run.config_from if final else None, provided=provided)


def fused_lines(stages: list[Stage], folders: dict[str, str], result: "MergeResult") -> tuple[str, ...]:
    """One line per stage: the named ones computed in memory, the final one as merged."""
    named = [f"stage '{s.name}': fused (computed in memory as the final stage needed it; {folders[s.name]} not "
             "written)" for s in stages if s.name is not None]
    return (*named, f"stage final: {result}")

