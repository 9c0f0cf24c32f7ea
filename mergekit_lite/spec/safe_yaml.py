"""Reading a spec's YAML as untrusted text: plain values only, bounded in size, depth and alias expansion.

Specs are shared like checkpoints are. ``yaml.safe_load`` already refuses tags that build Python objects
(``!!python/object/apply:os.system``), but not the rest of what a hostile file can do: anchors and aliases
that expand a few lines into billions of values (the "billion laughs"), an alias that contains itself,
or nesting deep enough to exhaust the interpreter's stack. This loader measures the composed node graph
before anything is constructed, so each of these fails fast with a SpecError that says which limit it hit.
"""

from __future__ import annotations

from typing import Any, Optional

import yaml
from yaml.nodes import MappingNode, Node, SequenceNode

from ..errors import SpecError

MAX_SPEC_BYTES = 4 << 20      # a real spec is a few kilobytes; a 4 MiB one would already take seconds to parse
MAX_VALUES = 100_000          # values after expanding aliases (a 200-model spec with filters has a few thousand)
MAX_DEPTH = 32                # nesting after expanding aliases (real specs nest about 10 deep)
HINT = "a spec holds plain values: strings, numbers, booleans, lists and mappings"


class _Limit(Exception):
    def __init__(self, what: str, node: Node):
        super().__init__(what)
        self.what = what
        self.node = node


class _Loader(yaml.SafeLoader):
    """SafeLoader that checks the composed document before constructing any Python object from it."""

    def compose_node(self, parent: Optional[Node], index: Any) -> Node:
        depth = getattr(self, "_depth", 0) + 1   # the composer recurses: stop before the interpreter's limit
        if depth > MAX_DEPTH:
            raise _Limit(f"the YAML is nested more than {MAX_DEPTH} levels deep", self.peek_event())
        self._depth = depth
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth = depth - 1

    def construct_object(self, node: Node, deep: bool = False) -> Any:
        """A scalar its tag cannot hold (``!!int abc``, ``!!timestamp x``, an integer of 5000 digits) makes
        PyYAML's constructors raise ValueError or worse; report it as a YAML error at its line instead."""
        try:
            return super().construct_object(node, deep)
        except (ValueError, TypeError, AttributeError, OverflowError) as exc:
            value = node.value if isinstance(node.value, str) else ""
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read {_short(value)} as {node.tag.removeprefix('tag:yaml.org,2002:')} "
                f"({type(exc).__name__})", node.start_mark) from None

    def compose_document(self) -> Node:
        node = super().compose_document()
        _measure(node)
        return node


def load_yaml(text: str, file: Optional[str]) -> Any:
    """Parse one YAML document of plain values, or raise a SpecError naming the line and the problem."""
    if len(text) > MAX_SPEC_BYTES:
        raise SpecError(f"the spec is {len(text):,} characters long, more than the {MAX_SPEC_BYTES:,} allowed",
                        file=file, hint="a merge spec is a few kilobytes; check that this is the right file")
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader with limits
    except _Limit as exc:
        raise SpecError(exc.what, where=_line(exc.node.start_mark), file=file,
                        hint="anchors and aliases (&name, *name) may repeat a value, but not expand without bound"
                        if "alias" in exc.what or "expands" in exc.what else HINT) from None
    except yaml.constructor.ConstructorError as exc:
        tag = _tag(exc.problem or "")
        what = f"YAML tag '{tag}' is not allowed" if tag else f"not valid YAML: {exc.problem}"
        raise SpecError(what, where=_line(exc.problem_mark), file=file,
                        hint=HINT + "; tags that build Python objects are refused") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpecError(f"not valid YAML: {problem}", where=_line(mark), file=file,
                        hint="check indentation and quoting around that line") from None


def _short(text: str) -> str:
    return repr(text if len(text) <= 40 else text[:37] + "...")


def _line(mark: Any) -> Optional[str]:
    return f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else None


def _tag(problem: str) -> str:
    """'tag:yaml.org,2002:python/object/apply:os.system' as the user wrote it: '!!python/object/apply:os.system'."""
    start = problem.find("'")
    if start < 0 or "tag" not in problem:
        return ""
    tag = problem[start + 1:problem.rfind("'")]
    return "!!" + tag.removeprefix("tag:yaml.org,2002:") if tag.startswith("tag:yaml.org,2002:") else tag


def _children(node: Node) -> list[Node]:
    if isinstance(node, SequenceNode):
        return list(node.value)
    if isinstance(node, MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def _measure(root: Node) -> None:
    """Count values and depth with aliases expanded, without expanding them: each node is measured once
    (memoized), iteratively (no recursion to exhaust), and a node reached from inside itself is a cycle."""
    measured: dict[int, tuple[int, int]] = {}   # id(node) -> (values, depth)
    open_nodes: set[int] = set()                # started, not finished: the current path
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        if finished:
            kids = [measured[id(kid)] for kid in _children(node)]
            values = 1 + sum(k[0] for k in kids)
            depth = 1 + max((k[1] for k in kids), default=0)
            if values > MAX_VALUES:
                raise _Limit(f"the YAML expands to more than {MAX_VALUES:,} values through aliases", node)
            if depth > MAX_DEPTH:
                raise _Limit(f"the YAML is nested more than {MAX_DEPTH} levels deep through aliases", node)
            measured[key] = (values, depth)
            open_nodes.discard(key)
            continue
        if key in measured:
            continue
        if key in open_nodes:
            raise _Limit("an alias refers to a value that contains it (a cycle)", node)
        open_nodes.add(key)
        stack.append((node, True))
        stack.extend((kid, False) for kid in _children(node) if id(kid) not in measured)
