"""Turning the spec's model references into opened checkpoints: local folders first, then downloads.

Every reference is checked before anything is downloaded (local folders exist; Hub repos and revisions
exist, are readable and hold safetensors), so a typo in the third model is reported before the first
model's gigabytes arrive.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Optional

from .checkpoint import Checkpoint, open_checkpoint
from .errors import MergeError, SpecError
from .references import ModelPath, ModelRef
from .spec import Spec

if TYPE_CHECKING:  # hub_pull is imported only when a spec names a Hub repo
    from .hub_pull import HubInput


def local_folder(path: ModelPath, where: str) -> Optional[str]:
    """The folder of a local reference; a SpecError if it names a missing local path; None for Hub ids."""
    if path.revision is None and os.path.exists(path.path):
        return path.path
    if path.repo_id is None:
        raise SpecError(f"model folder '{path.path}' not found", where=where,
                        hint="check the path (relative paths are relative to the current directory)")
    return None


def resolve_hub_inputs(refs: list[tuple[ModelRef, str]]) -> dict[ModelPath, HubInput]:
    """Resolve every Hub reference (models and adapters) to a commit and a file list; downloads nothing."""
    paths = [(path, where, kind) for ref, where in refs
             for path, kind in ((ref.model, "model"), (ref.adapter, "adapter"))
             if path is not None and local_folder(path, where) is None]
    if not paths:
        return {}
    from .hub_pull import resolve_all

    return resolve_all(paths)


def fetch(path: ModelPath, where: str, hub: dict[ModelPath, HubInput]) -> str:
    folder = local_folder(path, where)
    if folder is not None:
        return folder
    from .hub_pull import download

    return download(hub[path])


def open_inputs(spec: Spec) -> dict[ModelRef, Checkpoint]:
    """Open every model the spec references, keyed by reference. Errors name the YAML path."""
    refs = spec.references()
    for ref, where in refs:  # fail on missing local folders before any download starts
        try:
            local_folder(ref.model, where)
            if ref.adapter is not None:
                local_folder(ref.adapter, where)
        except MergeError as exc:
            exc.file = spec.file
            raise
    try:
        hub = resolve_hub_inputs(refs)  # every Hub reference checked before the first download
    except MergeError as exc:
        exc.file = exc.file or spec.file
        raise
    opened: dict[ModelRef, Checkpoint] = {}
    for ref, where in refs:
        try:
            if ref.adapter is not None:
                raise SpecError(f"'{ref}': LoRA adapter references (base+adapter) are not supported yet",
                                hint="fold the adapter with peft's merge_and_unload() and reference the result")
            checkpoint = open_checkpoint(fetch(ref.model, where, hub), label=str(ref.model))
            if ref.model in hub:
                checkpoint.commit = hub[ref.model].commit
        except MergeError as exc:
            if exc.where is None:
                exc.where = where
            if exc.file is None:
                exc.file = spec.file
            raise
        opened[ref] = checkpoint
    return opened
