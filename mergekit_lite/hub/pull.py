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
from .client import client, offline, progress_bars, redact, server_message, status_code

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
    except Exception as exc:
        cause = _unreachable(exc)
        if cause is not None:
            return _from_cache(path, where, patterns, cause=cause)
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
        with progress_bars():   # none under -q (quiet_hub)
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
    except _kinds("IncompleteSnapshotError"):
        raise HubError(f"'{path}' is only partly in the local Hub cache (an interrupted download), and "
                       + ("HF_HUB_OFFLINE is set" if cause is None else f"the Hub cannot be reached ({_describe(cause)})"),
                       where=where, hint="re-run once online: the download resumes") from None
    except hf.errors.LocalEntryNotFoundError:
        raise _not_cached(path, where, cause) from None
    except Exception as exc:
        raise _error(exc, path, where) from None
    commit = os.path.basename(os.path.normpath(folder))
    if cause is not None:
        log.warning("cannot reach the Hub (%s); using the cached copy of '%s' (commit %s)",
                    _describe(cause), path, commit)
    return HubInput(path, where, commit, (), folder)


def _unreachable(exc: Exception) -> Optional[Exception]:
    """The network failure behind ``exc`` when the Hub could not be asked at all (then the cache may answer)."""
    hf = client()
    if isinstance(exc, _kinds("RevisionResolutionError")):   # unreachable (or down), and no cached ref
        return exc.__cause__ if isinstance(exc.__cause__, Exception) else exc
    if isinstance(exc, (hf.utils.httpx.TransportError, hf.errors.OfflineModeIsEnabled)):
        return exc
    return None


def _kinds(*names: str) -> tuple[type, ...]:
    """huggingface_hub's error classes of these names that this version has (some are newer than 1.30)."""
    errors = client().errors
    return tuple(getattr(errors, name) for name in names if isinstance(getattr(errors, name, None), type))


def _not_cached(path: ModelPath, where: str, cause: Optional[Exception]) -> HubError:
    """Not in the local Hub cache: offline (cause None) or with the Hub unreachable. A reference without a
    revision could also have been a local folder (a typo in a path such as models/ft-b): the message says both."""
    local = path.revision is None
    check_path = "check the path (relative paths are relative to the current directory); for a Hub repo, "
    if cause is None:
        if local:
            return HubError(f"no local folder '{path}', and as a Hub repo it is not in the local Hub cache "
                            "(HF_HUB_OFFLINE is set)", where=where,
                            hint=check_path + "unset HF_HUB_OFFLINE, or download it once while online")
        return HubError(f"'{path}' is not in the local Hub cache and HF_HUB_OFFLINE is set", where=where,
                        hint="unset HF_HUB_OFFLINE, or download the model once while online")
    status = status_code(cause)   # the Hub answered, with a server error (5xx)
    if local:
        failed = "could not be reached" if status is None else f"answered {status}"
        return HubError(f"no local folder '{path}', and the Hub {failed} when asked for it as a repo "
                        f"({_describe(cause)}); it is not in the local Hub cache either", where=where,
                        hint=check_path + "check the network connection (and HF_ENDPOINT), then re-run")
    failed = "cannot reach the Hub to look up" if status is None else f"the Hub answered {status} when asked for"
    return HubError(f"{failed} '{path}' ({_describe(cause)}), and it is not in the local cache", where=where,
                    hint="check the network connection (and HF_ENDPOINT), then re-run")


def _describe(exc: BaseException) -> str:
    """One line naming a network failure: 'ConnectError: [Errno 111] Connection refused' (an HTTP error: the
    Hub's own words)."""
    text = redact(server_message(exc) if status_code(exc) else str(exc)).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _error(exc: Exception, path: ModelPath, where: str) -> HubError:
    """Turn any huggingface_hub failure about one reference into a HubError naming it and what to do."""
    hf = client()
    errors = hf.errors
    if isinstance(exc, errors.GatedRepoError):
        return HubError(f"'{path}' is gated: your account has not been granted access", where=where,
                        hint=f"accept its terms on the Hub page of {path.path}, then `hf auth login` or set HF_TOKEN")
    if isinstance(exc, errors.RevisionNotFoundError):
        return HubError(f"revision '{path.revision}' of '{path.path}' not found", where=where,
                        hint="check the branch, tag or commit after '@'")
    if isinstance(exc, errors.RepositoryNotFoundError):
        what = (f"no local folder '{path.path}' and no Hub repository of that name" if path.revision is None
                else f"no Hub repository '{path.path}'")
        return HubError(what, where=where,
                        hint="check the spelling; for a private repo run `hf auth login` or set HF_TOKEN")
    if isinstance(exc, _kinds("DisabledRepoError")):
        return HubError(f"'{path.path}' has been disabled on the Hub", where=where,
                        hint="its files cannot be downloaded; use another repo")
    if isinstance(exc, _kinds("RemoteEntryNotFoundError")):
        return HubError(f"a file of '{path}' is no longer on the Hub: {redact(server_message(exc))}", where=where,
                        hint="the repo changed while it was being read; re-run")
    if isinstance(exc, errors.HfHubHTTPError):
        hint = ("check HF_TOKEN or run `hf auth login`" if status_code(exc) in (401, 403)
                else "re-run to retry; files already downloaded are kept")
        return HubError(f"the Hub answered {status_code(exc)} for '{path}': {redact(server_message(exc))}",
                        where=where, hint=hint)
    if isinstance(exc, _kinds("HFValidationError", "HfUriError")):
        return HubError(f"'{path}' is not a valid Hub reference: {redact(str(exc))}", where=where,
                        hint="a local folder: check the path; a Hub repo: write org/name[@revision]")
    if isinstance(exc, errors.OfflineModeIsEnabled):
        return _not_cached(path, where, None)
    if isinstance(exc, _kinds("RevisionResolutionError")):
        return _not_cached(path, where, _unreachable(exc))
    if isinstance(exc, (hf.utils.httpx.TransportError, errors.LocalEntryNotFoundError, *_kinds("XetDownloadError"))):
        cause = exc.__cause__ or exc.__context__ if isinstance(exc, errors.LocalEntryNotFoundError) else None
        return HubError(f"could not reach the Hub while downloading '{path}': {_describe(cause or exc)}", where=where,
                        hint="check the network connection (and HF_ENDPOINT), then re-run: the download resumes; "
                             "or set HF_HUB_OFFLINE=1 to use only what is in the local Hub cache")
    if isinstance(exc, OSError):
        return HubError(f"download of '{path}' failed: {redact(str(exc))}", where=where,
                        hint="check disk space (HF_HOME, HF_HUB_CACHE), then re-run: the download resumes")
    return HubError(f"the Hub client failed on '{path}': {_describe(exc)}", where=where,
                    hint="re-run; if it fails again, run with --debug and report the traceback")
