"""What validation knows about how an output was made: its merge record, and where its sources are.

The merge record is the output's ``mergekit_config.yml`` (the spec) and ``merge_run.json`` (the settings the
spec does not hold). A folder with neither is a plain model folder, no merge: recompute does not apply to it.

`merge run` resolves a relative model path in the spec against the folder it runs in, and merge_run.json
records that folder (``working_dir``). `merge validate` may run anywhere, so every relative local path of the
output's own spec is made absolute against the recorded folder before the plan is made. A record without
it (an older run, or mergekit's output) falls back to the current folder, else the output's parent folder,
whichever holds more of the sources, and says which. A spec passed explicitly (``--spec``, or the spec
`merge run` just merged) is the caller's: its relative paths mean what they mean in the current folder.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

from ..errors import MergeError, ModelError
from ..output.run_settings import RUN_SETTINGS_FILE, RunSettings, read_run_settings
from ..spec.references import REPO_ID, ModelPath
from ..spec.schema import Spec, load_spec
from .report import Finding

SPEC_FILE = "mergekit_config.yml"
RECORDED = "the folder `merge run` ran in, from merge_run.json"
NO_MERGE = (f"no merge record (no {SPEC_FILE} or {RUN_SETTINGS_FILE}): the tensors were not compared with a "
            "merge; give --spec to compare them")
MOE = ("a mixture of experts (merge moe): its tensors are copied from the experts and its routers computed from "
       "prompts, not merged, so there is nothing to recompute")


@dataclass
class MergeRecord:
    settings: RunSettings
    spec: Optional[Spec]
    spec_label: Optional[str]                   # where the spec came from: a file, "given", or None
    problem: Optional[str] = None               # why a merge record has no usable spec
    is_merge: bool = True                       # a spec was given, or the folder holds a merge record
    findings: list[Finding] = field(default_factory=list)
    sources_from: Optional[dict[str, str]] = None   # {folder, reason} when the spec has relative local paths
    other_tool: Optional[str] = None            # the output was written by another tool ("mergekit"), not us
    moe: bool = False                           # the spec is a mixture of experts (merge moe): nothing to recompute


def read_record(folder: str, spec: Union[str, os.PathLike, dict, Spec, None]) -> MergeRecord:
    """The merge record of the output ``folder`` (absolute). An explicit ``spec`` must load (its MergeError
    propagates); the output's own may not (a mergekit output can use keys this tool refuses), which leaves
    recompute not checked, with the reason."""
    settings, findings = _settings(folder)
    has_settings = os.path.exists(os.path.join(folder, RUN_SETTINGS_FILE))
    record = _read_record(folder, spec, settings, findings, has_settings)
    record.other_tool = _other_tool(folder, settings, has_settings)
    return record


def _other_tool(folder: str, settings: RunSettings, has_settings: bool) -> Optional[str]:
    """Who wrote the output, when it was not this tool: merge_run.json's ``tool``, or "mergekit" for a folder
    with mergekit's record (its mergekit_config.yml) and none of ours."""
    if has_settings:
        return settings.tool if settings.tool != RunSettings.tool else None
    return "mergekit" if os.path.exists(os.path.join(folder, SPEC_FILE)) else None


def _read_record(folder: str, spec: Union[str, os.PathLike, dict, Spec, None], settings: RunSettings,
                 findings: list[Finding], has_settings: bool) -> MergeRecord:
    if spec is not None:
        loaded = load_spec(spec)
        return MergeRecord(settings, loaded, loaded.file or "given", findings=findings,
                           sources_from=_given_sources(loaded))
    path = os.path.join(folder, SPEC_FILE)
    if not os.path.exists(path):
        if not has_settings:
            return MergeRecord(settings, None, None, is_merge=False, findings=findings)
        return MergeRecord(settings, None, None, f"the output has no {SPEC_FILE}; pass the spec it was merged "
                           "from (--spec)", findings=findings)
    try:
        loaded = load_spec(path)
    except MergeError as exc:
        moe = _is_moe(path)
        return MergeRecord(settings, None, path, MOE if moe else f"cannot read {SPEC_FILE}: {exc.what}",
                           findings=findings, moe=moe)
    base, reason = _sources_folder(loaded, folder, settings.working_dir, has_settings)
    if base is None:
        return MergeRecord(settings, loaded, path, findings=findings)
    return MergeRecord(settings, rebase(loaded, base), path, findings=findings,
                       sources_from={"folder": base, "reason": reason})


def _is_moe(path: str) -> bool:
    """Whether the output's spec is a mixture of experts (`merge moe`), which is no merge spec."""
    from ..spec.moe import is_moe
    from ..spec.safe_yaml import load_yaml, read_spec_file

    try:
        return is_moe(load_yaml(read_spec_file(path), path))
    except MergeError:
        return False


def _settings(folder: str) -> tuple[RunSettings, list[Finding]]:
    try:
        return read_run_settings(folder) or RunSettings(), []
    except ModelError as exc:
        return RunSettings(), [Finding(exc.what, file=RUN_SETTINGS_FILE)]


def _given_sources(spec: Spec) -> Optional[dict[str, str]]:
    if not relative_paths(spec, (os.getcwd(),)):
        return None
    return {"folder": os.getcwd(), "reason": "the current folder, as `merge run` would resolve the given spec"}


def _sources_folder(spec: Spec, out: str, recorded: Optional[str], has_settings: bool
                    ) -> tuple[Optional[str], str]:
    """(the folder relative paths are resolved from, why); (None, "") when the spec has no relative paths."""
    here, parent = os.getcwd(), os.path.dirname(out)
    paths = relative_paths(spec, (recorded,) if recorded is not None else (here, parent))
    if not paths:
        return None, ""
    if recorded is not None:
        return recorded, RECORDED
    missing = (f"{RUN_SETTINGS_FILE} does not record where `merge run` ran" if has_settings
               else f"there is no {RUN_SETTINGS_FILE} to say where the merge ran")

    def found(base: str) -> int:
        return sum(os.path.exists(os.path.join(base, path.path)) for path in paths)

    if found(here) >= found(parent):
        return here, f"the current folder: {missing}"
    return parent, f"the output's parent folder: {missing}, and the sources are not found from the current folder"


def relative_paths(spec: Spec, bases: tuple[str, ...]) -> list[ModelPath]:
    """The spec's relative local model and adapter paths: not absolute, and not Hub ids (a path shaped like
    ``org/name`` is local when one of ``bases`` holds a folder of that name)."""
    found: list[ModelPath] = []
    _walk(spec, lambda path: found.append(path) or path)
    return [path for path in found if path.revision is None and not os.path.isabs(path.path) and (
        not REPO_ID.match(path.path) or any(os.path.exists(os.path.join(base, path.path)) for base in bases))]


def rebase(spec: Spec, base: str) -> Spec:
    """The spec with every relative local path made absolute against ``base``. A relative path shaped like a
    Hub id (``org/name``) stays a Hub id unless ``base`` holds a folder of that name, as `merge run` decided."""

    def move(path: ModelPath) -> ModelPath:
        if path.revision is not None or os.path.isabs(path.path):
            return path
        there = os.path.normpath(os.path.join(base, path.path))
        if os.path.exists(there) or not REPO_ID.match(path.path):
            return ModelPath(there)
        return path

    return _walk(spec, move)


def _walk(value: Any, move: Callable[[ModelPath], ModelPath]) -> Any:
    """``value`` with ``move`` applied to every ModelPath in its dataclasses and tuples (rebuilt only where
    something changed, so unchanged references stay equal and hashable as before)."""
    if isinstance(value, ModelPath):
        return move(value)
    if isinstance(value, tuple):
        items = tuple(_walk(item, move) for item in value)
        return items if any(a is not b for a, b in zip(items, value)) else value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changed = {}
        for item in dataclasses.fields(value):
            if item.init and not isinstance(getattr(value, item.name), dict):
                new = _walk(getattr(value, item.name), move)
                if new is not getattr(value, item.name):
                    changed[item.name] = new
        return dataclasses.replace(value, **changed) if changed else value
    return value
