"""Turning the spec's model references into opened checkpoints: local folders first, then downloads.

Every reference is checked before anything is downloaded, so a typo in the third model is reported
before the first model's gigabytes arrive.
"""

from __future__ import annotations

import os
from typing import Optional

from .checkpoint import Checkpoint, open_checkpoint
from .errors import MergeError, SpecError
from .references import ModelPath, ModelRef
from .spec import Spec


def local_folder(path: ModelPath, where: str) -> Optional[str]:
    """The folder of a local reference; a SpecError if it names a missing local path; None for Hub ids."""
    if path.revision is None and os.path.exists(path.path):
        return path.path
    if path.repo_id is None:
        raise SpecError(f"model folder '{path.path}' not found", where=where,
                        hint="check the path (relative paths are relative to the current directory)")
    return None


def fetch(path: ModelPath, where: str, allow_pickle: bool = False) -> str:
    folder = local_folder(path, where)
    if folder is not None:
        return folder
    from .hub import MODEL_PATTERNS, PICKLE_PATTERNS, download

    return download(path, where, MODEL_PATTERNS + PICKLE_PATTERNS if allow_pickle else None)


def open_inputs(spec: Spec, allow_pickle: bool = False) -> dict[ModelRef, Checkpoint]:
    """Open every model the spec references, keyed by reference. Errors name the YAML path.

    ``allow_pickle``: a model with only pickle weights is loaded with torch.load(weights_only=True)."""
    refs = spec.references()
    for ref, where in refs:  # fail on missing local folders before any download starts
        try:
            local_folder(ref.model, where)
            if ref.adapter is not None:
                local_folder(ref.adapter, where)
        except MergeError as exc:
            exc.file = spec.file
            raise
    opened: dict[ModelRef, Checkpoint] = {}
    for ref, where in refs:
        try:
            if ref.adapter is not None:
                raise SpecError(f"'{ref}': LoRA adapter references (base+adapter) are not supported yet",
                                hint="fold the adapter with peft's merge_and_unload() and reference the result")
            checkpoint = open_checkpoint(fetch(ref.model, where, allow_pickle), label=str(ref.model),
                                         allow_pickle=allow_pickle)
        except MergeError as exc:
            exc.where = where if exc.where is None else f"{where}: {exc.where}"   # the YAML path, then the tensor
            if exc.file is None:
                exc.file = spec.file
            raise
        opened[ref] = checkpoint
    return opened
