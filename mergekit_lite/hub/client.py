"""What pulling and pushing share: loading huggingface_hub lazily, where the token comes from, and keeping it
out of every message.

huggingface_hub (1.30 or later, 2.x included) is imported only when a Hub repo is used, so ``import
mergekit_lite`` and local merges never pay for it. Nothing here makes a network call.
"""

from __future__ import annotations

import os
import re
import stat
from contextlib import contextmanager
from contextvars import ContextVar
from types import ModuleType
from typing import Iterator, Optional

from ..errors import HubError

AUTH_HINT = "run `hf auth login` or set HF_TOKEN, with write access to {namespace}"
# What huggingface_hub tokens look like, so that one echoed back by a server is masked too.
TOKEN_PATTERN = re.compile(r"\bhf_[A-Za-z0-9_]{8,}")
TOKEN_FILE_LIMIT = 64 << 10   # a token is ~40 characters
# Whether huggingface_hub may draw its own bars ("Fetching N files", each file's bytes): not under `-q`.
HUB_PROGRESS: ContextVar[bool] = ContextVar("mergekit_lite_hub_progress", default=True)


def client() -> ModuleType:
    """The huggingface_hub package, or a HubError saying how to install it."""
    try:
        import huggingface_hub
        import huggingface_hub.constants  # noqa: F401  (endpoint, offline mode, token path)
        import huggingface_hub.errors  # noqa: F401  (typed errors, as hf.errors)
        import huggingface_hub.utils  # noqa: F401  (hf.utils.httpx: httpx on 1.x, httpx2 on 2.x)
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        raise HubError("huggingface_hub is not installed", hint="pip install 'huggingface_hub>=1.30'") from None
    return huggingface_hub


@contextmanager
def quiet_hub(quiet: bool) -> Iterator[None]:
    """Within, with ``quiet`` (`-q`): no download or upload draws a huggingface_hub progress bar. Imports nothing."""
    token = HUB_PROGRESS.set(not quiet)
    try:
        yield
    finally:
        HUB_PROGRESS.reset(token)


@contextmanager
def progress_bars(enabled: bool = True) -> Iterator[None]:
    """huggingface_hub's bars follow a process-wide switch: turned off for one call when not ``enabled`` or
    inside quiet_hub(True), and turned back on after it (unless they were off already)."""
    utils = client().utils
    off = not (enabled and HUB_PROGRESS.get()) and not utils.are_progress_bars_disabled()
    if off:
        utils.disable_progress_bars()
    try:
        yield
    finally:
        if off:
            utils.enable_progress_bars()


def endpoint() -> str:
    """The Hub's address: https://huggingface.co, or HF_ENDPOINT (read by huggingface_hub at import)."""
    return client().constants.ENDPOINT


def offline() -> bool:
    """HF_HUB_OFFLINE=1: every request huggingface_hub would make raises instead."""
    return bool(client().constants.HF_HUB_OFFLINE)


def token_source(token: Optional[str] = None) -> Optional[str]:
    """Where the token a request would carry comes from, in huggingface_hub's order; None when there is none.

    Says where, never what: this is what a dry run prints. Reads no token over the network (an OIDC
    exchange in CI happens only when a push really runs).
    """
    if token:
        return "the token argument"
    if os.environ.get("HF_OIDC_RESOURCE"):
        return "HF_OIDC_RESOURCE (exchanged for a token when the push runs)"
    for variable in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        if os.environ.get(variable, "").strip():
            return f"the {variable} environment variable"
    path = client().constants.HF_TOKEN_PATH
    try:
        if _token_file(path).strip():
            return f"the token file {path} (from `hf auth login`)"
    except OSError:
        pass
    return None


def _token_file(path: str) -> bytes:
    """The token file's first bytes; b"" unless it is a regular file. Opened without blocking: a FIFO there must
    not hang a dry run. (safetensors_format.read_regular does the same, but importing it loads torch.)"""
    with os.fdopen(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb") as f:
        return f.read(TOKEN_FILE_LIMIT) if stat.S_ISREG(os.fstat(f.fileno()).st_mode) else b""


def redact(text: str, token: Optional[str] = None) -> str:
    """``text`` with the token (and anything shaped like an HF token) replaced by ``hf_***``."""
    if token:
        text = text.replace(token, "hf_***")
    return TOKEN_PATTERN.sub("hf_***", text)


def server_message(exc: Exception) -> str:
    """The Hub's own words for an HTTP error (X-Error-Message or the JSON ``error``), else the exception text."""
    text = str(getattr(exc, "server_message", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def status_code(exc: Exception) -> Optional[int]:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)
