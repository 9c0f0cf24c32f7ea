"""Reading a spec's YAML as untrusted text: plain values only, bounded in size, depth and alias expansion.

Specs are shared like checkpoints are. ``yaml.safe_load`` already refuses tags that build Python objects
(``!!python/object/apply:os.system``), but not the rest of what a hostile file can do: anchors and aliases
that expand a few lines into billions of values (the "billion laughs"), an alias that contains itself,
or nesting deep enough to exhaust the interpreter's stack. This loader measures the composed node graph
before anything is constructed, so each of these fails fast with a SpecError that says which limit it hit.

A key written twice in one mapping (``merge_method: ties`` ... ``merge_method: task_arithmetic``, or
``{weight: 1, weight: 2}``) is refused, naming both lines: YAML loaders keep the last value without a word,
so the spec would run with a value its author may not have meant. Keys that collapse into one Python key
(``1`` and ``1.0``, ``true`` and ``1``) count as the same key. YAML's merge key is allowed as the YAML spec
defines it, because shared parameter blocks are written that way: a key written beside ``<<: *defaults``
overrides the merged value. Refused there: ``<<`` written twice in one mapping (merge a list instead), and a
key that two mappings of one ``<<: [*a, *b]`` both set, unless it is also written beside the ``<<``: the YAML
spec lets the first mapping win, PyYAML 6.0.4 (which mergekit uses) the last, so the spec would mean two things.

The spec file itself is read by ``read_spec_file``: a regular file of at most MAX_SPEC_BYTES, opened without
blocking (a FIFO would wait forever for a writer; a device would never end).
"""

from __future__ import annotations

import sys
from typing import Any, Optional

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from ..errors import SpecError

MAX_SPEC_BYTES = 4 << 20      # a real spec is a few kilobytes; a 4 MiB one would already take seconds to parse
MAX_VALUES = 100_000          # values after expanding aliases (a 200-model spec with filters has a few thousand)
MAX_DEPTH = 32                # nesting after expanding aliases (real specs nest about 10 deep)
MAX_INT_DIGITS = getattr(sys.int_info, "default_max_str_digits", 4300)   # beyond it, int() is quadratic
HINT = "a spec holds plain values: strings, numbers, booleans, lists and mappings"


class _Limit(Exception):
    def __init__(self, what: str, node: Node):
        super().__init__(what)
        self.what = what
        self.node = node


class _Refused(Exception):
    def __init__(self, what: str, node: Node, hint: str):
        super().__init__(what)
        self.what, self.node, self.hint = what, node, hint


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
        value = node.value if isinstance(node.value, str) else ""
        digits = len(value.lstrip("+-").replace("_", ""))
        if node.tag == "tag:yaml.org,2002:int" and digits > MAX_INT_DIGITS:   # int() is quadratic in digits
            raise _Refused(f"the integer {_short(value)} has {digits:,} digits, more than the {MAX_INT_DIGITS:,} "
                            "read", node, "a merge parameter is a small number; check that line")
        try:
            return super().construct_object(node, deep)
        except (ValueError, TypeError, AttributeError, OverflowError) as exc:
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read {_short(value)} as {node.tag.removeprefix('tag:yaml.org,2002:')} "
                f"({type(exc).__name__})", node.start_mark) from None

    def compose_document(self) -> Node:
        node = super().compose_document()
        _measure(node)
        self._keys: dict[int, dict[Any, Node]] = {}
        for mapping in _mappings(node):
            self._effective_keys(mapping)
        return node

    def _effective_keys(self, mapping: MappingNode) -> dict[Any, Node]:
        """{key: the node that sets it} for a mapping with its merge keys applied, refusing a key written twice
        and a key that two merged mappings set (the YAML spec lets the first win; PyYAML 6.0.4, which mergekit
        uses too, the last; PyYAML 5 the first). Works on the composed nodes, before PyYAML's merging rewrites
        them; keys are compared as the values a dict holds them by. The measured depth bounds the recursion."""
        if id(mapping) in self._keys:
            return self._keys[id(mapping)]
        explicit, merge = self._written_keys(mapping)
        merged: dict[Any, Node] = {}
        sources = merge[1].value if merge and isinstance(merge[1], SequenceNode) else [merge[1]] if merge else []
        for source in sources:
            if not isinstance(source, MappingNode):
                continue   # PyYAML refuses it when it builds the mapping
            for key, node in self._effective_keys(source).items():
                first = merged.setdefault(key, node)
                if first is not node and key not in explicit:
                    raise _Refused(f"the key {_short(str(node.value))} is set by two of the mappings merged here, "
                                   f"{_both(first, node)}, and YAML readers disagree on which one wins", merge[0],
                                   "set it in only one of them, or write it beside the << key, which overrides both")
        self._keys[id(mapping)] = {**merged, **explicit}
        return self._keys[id(mapping)]

    def _written_keys(self, mapping: MappingNode) -> tuple[dict[Any, Node], Optional[tuple[Node, Node]]]:
        """({key: its node} as written, refusing one written twice; the merge key's (key, value) nodes)."""
        seen: dict[Any, Node] = {}
        merge: Optional[tuple[Node, Node]] = None
        for key_node, value_node in mapping.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                if merge is not None:
                    raise _Refused(f"the merge key '<<' is written twice in one mapping, {_both(merge[0], key_node)}",
                                   key_node, "merge several mappings with one key: <<: [*first, *second]")
                merge = (key_node, value_node)
                continue
            if not isinstance(key_node, ScalarNode):
                continue
            key = self.construct_object(key_node)
            try:
                first = seen.setdefault(key, key_node)
            except TypeError:   # unhashable: PyYAML refuses it when it builds the mapping
                continue
            if first is not key_node:
                raise _Refused(f"the key {_short(key_node.value)} is written twice in one mapping, "
                               f"{_both(first, key_node)}", key_node,
                               "YAML would silently keep only the last value: delete the one you do not mean")
        return seen, merge


def load_yaml(text: str, file: Optional[str]) -> Any:
    """Parse one YAML document of plain values, or raise a SpecError naming the line and the problem."""
    if len(text) > MAX_SPEC_BYTES:
        raise SpecError(f"the spec is {len(text):,} characters long, more than the {MAX_SPEC_BYTES:,} allowed",
                        file=file, hint="a merge spec is a few kilobytes; check that this is the right file")
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader with limits
    except _Refused as exc:
        raise SpecError(exc.what, where=_line(exc.node.start_mark), file=file, hint=exc.hint) from None
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


def read_spec_file(path: str) -> str:
    """The text of the spec file at ``path`` (at most MAX_SPEC_BYTES + 1 characters: load_yaml refuses more), or
    a SpecError. Opened without blocking and checked to be a regular file, so a FIFO or a device given as the
    spec is refused instead of waited on or read without end. Messages as schema.load_spec has always given."""
    from ..safetensors_format import open_regular  # here: it loads torch, which reading YAML text does not need

    try:
        with open(open_regular(path), encoding="utf-8") as f:
            return f.read(MAX_SPEC_BYTES + 1)
    except OSError as exc:
        raise SpecError(f"cannot read the spec: {exc.strerror or exc}", file=path,
                        hint="check the path of the YAML file") from None
    except UnicodeDecodeError as exc:
        raise SpecError(f"the spec is not UTF-8 text (byte {exc.start})", file=path,
                        hint="check that this is the YAML file of the merge") from None


def _both(first: Node, second: Node) -> str:
    """'at lines 1 and 7', or 'at line 4, columns 20 and 31' for two keys on one line (a flow mapping)."""
    a, b = first.start_mark, second.start_mark
    if a.line == b.line:
        return f"at line {a.line + 1}, columns {a.column + 1} and {b.column + 1}"
    return f"at lines {a.line + 1} and {b.line + 1}"


def _mappings(root: Node) -> list[MappingNode]:
    """Every mapping node of the document once (aliases share nodes), found without recursion."""
    found: list[MappingNode] = []
    seen: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, MappingNode):
            found.append(node)
        stack.extend(_children(node))
    return found


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
