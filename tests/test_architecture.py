"""The package's architecture, checked from its source: rooms and their ranks, no import cycles, short modules
and functions, few loose modules, a light ``import mergekit_lite``, and a lazy export table that resolves.

Imports are read from the AST of every module under mergekit_lite/: ``import x``, ``from x import y`` and
relative imports at any depth (module level, inside functions and methods), plus ``import_module("literal")``.
"""

from __future__ import annotations

import ast
import functools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parents[1]
ROOT = REPO / "mergekit_lite"
PACKAGE = ROOT.name

# The rooms, bottom-up: a path prefix inside mergekit_lite/ -> its rank. A module may import modules of a lower
# rank or of its own rank (rooms sharing a rank count as one room; the cycle test still forbids loops among them).
ROOMS = {
    "__init__.py": 0,             # the package itself: __version__ and the lazy export table, nothing else
    "errors.py": 0,               # the exception classes
    "dtypes.py": 0,               # dtype names, parsing and sizes
    "units.py": 0,                # byte sizes: parsing and formatting
    "safetensors_format.py": 0,   # the safetensors file format: headers, reads
    "architecture.py": 0,         # model layouts: tensor-name and config-name tables
    "strategy.py": 0,             # the plugin interface: Strategy, Param, TensorContext
    "spec/": 1,                   # the merge spec: schema, safe YAML, model references
    "strategies/": 2,             # the strategy registry, chunks and the built-in merge methods
    "sources/": 3,                # reading checkpoints: safetensors, pickle, open_checkpoint
    "hub/": 4,                    # the Hugging Face Hub: client, pull, push, push plan, card checks
    "lora/": 5,                   # LoRA adapters: config, loading, folding
    "plan/": 6,                   # planning a merge: jobs, parameters, stacking, concat, inputs, shards
    "output/": 7,                 # the output folder: writer, companions, card, run settings, journal
    "engine/": 8,                 # running a plan: loop, compute, pipeline, memory, devices, executors
    "validation/": 9,             # checking a merged output
    "api/": 10,                   # the library entry points: run_merge, fold_lora
    "cli/": 11,                   # the `merge` command
    "testing/": 12,               # synthetic models and adapters for tests and scripts; the library never imports it
    "__main__.py": 12,            # `python -m mergekit_lite`: the CLI entry point
}
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 60
MAX_LOOSE_MODULES = 8
HEAVY = ("torch", "transformers", "huggingface_hub", "peft", "ray")


class Module(NamedTuple):
    path: Path
    tree: ast.Module
    lines: int


class Edge(NamedTuple):
    src: str
    dst: str            # the module that runs: the deepest existing module the import names
    named: str          # the module named in the source (may not exist: a stale import)
    line: int
    typing_only: bool   # under `if TYPE_CHECKING:`


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.cache
def modules() -> dict[str, Module]:
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        found[module_name(path)] = Module(path, ast.parse(text, str(path)), len(text.splitlines()))
    return found


def is_type_checking(test: ast.expr) -> bool:
    return getattr(test, "id", None) == "TYPE_CHECKING" or getattr(test, "attr", None) == "TYPE_CHECKING"


def walk(node: ast.AST, typing_only: bool = False):
    """Every node with whether it sits under `if TYPE_CHECKING:` (such imports never run)."""
    yield node, typing_only
    for field, value in ast.iter_fields(node):
        inner = typing_only or (isinstance(node, ast.If) and field == "body" and is_type_checking(node.test))
        for child in value if isinstance(value, list) else [value]:
            if isinstance(child, ast.AST):
                yield from walk(child, inner)


def existing(name: str) -> str:
    """The deepest module file that `import name` runs (mergekit_lite.a.b.C -> mergekit_lite.a.b)."""
    while name not in modules() and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def package_of(src: str) -> list[str]:
    is_package = modules()[src].path.name == "__init__.py"
    return src.split(".") if is_package else src.split(".")[:-1]


def absolute(src: str, name: str | None, level: int) -> str:
    """`from .a import b` in module src -> the absolute name of `.a` (`from .. import x` climbs one package)."""
    if level == 0:
        return name or ""
    parts = package_of(src)
    base = parts[: len(parts) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def named_by_call(src: str, node: ast.Call) -> list[str]:
    """`import_module("literal")` / `importlib.import_module("literal")`; f-strings are not literal."""
    func = node.func
    if getattr(func, "id", getattr(func, "attr", None)) != "import_module" or not node.args:
        return []
    first = node.args[0]
    if not (isinstance(first, ast.Constant) and isinstance(first.value, str)):
        return []
    name = first.value
    if name.startswith("."):  # relative to the calling module's package (package=__package__)
        level = len(name) - len(name.lstrip("."))
        return [absolute(src, name.lstrip(".") or None, level)]
    return [name]


def named_by(src: str, node: ast.AST) -> list[str]:
    """The module names an import statement or import_module call names; `from pkg import sub` names pkg.sub."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        base = absolute(src, node.module, node.level)
        return [f"{base}.{a.name}" if f"{base}.{a.name}" in modules() else base for a in node.names]
    if isinstance(node, ast.Call):
        return named_by_call(src, node)
    return []


@functools.cache
def edges() -> tuple[Edge, ...]:
    found = []
    for src, module in modules().items():
        for node, typing_only in walk(module.tree):
            for name in named_by(src, node):
                if name == PACKAGE or name.startswith(PACKAGE + "."):
                    found.append(Edge(src, existing(name), name, node.lineno, typing_only))
    return tuple(found)


def runtime_edges() -> list[Edge]:
    # Imports under `if TYPE_CHECKING:` never run, so they make no cycle and climb no rank.
    return [e for e in edges() if not e.typing_only and e.src != e.dst]


def room_of(name: str) -> str | None:
    relative = modules()[name].path.relative_to(ROOT).as_posix()
    return next((room for room in ROOMS if relative.startswith(room)), None)


def where(edge: Edge) -> str:
    return f"{modules()[edge.src].path.relative_to(REPO)}:{edge.line}"


def test_every_module_has_a_room():
    loose = [f"{name} ({m.path.relative_to(REPO)})" for name, m in modules().items() if room_of(name) is None]
    assert not loose, ("modules in no room; move each into a room of ROOMS in tests/test_architecture.py "
                       "(or add a row there if it is a new leaf):\n  " + "\n  ".join(loose))


def test_no_import_climbs_to_a_higher_room():
    climbs = []
    for e in runtime_edges():
        src_room, dst_room = room_of(e.src), room_of(e.dst)
        if src_room and dst_room and ROOMS[dst_room] > ROOMS[src_room]:
            climbs.append(f"{e.src} imports {e.dst} (room {dst_room} [{ROOMS[dst_room]}] above room "
                          f"{src_room} [{ROOMS[src_room]}]) at {where(e)}")
    assert not climbs, ("imports that climb to a higher room; move the code (or the shared piece it needs) "
                        "down, or pass it in from above:\n  " + "\n  ".join(climbs))


def test_internal_imports_name_existing_modules():
    stale = [f"{e.src} imports {e.named}, which is no module (the nearest is {e.dst}) at {where(e)}"
             for e in edges() if e.named not in modules()]
    assert not stale, "imports of modules that do not exist (stale after a move?):\n  " + "\n  ".join(stale)


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: the components of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def shortest_cycle(graph: dict[str, set[str]], start: str, within: set[str]) -> list[str]:
    """The shortest path start -> ... -> start inside one component (breadth first)."""
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for v in frontier:
            for w in sorted(graph[v] & within):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if w not in parent:
                    parent[w] = v
                    following.append(w)
        frontier = following
    return []


def cycles() -> list[str]:
    graph: dict[str, set[str]] = {}
    for e in runtime_edges():
        graph.setdefault(e.src, set()).add(e.dst)
        graph.setdefault(e.dst, set())
    found = []
    for component in strongly_connected(graph):
        paths = {tuple(shortest_cycle(graph, v, set(component))) for v in component}
        rotations = {min(p[i:-1] + p[:i] for i in range(len(p) - 1)) for p in paths}
        found += [" -> ".join((*r, r[0])) for r in sorted(rotations)]
    return found


def test_no_import_cycles():
    found = cycles()
    assert not found, ("import cycles between modules (function-level imports count; TYPE_CHECKING ones do "
                       "not); break each by moving the shared piece down a room:\n  " + "\n  ".join(found))


def function_lengths(tree: ast.AST) -> list[tuple[str, int, int]]:
    """(name, first line, lines) of every def, methods and nested ones too, decorators included."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            found.append((node.name, first, node.end_lineno - first + 1))
    return found


def test_modules_are_short():
    long = [f"{m.path.relative_to(REPO)}: {m.lines} lines" for m in modules().values()
            if m.lines > MAX_MODULE_LINES]
    assert not long, (f"modules over {MAX_MODULE_LINES} lines; split each into a room's smaller modules:\n  "
                      + "\n  ".join(long))


def test_functions_are_short():
    paths = [m.path for m in modules().values()] + [Path(__file__).resolve()]
    long = [f"{path.relative_to(REPO)}:{first} {name}(): {lines} lines"
            for path in paths for name, first, lines in function_lengths(ast.parse(path.read_text("utf-8")))
            if lines > MAX_FUNCTION_LINES]
    assert not long, (f"functions over {MAX_FUNCTION_LINES} lines (def line, decorators included, to the last "
                      "line); split each into named steps:\n  " + "\n  ".join(long))


def test_few_loose_modules():
    loose = sorted(p.name for p in ROOT.glob("*.py"))
    assert len(loose) <= MAX_LOOSE_MODULES, (
        f"{len(loose)} modules loose at the top of {PACKAGE}/ (at most {MAX_LOOSE_MODULES}): {', '.join(loose)}; "
        "move the ones that are not rank-0 leaves into their room's package")


def test_library_never_imports_testing():
    # Every import counts here, TYPE_CHECKING ones too: the library does not know the testing room exists.
    testing = f"{PACKAGE}.testing"
    bad = [f"{e.src} imports {e.named} at {where(e)}" for e in edges()
           if (e.named == testing or e.named.startswith(testing + "."))
           and not (e.src == testing or e.src.startswith(testing + "."))]
    assert not bad, (f"the library imports {testing} (only tests/ and scripts/ may); move what it needs out "
                     "of testing into the library:\n  " + "\n  ".join(bad))


def run_python(code: str) -> str:
    """Run code in a fresh interpreter that imports this checkout's package."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "PYTHONPATH": path},
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, f"python -c {code!r} failed:\n{done.stderr}"
    return done.stdout.strip()


def test_import_is_light():
    out = run_python(f"import {PACKAGE}, sys; print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    assert out == "[]", (f"`import {PACKAGE}` loads {out}; keep {PACKAGE}/__init__.py to __version__ and the "
                         "lazy export table, and import heavy libraries inside the functions that need them")


EXPORTS_CHECK = f"""
import importlib, json, pathlib, {PACKAGE} as package
assert pathlib.Path(package.__file__).resolve().parent == pathlib.Path({str(ROOT)!r}), package.__file__
bad = []
for name, path in package._EXPORTS.items():
    try:
        module = importlib.import_module(path)
    except Exception as error:
        bad.append(f"{{name}} -> {{path}}: the import fails: {{error!r}}")
        continue
    if not hasattr(module, name):
        bad.append(f"{{name}} -> {{path}}: that module has no attribute {{name}}")
print(json.dumps(bad))
"""


def test_lazy_exports_resolve():
    bad = json.loads(run_python(EXPORTS_CHECK).splitlines()[-1])
    assert not bad, (f"stale entries in _EXPORTS of {PACKAGE}/__init__.py; point each at the module that now "
                     "defines the name:\n  " + "\n  ".join(bad))
