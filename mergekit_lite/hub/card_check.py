"""Checking a model card's front matter locally, before anything is uploaded.

The Hub reads README.md's YAML front matter to place a model: ``base_model`` (Hub ids only) and
``base_model_relation: merge`` put it under "Merges" of its parents, ``library_name`` says how to load it
(the Hub no longer guesses it), ``license`` says who may use it. A mistake there fails the upload at the
very end, or silently drops the model from its parents' model tree, so it is found here first.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional

from ..errors import SpecError
from ..spec.references import REPO_ID
from ..spec.safe_yaml import load_yaml

FRONT_MATTER = re.compile(r"\A\s*---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(\r?\n|\Z)", re.DOTALL)
RELATIONS = ("adapter", "merge", "quantized", "finetune")


@dataclass
class CardCheck:
    """What the front matter says, and what is wrong with it (errors block a push; warnings do not).

    Errors are about README.md (the caller names the file); warnings are whole sentences."""

    metadata: dict[str, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line: the keys the Hub acts on, as they will be read."""
        keys = ("base_model", "base_model_relation", "library_name", "license", "tags")
        shown = [f"{k}={_short(self.metadata[k])}" for k in keys if k in self.metadata]
        return " ".join(shown) or "(no metadata)"


def check_card(text: Optional[str]) -> CardCheck:
    """Check README.md's text (None when the folder has no README.md)."""
    result = CardCheck()
    if text is None:
        result.warnings.append("no model card (README.md): the Hub page will be empty and the model will not "
                               "appear in its parents' model tree")
        return result
    match = FRONT_MATTER.match(text)
    if match is None:
        result.warnings.append("README.md has no metadata (a YAML block between '---' lines at the top): "
                               "no base_model, license or library_name")
        return result
    try:  # bounded like a spec: no alias bombs, no nesting deep enough to exhaust the stack
        data = load_yaml("\n" + match.group(1), None)  # "\n": lines count from the opening '---'
    except SpecError as exc:
        at = f" at {exc.where}" if exc.where else ""
        syntax = exc.what.startswith("not valid YAML: ")
        result.errors.append(f"metadata is not valid YAML{at}: {exc.what.removeprefix('not valid YAML: ')}" if syntax
                             else f"metadata{at}: {exc.what}")
        return result
    if data is None:
        data = {}
    if not isinstance(data, dict):
        result.errors.append(f"metadata must be a mapping of keys to values, not a {type(data).__name__}")
        return result
    result.metadata = data
    _check_base_model(data, result)
    _check_keys(data, result)
    return result


def _check_base_model(data: dict, result: CardCheck) -> None:
    base = data.get("base_model")
    if base is None:
        return
    ids = base if isinstance(base, list) else [base]
    for value in ids:
        if not isinstance(value, str) or not REPO_ID.fullmatch(value):
            result.errors.append(f"base_model: {value!r} is not a Hub repo id (org/name); the Hub rejects "
                                 "a local path there. List Hub ids only, or remove base_model")
    relation = data.get("base_model_relation")
    if relation is not None and relation not in RELATIONS:
        result.errors.append(f"base_model_relation: {relation!r} is not one of {', '.join(RELATIONS)}")


def _check_keys(data: dict, result: CardCheck) -> None:
    tags = data.get("tags")
    if tags is not None and not (isinstance(tags, list) and all(isinstance(t, str) for t in tags)):
        result.errors.append("tags: must be a list of strings")
    if "library_name" not in data:
        result.warnings.append("README.md has no library_name: the Hub will not show how to load the model "
                               "(add library_name: transformers)")
    license_id = data.get("license")
    if license_id is None:
        result.warnings.append("README.md has no license: set the license the merged models allow "
                               "(e.g. license: apache-2.0), or license: other with license_name and license_link")
    elif license_id == "other" and "license_name" not in data:
        result.warnings.append("README.md has license: other but no license_name (and license_link)")


def _short(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return str(value)
