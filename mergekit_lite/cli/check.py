"""``merge check SPEC...``: check merge specs without opening, downloading or even looking for a model.

For config repositories and CI; works offline. What `merge run` checks before it opens an input is checked
here: the YAML, the schema (keys, models/slices/modules, layer ranges, tokenizer and chat template sections),
the method, parameter names, the type and range of every value written, the number of inputs. What needs
the models (shapes, tensor names, configs, that the paths exist) is left to `merge plan` / `merge run
--dry-run`, and cross-parameter rules a method checks per tensor (with the resolved values) too.

Files of several YAML documents (mergekit-multi's multi-stage merges) have each document checked as a
spec: a later stage may name an earlier one as a model; then the graph of stages as `merge run` checks it
(one final stage, no cycle; names are not looked up as folders). mergekit-moe files (``experts:``) have
their keys and values checked. A note says which kind a file is (exit 0).

Every problem of a file is shown, not just the first (spec/problems.py collects them), in document order, at
most LIMIT per file. A spec with ``output: adapter`` is checked as `merge run` reads it (api/adapter_spec.py).

Output: one line per problem, ``FILE: YAML.path: what (hint)``, on stdout; exit 0 when every spec is fine,
2 otherwise.
"""

from __future__ import annotations

import re
import sys
from typing import Any, Optional

import click

from ..errors import MergeError, SpecError
from .common import common_options

DOCUMENT_START = re.compile(r"^---(?:[ \t].*)?$", re.MULTILINE)
MULTI_STAGE = ("a multi-stage file: `merge run FILE OUT` writes each named stage to OUT.stages/NAME, then the "
               "final one to OUT")
MOE = "a mergekit-moe file: run it with `merge moe SPEC OUT`"
ADAPTER = "output: adapter: the models' adapters are combined into one LoRA adapter (docs/adapters.md)"
LIMIT = 50   # problem lines shown per file


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
        for line in found[:LIMIT]:
            click.echo(line)
        if len(found) > LIMIT:
            click.echo(f"{path}: ... and {len(found) - LIMIT} more")
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
    if not problems:
        problems += _stage_graph(text, path)
    return problems, notes


def _stage_graph(text: str, path: str) -> list[str]:
    """The graph of a multi-stage file (spec/stages.py): cycles, the final stage; model names are not looked up."""
    from ..spec.stages import read_stages

    try:
        read_stages(text, path, exists=lambda _: True)
    except MergeError as exc:
        return [_line(exc, path)]
    return []


def check_document(text: str, path: str, label: Optional[str], names: Optional[set] = None
                   ) -> tuple[list[str], list[str]]:
    """(problem lines in document order, notes) of one YAML document."""
    from ..spec.moe import is_moe
    from ..spec.safe_yaml import load_yaml

    file = f"{path} ({label})" if label else path
    try:
        data = load_yaml(text, file)
    except MergeError as exc:
        return [_line(exc, file)], []
    found: list[MergeError] = []
    if names is not None:
        _collect(found, _stage_name, data, names, file)
    if is_moe(data):
        _collect(found, check_moe, data, file)
        notes = [MOE]
    else:
        notes = _collect(found, _check_spec, data, text, file) or []
    order = _document_order(data)
    found.sort(key=lambda exc: _position(exc.where, order))
    return [_line(exc, file) for exc in found], notes if not found else []


def _check_spec(data: Any, text: str, file: str) -> list[str]:
    """The schema, then what `merge run` checks before it opens a model (an adapter output: what it reads of
    the spec); the warnings. Raises SpecProblems with every problem found."""
    from ..plan.planner import check_spec
    from ..spec.problems import SpecProblems
    from ..spec.schema import parse_spec

    found: list[MergeError] = []
    warnings: list[str] = []
    try:
        spec = parse_spec(data, text=text, file=file)
    except SpecProblems as exc:
        found, spec = list(exc.problems), exc.spec
    adapter = spec is not None and spec.raw.get("output") == "adapter"
    if spec is not None and not (adapter and found):   # an adapter output's checks need every model read
        warnings = _collect(found, _check_adapter if adapter else check_spec, spec) or []
    if found:
        raise SpecProblems(found)
    return warnings


def _check_adapter(spec: Any) -> list[str]:
    from ..api.adapter_spec import adapter_combination

    adapter_combination(spec)
    return [ADAPTER]


def _collect(found: list, check, *args: Any) -> Any:
    """``check(*args)``, its problems added to ``found`` (all of a SpecProblems); None when it raised."""
    from ..spec.problems import SpecProblems

    try:
        return check(*args)
    except SpecProblems as exc:
        found += exc.problems
    except MergeError as exc:
        found.append(exc)
    return None


def _document_order(data: Any, prefix: str = "", order: Optional[dict] = None) -> dict[str, int]:
    """Each YAML path of the document, numbered in the order it is written."""
    order = {} if order is None else order
    if prefix:
        order.setdefault(prefix, len(order))
    if isinstance(data, dict):
        for key, value in data.items():
            _document_order(value, f"{prefix}.{key}" if prefix else str(key), order)
    elif isinstance(data, list):
        for i, value in enumerate(data):
            _document_order(value, f"{prefix}[{i}]", order)
    return order


def _position(where: Optional[str], order: dict[str, int]) -> int:
    """Where a YAML path is in the document (its longest written prefix); a problem of the whole file first."""
    path = (where or "").split(": ")[0]
    while path:
        if path in order:
            return order[path]
        cut = max(path.rfind("."), path.rfind("["))
        path = path[:cut] if cut > 0 else ""
    return -1 if not where else len(order)


def _stage_name(data: Any, names: set, file: str) -> None:
    """A multi-stage document's ``name``: unique, and at most one document without one (as mergekit-multi)."""
    name = data.get("name") if isinstance(data, dict) else None
    if name in names:
        raise SpecError("two stages have this name" if name is not None else "more than one stage has no name",
                        where="name", file=file, hint="give every stage of a multi-stage file its own name:")
    names.add(name)


def check_moe(data: dict, file: str) -> None:
    """The keys and values of a mergekit-moe file (spec/moe.py, which `merge moe` reads with)."""
    from ..spec.moe import parse_moe

    parse_moe(data, file=file)


def _line(exc: MergeError, file: str) -> str:
    """One line: ``FILE: YAML.path: what (hint)``."""
    head = ": ".join(part for part in (exc.file or file, exc.where, exc.what) if part)
    return " ".join((head + (f" ({exc.hint})" if exc.hint else "")).split())
