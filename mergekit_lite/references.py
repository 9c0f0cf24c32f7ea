"""Model references as written in a spec: ``./local/folder``, ``org/name``, ``org/name@revision``.

The syntax is mergekit's: ``path[@revision][+adapter[@revision]]``, or the dict form
``{model: {path, revision}, lora: {path, revision}}``. A reference is a local folder when that path
exists; otherwise, when it looks like a Hub repo id, it is fetched from the Hub.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Optional

from .errors import SpecError

REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class ModelPath:
    path: str
    revision: Optional[str] = None

    def __str__(self) -> str:
        return f"{self.path}@{self.revision}" if self.revision else self.path

    @property
    def is_local(self) -> bool:
        return self.revision is None and (os.path.exists(self.path) or not REPO_ID.match(self.path))

    @property
    def repo_id(self) -> Optional[str]:
        """The Hub id when this path names a repository rather than a local folder."""
        return None if self.is_local else self.path


@dataclass(frozen=True)
class ModelRef:
    """A model, optionally with a LoRA adapter folded into it as it is read."""

    model: ModelPath
    adapter: Optional[ModelPath] = None

    def __str__(self) -> str:
        return f"{self.model}+{self.adapter}" if self.adapter else str(self.model)


def parse_reference(value: Any, where: str) -> ModelRef:
    """Parse a spec's model reference (string or mergekit's dict form)."""
    if isinstance(value, str):
        text = value.strip()
        if not text:
            raise SpecError("empty model reference", where=where, hint="give a local folder or a Hub repo id")
        if os.path.exists(text):  # a local path may contain '@' or '+'
            return ModelRef(ModelPath(text))
        parts = text.split("+")
        if len(parts) > 2:
            raise SpecError(f"'{text}' has more than one '+'", where=where,
                            hint="write base+adapter with one adapter; list several adapters with the fold command")
        model = _parse_path(parts[0], where)
        return ModelRef(model, _parse_path(parts[1], where) if len(parts) == 2 else None)
    if isinstance(value, dict):
        unknown = set(value) - {"model", "lora"}
        if unknown:
            raise SpecError(f"unknown key '{sorted(map(str, unknown))[0]}' in a model reference", where=where,
                            hint="a model reference dict has 'model' and optionally 'lora'")
        if "model" not in value:
            raise SpecError("model reference dict has no 'model'", where=where)
        model = _parse_path_value(value["model"], f"{where}.model")
        adapter = _parse_path_value(value["lora"], f"{where}.lora") if value.get("lora") is not None else None
        return ModelRef(model, adapter)
    raise SpecError(f"expected a model reference string, got {type(value).__name__}", where=where,
                    hint="write a local folder or a Hub repo id such as org/name@revision")


def _parse_path_value(value: Any, where: str) -> ModelPath:
    if isinstance(value, str):
        return _parse_path(value, where)
    if isinstance(value, dict) and "path" in value and set(value) <= {"path", "revision"}:
        revision = value.get("revision")
        return ModelPath(str(value["path"]), str(revision) if revision is not None else None)
    raise SpecError("expected a path string or {path, revision}", where=where)


def _parse_path(text: str, where: str) -> ModelPath:
    if os.path.exists(text):
        return ModelPath(text)
    if text.count("@") > 1:
        raise SpecError(f"'{text}' has more than one '@'", where=where,
                        hint="write org/name@revision with a single revision")
    path, _, revision = text.partition("@")
    if not path or (_ == "@" and not revision):
        raise SpecError(f"'{text}' is not a model reference", where=where,
                        hint="write a local folder or org/name[@revision]")
    return ModelPath(path, revision or None)
