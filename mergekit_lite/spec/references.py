"""Model references as written in a spec: ``./local/folder``, ``org/name``, ``org/name@revision``.

The syntax is mergekit's: ``path[@revision][+adapter[@revision]]``, or the dict form
``{model: {path, revision}, lora: {path, revision}}``. A reference is a local folder when that path
exists; otherwise, when it looks like a Hub repo id, it is fetched from the Hub.

Beyond mergekit, a reference may carry several LoRA adapters (``base+a+b``), and the dict form's ``lora``
may be a list whose entries add ``weight`` (how much of the adapter's change to apply) and ``check_base``
(false: skip the check that the adapter was made for this base); ``tied_embeddings: untie | shared``
says how adapters touching tied embeddings are folded (see mergekit_lite/lora/source.py).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Any, Optional

from ..errors import SpecError, did_you_mean

# A Hub repo id as huggingface_hub validates it: org/name, each part starting and ending with a letter or digit,
# no '--' or '..', at most 96 characters. Anything else (./x, ../x, /abs/x, ~/x, a bare name) is a local path
# only and never sent to the Hub.
REPO_ID = re.compile(r"^(?!.*(?:--|\.\.))(?=.{3,96}\Z)[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?/"
                     r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?\Z")


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
class AdapterRef:
    """A LoRA adapter to fold into a model as it is read, and how much of its change to apply."""

    path: ModelPath
    weight: float = 1.0
    check_base: bool = True          # refuse an adapter whose config names another base model

    def __str__(self) -> str:
        return str(self.path) if self.weight == 1 else f"{self.path}*{self.weight:g}"


TIED_EMBEDDINGS = ("untie", "shared")


@dataclass(frozen=True)
class ModelRef:
    """A model, optionally with LoRA adapters folded into it as it is read (in order)."""

    model: ModelPath
    adapters: tuple[AdapterRef, ...] = ()
    tied_embeddings: str = "untie"   # how adapters touching a tied lm_head / embedding are folded

    @property
    def adapter(self) -> Optional[ModelPath]:
        """The first adapter (mergekit's ``base+adapter`` has exactly one)."""
        return self.adapters[0].path if self.adapters else None

    def __str__(self) -> str:
        return "+".join([str(self.model), *map(str, self.adapters)])


def parse_reference(value: Any, where: str) -> ModelRef:
    """Parse a spec's model reference (string or mergekit's dict form)."""
    if isinstance(value, str):
        text = value.strip()
        if not text:
            raise SpecError("empty model reference", where=where, hint="give a local folder or a Hub repo id")
        if os.path.exists(text):  # a local path may contain '@' or '+'
            return ModelRef(ModelPath(text))
        parts = text.split("+")
        model = _parse_path(parts[0], where)
        return ModelRef(model, tuple(AdapterRef(_parse_path(part, where)) for part in parts[1:]))
    if isinstance(value, dict):
        unknown = set(value) - set(REFERENCE_KEYS)
        if unknown:
            key = sorted(map(str, unknown))[0]
            raise SpecError(f"unknown key '{key}' in a model reference." + did_you_mean(key, REFERENCE_KEYS),
                            where=where, hint="a model reference dict has: " + ", ".join(REFERENCE_KEYS))
        if "model" not in value:
            raise SpecError("model reference dict has no 'model'", where=where)
        model = _parse_path_value(value["model"], f"{where}.model")
        tied = value.get("tied_embeddings", "untie")
        if tied not in TIED_EMBEDDINGS:
            raise SpecError(f"tied_embeddings must be one of {', '.join(TIED_EMBEDDINGS)}, got {tied!r}",
                            where=f"{where}.tied_embeddings",
                            hint="untie: write lm_head separately (the output computes what base+adapter "
                                 "computed); shared: fold into the one shared tensor, as peft does")
        return ModelRef(model, _adapters(value.get("lora"), f"{where}.lora"), tied)
    raise SpecError(f"expected a model reference string, got {type(value).__name__}", where=where,
                    hint="write a local folder or a Hub repo id such as org/name@revision")


REFERENCE_KEYS = ("model", "lora", "tied_embeddings")
FLOAT32_MAX = 3.4028234663852886e38
ADAPTER_KEYS = ("path", "revision", "weight", "check_base")


def _adapters(value: Any, where: str) -> tuple[AdapterRef, ...]:
    """``lora:`` as a path, a {path, revision, weight, check_base} dict, or a list of those."""
    if value is None:
        return ()
    if not isinstance(value, list):
        return (_adapter(value, where),)
    if not value:
        raise SpecError("empty list of adapters", where=where, hint="leave lora out, or list adapter folders")
    return tuple(_adapter(item, f"{where}[{i}]") for i, item in enumerate(value))


def _adapter(value: Any, where: str) -> AdapterRef:
    if not isinstance(value, dict):
        return AdapterRef(_parse_path_value(value, where))
    unknown = sorted(set(value) - set(ADAPTER_KEYS))
    if unknown:
        raise SpecError(f"unknown key '{unknown[0]}' in an adapter." + did_you_mean(unknown[0], ADAPTER_KEYS),
                        where=where, hint="an adapter has: " + ", ".join(ADAPTER_KEYS))
    if isinstance(value.get("path"), str) and "revision" not in value:
        path = _parse_path(value["path"], where)     # "org/name@rev" as in the string form
    else:
        path = _parse_path_value({k: value[k] for k in ("path", "revision") if k in value}, where)
    weight = value.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise SpecError(f"weight must be a number, got {weight!r}", where=f"{where}.weight")
    if not math.isfinite(weight) or abs(weight) > FLOAT32_MAX:   # the fold computes in float32
        raise SpecError(f"weight must be a finite float32 number, got {weight!r}", where=f"{where}.weight",
                        hint="1 applies the adapter's change as trained, 0.5 half of it")
    check_base = value.get("check_base", True)
    if not isinstance(check_base, bool):
        raise SpecError(f"check_base must be true or false, got {check_base!r}", where=f"{where}.check_base")
    return AdapterRef(path, float(weight), check_base)


def _parse_path_value(value: Any, where: str) -> ModelPath:
    if isinstance(value, str):
        return _parse_path(value, where)
    if isinstance(value, dict) and "path" in value and set(value) <= {"path", "revision"}:
        path, revision = value["path"], value.get("revision")
        if not isinstance(path, str) or not path.strip():
            raise SpecError("the path is empty" if path is None or isinstance(path, str) else
                            f"the path must be a string, got {type(path).__name__}", where=f"{where}.path",
                            hint="give a local folder or a Hub repo id such as org/name")
        if revision is not None and (isinstance(revision, (bool, dict, list)) or not str(revision).strip()):
            raise SpecError(f"revision must be a branch, tag or commit, got {revision!r}", where=f"{where}.revision",
                            hint="leave revision out for the default branch")
        return _hub_path(path, None if revision is None else str(revision).strip(), path, where)
    raise SpecError("expected a path string or {path, revision}", where=where,
                    hint="write a local folder, org/name[@revision], or {path: org/name, revision: main}")


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
    return _hub_path(path, revision or None, text, where)


def _hub_path(path: str, revision: Optional[str], text: str, where: str) -> ModelPath:
    """A revision names a commit of a Hub repo; on anything else (./x@main, a path that exists nowhere and is
    no repo id) it is a local path that does not exist, and is never sent to the Hub."""
    if revision is not None and not REPO_ID.match(path):
        raise SpecError(f"no local folder '{text}', and '{path}' is not a Hub repo id, so '@{revision}' cannot be "
                        "its revision", where=where,
                        hint="check the path (relative paths are relative to the current directory); a revision "
                             "is only for Hub repos: org/name@revision")
    return ModelPath(path, revision)
