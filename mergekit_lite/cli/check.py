"""``merge check SPEC...``: check merge specs without opening, downloading or even looking for a model.

For config repositories and CI; works offline. What `merge run` checks before it opens an input is checked
here: the YAML, the schema (keys, models/slices/modules, layer ranges, tokenizer and chat template sections),
the method, parameter names, the type and range of every value written, the number of inputs. What needs
the models (shapes, tensor names, configs, that the paths exist) is left to `merge plan` / `merge run
--dry-run`, and cross-parameter rules a method checks per tensor (with the resolved values) too.

Files of several YAML documents (mergekit-multi's multi-stage merges) have each document checked as a
spec: a later stage may name an earlier one as a model. mergekit-moe files (``experts:``) have their keys
and values checked. Neither kind is merged by `merge run` yet: a note says so, and it is no problem (exit 0).

Output: one line per problem, ``FILE: YAML.path: what (hint)``, on stdout; exit 0 when every spec is fine,
2 otherwise.
"""

from __future__ import annotations

import re
import sys
from typing import Any, Optional

import click

from ..errors import MergeError, SpecError, did_you_mean
from .common import common_options

DOCUMENT_START = re.compile(r"^---(?:[ \t].*)?$", re.MULTILINE)
MOE_KEYS = ("base_model", "experts", "gate_mode", "dtype", "experts_per_token", "shared_experts", "architecture",
            "tokenizer_source", "tokenizer", "chat_template", "name")
EXPERT_KEYS = ("source_model", "positive_prompts", "negative_prompts", "noise_scale", "residual_scale")
GATE_MODES = ("hidden", "cheap_embed", "random", "uniform_random")
MULTI_STAGE = "multi-stage files are not supported by merge run yet; run each stage as its own spec"
MOE = "MoE files (mergekit-moe) are not supported by merge run yet"


@click.command()
@click.argument("specs", nargs=-1, required=True, type=click.Path(dir_okay=False))
@common_options
def check(specs: tuple[str, ...], quiet: bool) -> None:
    """Check merge specs (single merges, multi-stage files, MoE files) without opening any model.

    One line per problem, `FILE: YAML.path: what (hint)`; exit 0 when all are fine, 2 otherwise.
    """
    problems = 0
    for path in specs:
        found, notes = check_file(path)
        problems += len(found)
        for line in found:
            click.echo(line)
        for note in notes if not quiet else ():
            click.echo(f"{path}: note: {note}", err=True)
        if not found and not quiet:
            click.echo(f"{path}: ok", err=True)
    if problems:
        sys.exit(2)


def check_file(path: str) -> tuple[list[str], list[str]]:
    """(problem lines, notes) of one spec file."""
    from ..spec.safe_yaml import read_spec_file

    try:
        text = read_spec_file(path)
    except MergeError as exc:
        return [_line(exc, path)], []
    documents = [part for part in DOCUMENT_START.split(text) if part.strip() and part.strip() != "..."]
    if len(documents) <= 1:
        return check_document(text, path, None)
    problems, notes, names = [], [MULTI_STAGE], set()
    for i, part in enumerate(documents):
        found, more = check_document(part, path, f"document {i + 1}", names)
        problems += found
        notes += [note for note in more if note not in notes]
    return problems, notes


def check_document(text: str, path: str, label: Optional[str], names: Optional[set] = None
                   ) -> tuple[list[str], list[str]]:
    from ..plan.planner import check_spec
    from ..spec.safe_yaml import load_yaml
    from ..spec.schema import parse_spec

    file = f"{path} ({label})" if label else path
    try:
        data = load_yaml(text, file)
        if names is not None:
            _stage_name(data, names, file)
        if isinstance(data, dict) and ("experts" in data or "gate_mode" in data):
            check_moe(data, file)
            return [], [MOE]
        warnings = check_spec(parse_spec(data, text=text, file=file))
    except MergeError as exc:
        return [_line(exc, file)], []
    return [], warnings


def _stage_name(data: Any, names: set, file: str) -> None:
    """A multi-stage document's ``name``: unique, and at most one document without one (as mergekit-multi)."""
    name = data.get("name") if isinstance(data, dict) else None
    if name in names:
        raise SpecError("two stages have this name" if name is not None else "more than one stage has no name",
                        where="name", file=file, hint="give every stage of a multi-stage file its own name:")
    names.add(name)


def check_moe(data: dict, file: str) -> None:
    """The keys and values of a mergekit-moe file (mergekit/moe/config.py: MoEMergeConfig)."""
    from ..dtypes import parse_dtype
    from ..spec.references import parse_reference

    def fail(what: str, where: str, hint: Optional[str] = None) -> SpecError:
        return SpecError(what, where=where, file=file, hint=hint)

    _keys(data, MOE_KEYS, "", fail)
    if data.get("base_model") is None:
        raise fail("base_model is missing", "base_model", "a MoE merge starts from base_model: <folder or org/name>")
    parse_reference(data["base_model"], "base_model")
    for key in ("experts", "shared_experts"):
        if key == "experts" or data.get(key) is not None:
            _experts(data.get(key), key, fail)
    gate = data.get("gate_mode", "hidden")
    if gate not in GATE_MODES:
        raise fail(f"unknown gate_mode {gate!r}." + did_you_mean(str(gate), GATE_MODES), "gate_mode",
                   "one of: " + ", ".join(GATE_MODES))
    per_token = data.get("experts_per_token", 2)
    if type(per_token) is not int or not 1 <= per_token <= len(data["experts"]):
        raise fail(f"experts_per_token must be an integer from 1 to the number of experts "
                   f"({len(data['experts'])}), got {per_token!r}", "experts_per_token")
    if data.get("dtype") is not None:
        try:
            parse_dtype(str(data["dtype"]))
        except ValueError as exc:
            raise fail(str(exc), "dtype") from None


def _experts(node: Any, key: str, fail) -> None:
    from ..spec.references import parse_reference

    if not isinstance(node, list) or not node:
        raise fail("expected a non-empty list of experts", key, "each expert: {source_model: ..., positive_prompts: [...]}")
    for i, expert in enumerate(node):
        where = f"{key}[{i}]"
        if not isinstance(expert, dict):
            raise fail("expected a mapping", where)
        _keys(expert, EXPERT_KEYS, where, fail)
        if expert.get("source_model") is None:
            raise fail("'source_model' is missing", where, "each expert needs source_model: <folder or org/name>")
        parse_reference(expert["source_model"], f"{where}.source_model")
        for prompts in ("positive_prompts", "negative_prompts"):
            value = expert.get(prompts)
            if value is not None and not (isinstance(value, list) and all(isinstance(p, str) for p in value)):
                raise fail("expected a list of strings", f"{where}.{prompts}")
        for number in ("noise_scale", "residual_scale"):
            value = expert.get(number)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise fail(f"expected a number, got {value!r}", f"{where}.{number}")


def _keys(node: dict, allowed: tuple[str, ...], where: str, fail) -> None:
    for key in node:
        if key not in allowed:
            raise fail("unknown key." + did_you_mean(str(key), allowed), f"{where}.{key}" if where else str(key),
                       "allowed here: " + ", ".join(allowed))


def _line(exc: MergeError, file: str) -> str:
    """One line: ``FILE: YAML.path: what (hint)``."""
    head = ": ".join(part for part in (exc.file or file, exc.where, exc.what) if part)
    return " ".join((head + (f" ({exc.hint})" if exc.hint else "")).split())
