"""A model's own code: the Python files config.json's ``auto_map`` names (``modeling_x.XForCausalLM``).

transformers loads such a model only with ``trust_remote_code=True`` and only when those files sit next to
config.json. An output whose config.json keeps ``auto_map`` needs them too. They are program code, so they are
copied only when the user says so (``trust_remote_code``, mergekit's ``--trust-remote-code``); otherwise the
merge says that the output will not load without them. Found from config.json before any tensor is read:
each named module's file, and the files it imports relatively (``from .configuration_x import ...``), each a
bounded regular file inside the model folder (sources/user_files.py).
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

from ..errors import ModelError
from ..plan.planner import MergePlan
from ..sources.checkpoint import Checkpoint, contained_path
from ..sources.user_files import check_copyable, read_text_file

log = logging.getLogger("mergekit_lite")

_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_RELATIVE_IMPORT = re.compile(r"^\s*from\s+\.([A-Za-z_][A-Za-z0-9_]*)\s+import\b", re.MULTILINE)
MAX_CODE_FILES = 64   # a model's own code is a handful of files; more is a runaway import chain


def remote_code_files(plan: MergePlan, trust: bool) -> list[tuple[str, str]]:
    """(folder, file name) of the code files the output's ``auto_map`` needs, checked; [] when it has none.
    Without ``trust`` nothing is copied and a warning says so (the output then loads only once they are added)."""
    auto_map = plan.config.get("auto_map") if isinstance(plan.config, dict) else None
    if not isinstance(auto_map, dict) or not auto_map:
        return []
    source = _source(plan, auto_map)
    modules, elsewhere = code_modules(auto_map)
    if elsewhere:
        _warn(plan, f"config.json's auto_map names code in other repositories ({', '.join(sorted(elsewhere))}); "
                    "transformers fetches it from there when the output is loaded with trust_remote_code")
    if not modules:
        return []
    if not trust:
        _warn(plan, f"{source.label} needs its own code (auto_map in config.json: "
                    f"{', '.join(m + '.py' for m in sorted(modules))}); it was not copied, so the output will not "
                    "load until those files are added. Add --trust-remote-code (trust_remote_code=True) to copy them")
        return []
    return _collect(source, sorted(modules))


def _source(plan: MergePlan, auto_map: dict[str, Any]) -> Checkpoint:
    """The input whose config.json (and so auto_map) the output took: the reference model, else the first one
    with the same auto_map (--config-from chose it)."""
    candidates = [plan.reference, *plan.checkpoints.values()]
    for checkpoint in candidates:
        checkpoint = getattr(checkpoint, "base", checkpoint)   # base+adapter: the base model's folder
        if isinstance(checkpoint.config, dict) and checkpoint.config.get("auto_map") == auto_map:
            return checkpoint
    return getattr(plan.reference, "base", plan.reference)


def code_modules(auto_map: dict[str, Any]) -> tuple[set[str], set[str]]:
    """(module names in the model folder, references to code in another repository ``org/repo--module.Class``)."""
    local, elsewhere = set(), set()
    for value in auto_map.values():
        for reference in value if isinstance(value, (list, tuple)) else [value]:
            if not isinstance(reference, str):
                continue
            if "--" in reference:
                elsewhere.add(reference.split("--", 1)[0])
                continue
            module = reference.rsplit(".", 1)[0] if "." in reference else ""
            if _MODULE.match(module):
                local.add(module)
    return local, elsewhere


def _collect(source: Checkpoint, modules: list[str]) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    todo = list(modules)
    seen: set[str] = set()
    while todo and len(found) < MAX_CODE_FILES:
        module = todo.pop(0)
        if module in seen:
            continue
        seen.add(module)
        name = module + ".py"
        path = contained_path(source.folder, name, source.label)
        if not os.path.lexists(path):
            if module in modules:   # named by auto_map itself: the output cannot load without it
                raise ModelError(f"config.json's auto_map names {module}, but {name} is not in the model folder",
                                 file=source.label, hint="download the model's code files too, or drop "
                                                         "--trust-remote-code to merge without them")
            continue   # a relative import of a package folder or an optional file: transformers reports it
        check_copyable(path, source.label)
        found.append((source.folder, name))
        try:
            todo.extend(_RELATIVE_IMPORT.findall(read_text_file(path)))
        except (OSError, ValueError):   # not UTF-8 text: copied as it is, its imports not followed
            pass
    return found


def _warn(plan: MergePlan, message: str) -> None:
    if message not in plan.warnings:
        plan.warnings.append(message)
        log.warning("%s", message)
