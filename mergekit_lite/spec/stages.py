"""Multi-stage files (mergekit-multi's format): several YAML documents, each a merge spec.

A document with ``name: X`` is an intermediate result; later documents use it as a model (``model: X``,
``base_model: X``, a slice's source, a tokenizer source) and the one document without a name is the final
output. As in mergekit-multi (scripts/multimerge.py), a reference whose path is a stage's name means that
stage, even where a local folder of that name exists; a revision (``X@main``) makes it a Hub or folder
reference instead. This module reads the documents and checks the graph they form, whole, before any model
is opened: every document is a spec, names are plain folder names used once, exactly one document has no
name, every bare name is a stage or a local folder, and no stage depends on itself (a cycle).
"""

from __future__ import annotations

import copy
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import yaml

from ..errors import MergeError, SpecError, did_you_mean
from .moe import is_moe
from .references import REPO_ID
from .safe_yaml import load_yaml
from .schema import Spec, parse_spec

DOCUMENT_START = re.compile(r"^---(?:[ \t].*)?$", re.MULTILINE)
STAGE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,99}\Z")
MOE_KEYS = ("experts", "gate_mode")
NAME_HINT = "a stage is written to a folder of its name: use letters, digits, '.', '_' and '-' (e.g. name: stage-1)"
Slot = tuple[Any, Any, str]   # (container, key, YAML path) of one model reference in a document


@dataclass(frozen=True)
class Stage:
    """One document of a multi-stage file, its graph edges found."""

    index: int                  # document number, from 1
    name: Optional[str]         # None: the final output
    data: dict                  # the document as read
    text: str                   # the document as written
    uses: dict[str, str]        # stage name -> YAML path of its first use here

    def label(self, file: Optional[str]) -> str:
        """How messages name this document: ``FILE (document N)``."""
        return f"{file or 'spec'} (document {self.index})"


def documents(text: str) -> list[str]:
    """The YAML documents of a file, split at ``---`` lines (empty ones and ``...`` ends left out)."""
    return [part for part in DOCUMENT_START.split(text) if part.strip() and part.strip() != "..."]


def refuse_moe(data: Any, file: Optional[str]) -> None:
    if is_moe(data):
        raise SpecError(f"this is a mergekit-moe file: run `merge moe {file or 'FILE'} -o OUT`", file=file)


def multi_stage_source(spec: Any) -> Optional[tuple[str, Optional[str]]]:
    """(text, file) when ``spec`` (a path or YAML text) holds several documents; None for one spec (or
    anything else: load_spec reports what is wrong with it). A mergekit-moe file is refused here."""
    from .safe_yaml import read_spec_file

    if not isinstance(spec, (str, os.PathLike)):
        return None
    text, file = os.fspath(spec), None
    if "\n" not in text and os.path.isfile(text):
        text, file = read_spec_file(text), text
    elif "\n" not in text:
        return None
    parts = documents(text)
    if len(parts) > 1:
        return text, file
    if parts and any(re.search(rf"^{key}\s*:", parts[0], re.MULTILINE) for key in MOE_KEYS):
        refuse_moe(load_yaml(parts[0], file), file)
    return None


def read_stages(text: str, file: Optional[str], exists: Callable[[str], bool] = os.path.exists) -> list[Stage]:
    """The stages of a multi-stage file in the order they run (each after the stages it uses), the final one
    last. Raises a SpecError naming ``FILE (document N)`` and the YAML path on the first problem."""
    stages: list[Stage] = []
    for index, part in enumerate(documents(text), 1):
        label = f"{file or 'spec'} (document {index})"
        data = load_yaml(part, label)
        if is_moe(data):
            raise SpecError("a mergekit-moe spec cannot be a stage of a multi-stage file", file=label,
                            hint="build the MoE on its own with `merge moe`; stages are merge specs")
        parse_spec(data, text=part, file=label)   # every document is a spec (structure only, no model opened)
        stages.append(Stage(index, _name(data, label), data, part, {}))
    _check_names(stages, file)
    names = {stage.name for stage in stages if stage.name is not None}
    stages = [Stage(s.index, s.name, s.data, s.text, _uses(s, names, exists, file)) for s in stages]
    return _in_order(stages, file)


def _name(data: dict, label: str) -> Optional[str]:
    if "name" not in data:
        return None
    name = data["name"]
    if not isinstance(name, str):
        shown = "nothing (null)" if name is None else f"{type(name).__name__} {name!r}"
        raise SpecError(f"a stage name must be a string, got {shown}", where="name", file=label,
                        hint="write it as a string, e.g. name: \"stage-1\"; leave name out for the final stage")
    if not STAGE_NAME.match(name) or set(name) == {"."}:
        raise SpecError(f"stage name {name!r} is not a plain folder name", where="name", file=label, hint=NAME_HINT)
    return name


def _check_names(stages: list[Stage], file: Optional[str]) -> None:
    seen: dict[Optional[str], Stage] = {}
    for stage in stages:
        first = seen.get(stage.name)
        if first is not None and stage.name is not None:
            raise SpecError(f"stage name {stage.name!r} is also the name of document {first.index}", where="name",
                            file=stage.label(file), hint="give every stage of a multi-stage file its own name")
        if first is not None:
            raise SpecError(f"this document has no name, and neither has document {first.index}: only the final "
                            "stage has none", file=stage.label(file),
                            hint="give each intermediate stage a name (name: ...); the one without is written to OUT")
        seen[stage.name] = stage
    if None not in seen:
        raise SpecError("every document has a name, so none is the final output", file=file,
                        hint="leave out the name of the stage to write to OUT (mergekit-multi's final merge)")


def _uses(stage: Stage, names: set[str], exists: Callable[[str], bool], file: Optional[str]) -> dict[str, str]:
    """The stages this document reads, each with the YAML path of its first use; a bare name that is neither a
    stage nor a local folder is refused here, not when the stage's turn comes."""
    uses: dict[str, str] = {}
    for parent, key, where in reference_slots(stage.data):
        path = _path_of(parent[key])
        if path is None:
            continue
        if path in names:
            uses.setdefault(path, where)
        elif not exists(path) and not REPO_ID.match(path):
            raise SpecError(f"'{path}' is neither a stage of this file nor a local folder." +
                            did_you_mean(path, names), where=where, file=stage.label(file),
                            hint="name a stage (name: ...) of this file, a local model folder or a Hub repo "
                                 "(org/name)")
    return uses


def _in_order(stages: list[Stage], file: Optional[str]) -> list[Stage]:
    """Depth-first topological order (document order where free), the final stage last; a cycle is refused
    naming its stages in order."""
    by_name = {stage.name: stage for stage in stages}
    done: set[Optional[str]] = set()
    order: list[Stage] = []

    def visit(stage: Stage, path: list[Stage]) -> None:
        if stage.name in done:
            return
        if stage in path:
            cycle = path[path.index(stage):] + [stage]
            first = cycle[0]
            raise SpecError("the stages form a cycle: " + " -> ".join(str(s.name) for s in cycle),
                            where=first.uses[cycle[1].name], file=first.label(file),
                            hint="a stage can only use stages that do not use it, directly or through others")
        for name in stage.uses:
            visit(by_name[name], path + [stage])
        done.add(stage.name)
        order.append(stage)

    for stage in stages:
        visit(stage, [])
    final = next(s for s in order if s.name is None)
    return [s for s in order if s is not final] + [final]


def stage_spec(stage: Stage, folders: dict[str, str], file: Optional[str]) -> Spec:
    """The stage's spec with every use of a stage replaced by that stage's folder (``folders``). Its text is
    the document as written when it uses no stage, else the rewritten document (what its output's
    mergekit_config.yml holds, so `merge validate` finds the intermediate models)."""
    data = copy.deepcopy(stage.data)
    data.pop("name", None)
    if not stage.uses:
        return parse_spec(data, text=stage.text, file=file)
    for parent, key, _ in list(reference_slots(data)):
        path = _path_of(parent[key])
        if path in stage.uses:
            parent[key] = _replaced(parent[key], folders[path])
    return parse_spec(data, text=yaml.safe_dump(data, sort_keys=False), file=file)


def _path_of(value: Any) -> Optional[str]:
    """The model path of a reference when it could name a stage (no revision), else None."""
    if isinstance(value, dict):
        value = value.get("model")
        if isinstance(value, dict):
            return value.get("path") if value.get("revision") is None and isinstance(value.get("path"), str) else None
    if not isinstance(value, str):
        return None
    path = value.strip().split("+")[0]
    return None if "@" in path else path


def _replaced(value: Any, folder: str) -> Any:
    if isinstance(value, str):
        return "+".join([folder, *value.strip().split("+")[1:]])
    value = dict(value)
    value["model"] = {**value["model"], "path": folder} if isinstance(value["model"], dict) else folder
    return value


def reference_slots(data: dict) -> Iterator[Slot]:
    """Every place of a (structurally valid) document that holds a model reference."""
    if data.get("base_model") is not None:
        yield data, "base_model", "base_model"
    yield from _model_entries(data.get("models"), "models")
    for name, module in (data.get("modules") or {}).items():
        if isinstance(module, dict):
            yield from _model_entries(module.get("models"), f"modules.{name}.models")
    for i, piece in enumerate(data.get("slices") or ()):
        if piece.get("base_model") is not None:
            yield piece, "base_model", f"slices[{i}].base_model"
        for j, source in enumerate(piece.get("sources") or ()):
            yield source, "model", f"slices[{i}].sources[{j}].model"
    if data.get("tokenizer_source") not in (None, "union", "base"):
        yield data, "tokenizer_source", "tokenizer_source"
    tokenizer = data.get("tokenizer")
    if isinstance(tokenizer, dict):
        yield from _token_source(tokenizer, "tokenizer")
        for token, rule in (tokenizer.get("tokens") or {}).items():
            if isinstance(rule, dict):
                yield from _token_source(rule, f"tokenizer.tokens.{token}")


def _model_entries(entries: Any, where: str) -> Iterator[Slot]:
    for i, entry in enumerate(entries or ()):
        if isinstance(entry, str):
            yield entries, i, f"{where}[{i}]"
        elif isinstance(entry, dict):
            yield entry, "model", f"{where}[{i}].model"


def _token_source(node: dict, where: str) -> Iterator[Slot]:
    source = node.get("source")
    if isinstance(source, dict) and "kind" in source:
        if source.get("kind") == "model_token":
            yield source, "model", f"{where}.source.model"
    elif source not in (None, "union", "base"):
        yield node, "source", f"{where}.source"


@contextmanager
def in_document(stage: Stage, file: Optional[str]) -> Iterator[None]:
    """Errors about the file (a stage's spec carries the file's path) name the document they are about."""
    try:
        yield
    except MergeError as exc:
        if exc.file is None or exc.file == file:
            exc.file = stage.label(file)
        raise
