"""Inputs from the Hugging Face Hub: resolve every reference first, then download only what a merge needs.

Resolving asks the Hub, for each repo, whether it and its revision exist, which commit the revision points
to, and which files a merge needs (one ``model_info`` call, plus an access check for gated repos). So a
missing, gated or private repo, an unknown revision, or a repo without safetensors is reported with its
reference and YAML path before a single byte is downloaded. Downloads then ask for that exact commit: a
branch that moves meanwhile cannot mix two versions, and the model card can pin what was merged.

With HF_HUB_OFFLINE=1, or when the Hub cannot be reached, references resolve from the local Hub cache.
"""

from __future__ import annotations

import fnmatch
import glob
import logging
import os
from dataclasses import dataclass
from typing import Optional

from ..errors import HubError
from ..spec.references import ModelPath
from .client import client, offline, redact, server_message, status_code

log = logging.getLogger("mergekit_lite")

# What a merge reads from a model repo: weights, their index, config, tokenizer. Never pickles or READMEs.
MODEL_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json",
                  "tokenizer*", "special_tokens_map.json", "*.model", "vocab.*", "merges.txt", "added_tokens.json",
                  "chat_template.jinja", "chat_template.json")
# What it reads from a PEFT LoRA adapter repo (adapter_model.bin is a pickle: refused).
ADAPTER_PATTERNS = ("adapter_config.json", "adapter_model.safetensors")
SUBFOLDERS = ["*/*"]  # huggingface_hub's patterns let '*' match '/': this one keeps to the repo's root


@dataclass(frozen=True)
class HubInput:
    """A Hub reference, resolved: the commit its revision points to and the files a merge needs there."""

    path: ModelPath
    where: str                      # the YAML path of its first mention, for messages
    commit: str                     # the commit hash the revision pointed to
    files: tuple[str, ...]
    folder: Optional[str] = None    # set when the local cache already holds it complete (offline)


def needed_files(names: list[str], patterns: tuple[str, ...] = MODEL_PATTERNS) -> list[str]:
    """The files at the repo's root that match ``patterns`` (a merge never reads subfolders)."""
    return sorted(n for n in names if "/" not in n and any(fnmatch.fnmatchcase(n, p) for p in patterns))


def resolve_all(paths: list[tuple[ModelPath, str, str]]) -> dict[ModelPath, HubInput]:
    """Resolve ``(path, where, kind)`` for every Hub reference, kind "model" or "adapter"; nothing is downloaded."""
    resolved: dict[ModelPath, HubInput] = {}
    for path, where, kind in paths:
        if path not in resolved:
            resolved[path] = resolve(path, where, ADAPTER_PATTERNS if kind == "adapter" else MODEL_PATTERNS)
    return resolved


def resolve(path: ModelPath, where: str, patterns: tuple[str, ...] = MODEL_PATTERNS) -> HubInput:
    hf = client()
    if offline():
        return _from_cache(path, where, patterns, cause=None)
    api = hf.HfApi()
    try:
        # resolve_revision also records revision -> commit in the cache, so the same spec works offline later.
        commit = api.resolve_revision(path.path, revision=path.revision).resolved
        info = api.model_info(path.path, revision=commit)
        if info.gated:  # the metadata of a gated repo is public; its files are not, unless access was granted
            api.auth_check(path.path)
    except hf.utils.httpx.TransportError as exc:
        return _from_cache(path, where, patterns, cause=exc)
    except Exception as exc:
        raise _error(exc, path, where) from None
    files = needed_files([s.rfilename for s in info.siblings or ()], patterns)
    if not any(f.endswith(".safetensors") for f in files):
        found = ", ".join(sorted(s.rfilename for s in info.siblings or ())[:8]) or "no files"
        raise HubError(f"'{path}' has no safetensors weights at its root ({found})", where=where,
                       hint="pickle checkpoints (*.bin, *.pt) are refused because loading one can run code; "
                            "use a repo (or a revision) that has *.safetensors")
    return HubInput(path, where, commit, tuple(files))


def download(item: HubInput) -> str:
    """Download the files of a resolved reference at its pinned commit (a no-op when cached); the local folder."""
    if item.folder is not None:
        return item.folder
    hf = client()
    try:
        return hf.snapshot_download(item.path.path, revision=item.commit,
                                    allow_patterns=[glob.escape(f) for f in item.files])
    except Exception as exc:
        raise _error(exc, item.path, item.where) from None


def _from_cache(path: ModelPath, where: str, patterns: tuple[str, ...], cause: Optional[Exception]) -> HubInput:
    """Resolve from the local Hub cache: offline (cause None) or with the Hub unreachable."""
    hf = client()
    try:
        folder = hf.snapshot_download(path.path, revision=path.revision, allow_patterns=list(patterns),
                                      ignore_patterns=SUBFOLDERS, local_files_only=True)
    except hf.errors.LocalEntryNotFoundError:
        if cause is None:
            raise HubError(f"'{path}' is not in the local Hub cache and HF_HUB_OFFLINE is set", where=where,
                           hint="unset HF_HUB_OFFLINE, or download the model once while online") from None
        raise HubError(f"cannot reach the Hub to look up '{path}' ({redact(str(cause))}), and it is not in the "
                       "local cache", where=where, hint="check the network connection (and HF_ENDPOINT), then re-run")
    commit = os.path.basename(os.path.normpath(folder))
    if cause is not None:
        log.warning("cannot reach the Hub (%s); using the cached copy of '%s' (commit %s)",
                    redact(str(cause)), path, commit)
    return HubInput(path, where, commit, (), folder)


def _error(exc: Exception, path: ModelPath, where: str) -> Exception:
    """Turn a huggingface_hub failure about one reference into a HubError naming it."""
    hf = client()
    errors = hf.errors
    if isinstance(exc, errors.GatedRepoError):
        return HubError(f"'{path}' is gated: your account has not been granted access", where=where,
                        hint=f"accept its terms on the Hub page of {path.path}, then `hf auth login` or set HF_TOKEN")
    if isinstance(exc, errors.RevisionNotFoundError):
        return HubError(f"revision '{path.revision}' of '{path.path}' not found", where=where,
                        hint="check the branch, tag or commit after '@'")
    if isinstance(exc, errors.RepositoryNotFoundError):
        return HubError(f"no local folder '{path.path}' and no Hub repository of that name", where=where,
                        hint="check the spelling; for a private repo run `hf auth login` or set HF_TOKEN")
    if isinstance(exc, errors.HfHubHTTPError):
        hint = ("check HF_TOKEN or run `hf auth login`" if status_code(exc) in (401, 403)
                else "re-run to retry; files already downloaded are kept")
        return HubError(f"the Hub answered {status_code(exc)} for '{path}': {redact(server_message(exc))}",
                        where=where, hint=hint)
    if isinstance(exc, errors.OfflineModeIsEnabled):
        return HubError(f"'{path}' is not in the local Hub cache and HF_HUB_OFFLINE is set", where=where,
                        hint="unset HF_HUB_OFFLINE, or download the model once while online")
    if isinstance(exc, (hf.utils.httpx.TransportError, errors.LocalEntryNotFoundError)):
        return HubError(f"network failure while downloading '{path}': {redact(str(exc))}", where=where,
                        hint="check the network connection, then re-run: the download resumes")
    if isinstance(exc, OSError):
        return HubError(f"download of '{path}' failed: {redact(str(exc))}", where=where,
                        hint="check disk space (HF_HOME, HF_HUB_CACHE), then re-run: the download resumes")
    return exc
