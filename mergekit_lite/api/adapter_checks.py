"""The validation after `merge extract` and `merge adapters`, raising as run_merge's does."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any


def validated(result: Any, device: str, strict: bool, where: str) -> Any:
    """A copy of ``result`` (a dataclass with ``.path`` and ``.validation``) after checking the adapter folder it wrote: a failed
    validation raises ValidationFailed (``.report``, ``.result``; the folder stays), or with ``strict=False``
    warns. NOT CHECKED does not raise: the adapter was written, and the report says what could not be checked."""
    from ..validation.adapter import validate_adapter
    from .failed import ValidationFailed

    result = dataclasses.replace(result, validation=validate_adapter(result.path, device=device))
    if result.validation.failed:
        if strict:
            raise ValidationFailed(result, where=where)
        warnings.warn(f"the validation of {result.path} failed: {result.validation.verdict()}", stacklevel=3)
    return result
