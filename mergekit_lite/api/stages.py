"""Running a multi-stage file (mergekit-multi's format): each named stage into ``OUT.stages/NAME``, then the
final one into OUT, in the order the graph needs (spec/stages.py reads the documents and checks the graph).

Before any model is opened, the whole file is checked: the graph, and every stage's spec as `merge check`
checks it (method, parameter names and values, number of inputs), with the intermediates' folders in place of
their names; and no stage folder is something the tool did not write. Each stage is then an ordinary merge
(``merge_one``: api/merge.py's merge_spec) with its own output folder's life: written to ``.partial`` and
renamed when complete, its card and merge_run.json, validated. A stage folder of ours whose merge_run.json
records the same ``stage`` digest (the stage's spec, its plan from the inputs' headers, the run's settings
that change bytes, and every input file's identity as journal.py takes it: device, inode, size, times) is
kept without being read: a stage computed again gives its users new files, so they are computed again too.
``--resume`` continues the stage that was interrupted (the others have no partial folder).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from typing import TYPE_CHECKING, Any, Callable, Optional

from ..errors import MergeError, OutputError, UsageError
from ..output.ownership import not_our_output
from ..output.place import NOT_OURS
from ..output.run_settings import read_run_settings
from ..spec.schema import Spec
from ..spec.stages import Stage, in_document, read_stages, stage_spec
from ..strategy import Strategy

if TYPE_CHECKING:
    from .merge import MergeResult, MergeSettings

log = logging.getLogger("mergekit_lite")
STAGE_NOT_OURS = ("move your files out of that folder, or give the stages another folder with --intermediate-dir "
                  "(a stage replaces only its own earlier output)")


def run_stages(source: tuple[str, Optional[str]], out: str, run: "MergeSettings", strategies: list[Strategy], *,
               merge_one: Callable[..., "MergeResult"], result: type) -> "MergeResult":
    """Run every stage of the multi-stage file ``source`` (text, file) and return the final stage's result,
    with ``stages``: one line per stage. ``result`` is the MergeResult class (for a kept final stage)."""
    started = time.perf_counter()
    text, file = source
    stages = read_stages(text, file)
    folders = stage_folders(stages, out, run.intermediate_dir)
    specs = [_checked(stage, folders, file, strategies) for stage in stages]
    if run.fuse or run.dry_run:
        from .fused import dry_run_stages, fused_lines, run_fused

        if run.dry_run:   # every stage planned from headers, later ones from the earlier stages' plans
            return dry_run_stages(stages, specs, folders, out, run, strategies, merge_one)
        done = run_fused(stages, specs, folders, text, out, run, strategies, merge_one)
        return dataclasses.replace(done, stages=fused_lines(stages, folders, done))
    _check_places(stages, folders, file, out)
    lines: list[str] = []
    final: Optional["MergeResult"] = None
    for stage, spec in zip(stages, specs):
        target = out if stage.name is None else folders[stage.name]
        with in_document(stage, file):
            stage_run = _settings_for(stage, run, os.path.dirname(os.path.abspath(target)))
            digest, tensors, size = stage_digest(spec, stage_run, strategies)
            if _up_to_date(target, digest) and not (stage.name is None and run.push_to_hub):
                lines.append(f"stage {_title(stage)}: {target} is up to date (same stage spec and inputs), kept")
                log.info("%s", lines[-1])
                final = result(os.path.abspath(target), tensors, size, 0.0)
                continue
            done = merge_one(spec, target, stage_run, strategies, digest, text if stage.name is None else None)
            lines.append(f"stage {_title(stage)}: " + str(done))
            log.info("%s", lines[-1])
            final = done
    assert final is not None
    return dataclasses.replace(final, stages=tuple(lines), seconds=time.perf_counter() - started)


def stage_folders(stages: list[Stage], out: str, intermediate_dir: Optional[str]) -> dict[str, str]:
    """Where each named stage is written: ``OUT.stages/NAME`` (or ``--intermediate-dir``/NAME), never inside
    OUT or OUT.partial (replaced by the final stage)."""
    if not out:
        raise UsageError("the output path is empty", where="out", hint="give the path of a new folder, e.g. -o merged")
    base = intermediate_dir if intermediate_dir is not None else out.rstrip("/" + os.sep) + ".stages"
    where = "intermediate_dir" if intermediate_dir is not None else "out"
    real, target = os.path.realpath(base), os.path.realpath(out)
    for folder in (target, target + ".partial"):
        if real == folder or real.startswith(folder + os.sep):
            raise UsageError(f"the stages' folder {base} and the output {out} are inside one another", where=where,
                             hint="give --intermediate-dir a folder beside the output, e.g. the default OUT.stages")
    if os.path.lexists(base) and not os.path.isdir(base):
        raise UsageError(f"the stages' folder {base} exists and is not a folder", where=where,
                         hint="move it away, or give another --intermediate-dir")
    folders = {s.name: os.path.join(base, s.name) for s in stages if s.name is not None}
    for name, folder in folders.items():
        if os.path.realpath(folder) == target:
            raise UsageError(f"stage '{name}' would be written to the output {out}", where=where,
                             hint="give --intermediate-dir another folder")
    return folders


def _checked(stage: Stage, folders: dict[str, str], file: Optional[str], strategies: list[Strategy]) -> Spec:
    """The stage's spec, checked as `merge check` does (no model opened)."""
    from ..plan.planner import check_spec

    with in_document(stage, file):
        spec = stage_spec(stage, folders, file)
        for warning in check_spec(spec, strategies):
            log.warning("%s: %s", stage.label(file), warning)
    return spec


def _check_places(stages: list[Stage], folders: dict[str, str], file: Optional[str], out: str) -> None:
    """No stage folder, nor OUT, holds something the tool did not write: found now, not after the stages
    before it ran (the rest of OUT's checks come with the final stage, as for any merge)."""
    if os.path.isdir(out) and not os.path.islink(out) and os.listdir(out) and not_our_output(out) is not None:
        raise UsageError(f"{not_our_output(out)}, so a merge never replaces it", file=out, hint=NOT_OURS)
    for stage in stages:
        folder = folders.get(stage.name) if stage.name is not None else None
        if folder is None or not os.path.lexists(folder):
            continue
        if os.path.islink(folder) or not os.path.isdir(folder):
            problem = "it is a symbolic link" if os.path.islink(folder) else "it is not a folder"
        else:
            problem = not_our_output(folder) if os.listdir(folder) else None
        if problem:
            raise UsageError(f"stage '{stage.name}' is written to {folder}, but {problem}, so a merge never replaces "
                             "it", file=stage.label(file), where="name", hint=STAGE_NOT_OURS)


def _settings_for(stage: Stage, run: "MergeSettings", parent: str) -> "MergeSettings":
    """The final stage runs with the user's settings, an intermediate one with intermediate_settings (its
    parent folder made first)."""
    from .fused import intermediate_settings

    if stage.name is None:
        return run
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the stages' folder: {exc.strerror}", file=parent,
                          hint="check that its parent folder exists and is writable") from None
    return intermediate_settings(run)


def stage_digest(spec: Spec, run: "MergeSettings", strategies: list[Strategy]) -> tuple[str, int, int]:
    """(digest, tensors, bytes) of a stage: its spec, its plan from the inputs' headers (journal.fingerprint),
    the settings that change its files, and the identity of every input file. Reads headers only."""
    from ..engine.devices import resolve_device
    from ..output.journal import fingerprint, input_identity
    from ..plan.planner import make_plan
    from ..plan.shards import output_layout
    from ..units import parse_size

    try:
        shard_bytes = parse_size(run.max_shard_size)
    except ValueError as exc:
        raise UsageError(str(exc), where="max_shard_size") from None
    plan = make_plan(spec, dtype=run.dtype, out_dtype=run.out_dtype, seed=run.seed, strategies=strategies,
                     allow_pickle=run.allow_pickle, allow_nonfinite=run.allow_nonfinite, config_from=run.config_from)
    try:
        content: dict[str, Any] = {
            "spec": spec.raw, "plan": fingerprint(plan, output_layout(plan, shard_bytes), resolve_device(run.device)),
            "inputs": input_identity(plan), "files": [run.copy_tokenizer, run.write_model_card, run.trust_remote_code,
                                                      run.allow_crimes]}
        text = json.dumps(content, sort_keys=True, default=repr)
        return hashlib.sha256(text.encode()).hexdigest(), len(plan.jobs), plan.total_bytes
    finally:
        plan.close()


def _up_to_date(folder: str, digest: str) -> bool:
    """``folder`` is a complete output of ours recording this stage digest."""
    if not os.path.isdir(folder) or os.path.islink(folder) or not_our_output(folder) is not None:
        return False
    try:
        recorded = read_run_settings(folder)
    except MergeError:
        return False
    return recorded is not None and recorded.stage == digest


def _title(stage: Stage) -> str:
    return f"'{stage.name}'" if stage.name is not None else "final"
