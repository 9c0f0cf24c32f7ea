"""Turning the spec's model references into opened checkpoints: local folders first, then downloads.

Every reference is checked before anything is downloaded (local folders exist; Hub repos and revisions
exist, are readable and hold safetensors), so a typo in the third model is reported before the first
model's gigabytes arrive.
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from typing import TYPE_CHECKING, Optional

from ..errors import SpecError, within
from ..sources.checkpoint import Checkpoint
from ..sources.opener import open_checkpoint
from ..spec.references import ModelPath, ModelRef
from ..spec.schema import Spec

if TYPE_CHECKING:  # hub_pull is imported only when a spec names a Hub repo
    from ..hub.pull import HubInput

Resolved = dict[ModelPath, "HubInput"]


def local_folder(path: ModelPath, where: str, what: str = "model folder", file: Optional[str] = None) -> Optional[str]:
    """The folder of a local reference; a SpecError if it names a missing local path; None for Hub ids."""
    if path.revision is None and os.path.exists(path.path):
        return path.path
    if path.repo_id is None:
        raise SpecError(f"{what} '{path.path}' not found", where=where, file=file,
                        hint="check the path (relative paths are relative to the current directory)")
    return None


def resolve_hub_inputs(refs: list[tuple[ModelRef, str]]) -> Resolved:
    """Resolve every Hub reference (models and adapters) to a commit and a file list; downloads nothing."""
    paths = [(path, where, kind) for ref, where in refs
             for path, kind in ((ref.model, "model"), *((a.path, "adapter") for a in ref.adapters))
             if local_folder(path, where) is None]
    if not paths:
        return {}
    from ..hub.pull import resolve_all

    return resolve_all(paths)


def fetch(path: ModelPath, where: str, hub: Optional[Resolved] = None,
          patterns: Optional[tuple[str, ...]] = None) -> str:
    """The local folder of ``path``: as it is, or downloaded (resolved in ``hub``, else resolved now)."""
    folder = local_folder(path, where)
    if folder is not None:
        return folder
    from ..hub.pull import MODEL_PATTERNS, download, resolve

    item = hub[path] if hub and path in hub else resolve(path, where, tuple(patterns or MODEL_PATTERNS))
    return download(item)


def open_reference(ref: ModelRef, where: str, hub: Optional[Resolved] = None, allow_pickle: bool = False) -> Checkpoint:
    """Open one reference: a checkpoint, or for ``base+adapter`` the base with its adapters folded in on read
    (mergekit_lite.lora.source.LoraSource, which has the Checkpoint interface). ``allow_pickle``: a local model
    or adapter with only pickle weights is loaded with torch.load(weights_only=True) (Hub downloads never
    fetch pickles)."""
    base = open_checkpoint(fetch(ref.model, where, hub), label=str(ref.model), allow_pickle=allow_pickle)
    if hub and ref.model in hub:
        base.commit = hub[ref.model].commit
    if not ref.adapters:
        return base
    from ..hub.pull import ADAPTER_PATTERNS
    from ..lora.adapter import open_adapter
    from ..lora.source import open_source

    adapters = []
    try:
        for adapter in ref.adapters:
            opened = open_adapter(fetch(adapter.path, where, hub, ADAPTER_PATTERNS), str(adapter.path), allow_pickle)
            adapters.append((opened, adapter.weight, adapter.check_base))
        return open_source(str(ref), base, ref.model, adapters, ref.tied_embeddings)
    except BaseException:
        base.close()
        for opened, _, _ in adapters:
            opened.close()
        raise


def open_inputs(spec: Spec, opened: ExitStack, allow_pickle: bool = False,
                provided: Optional[dict[ModelRef, Checkpoint]] = None) -> dict[ModelRef, Checkpoint]:
    """Open every model the spec references, keyed by reference; each is closed by ``opened`` (the caller
    keeps them with ``opened.pop_all()`` once its planning succeeded). Errors name the YAML path.

    ``allow_pickle``: a model with only pickle weights is loaded with torch.load(weights_only=True);
    ``provided``: references already opened (a fused stage), taken as they are."""
    provided = provided or {}
    refs = [(ref, where) for ref, where in spec.references() if ref not in provided]
    for ref, where in refs:  # fail on missing local folders before any download starts
        local_folder(ref.model, where, file=spec.file)
        for adapter in ref.adapters:
            local_folder(adapter.path, where, "adapter folder", file=spec.file)
    with within(spec.file):
        hub = resolve_hub_inputs(refs)  # every Hub reference checked before the first download
    checkpoints: dict[ModelRef, Checkpoint] = {}
    for ref, where in refs:
        with within(spec.file, where):   # the YAML path, then the tensor
            checkpoints[ref] = open_reference(ref, where, hub, allow_pickle)
        opened.callback(checkpoints[ref].close)
    for ref, _ in spec.references():
        if ref in provided:
            checkpoints[ref] = provided[ref]
            opened.callback(provided[ref].close)
    return {ref: checkpoints[ref] for ref, _ in spec.references()}   # in the spec's order
