"""The user documentation runs as written, and stays a user guide.

Every ```yaml block holding a ``merge_method:`` in README.md and docs/*.md is merged against tiny demo models,
and every ```python block is executed, in a folder laid out like the repository after ``make demo``
(``demo/models/...``, ``demo/adapters/...``, ``merge_configs/``, and the demo merge in ``demo/merged``).

A block that cannot run here (it needs the real Hugging Face Hub, a token or a GPU) is marked in the Markdown
by an HTML comment on the line just before its opening fence, which readers do not see:

    <!-- not run: needs the Hub -->
    ```python
    ...

The text after "not run:" is the reason, shown as the skip message. Blocks of other languages (bash, text,
toml) are not run here.

Also: README.md stays at most 300 lines, and no user-facing page mentions issue numbers, work sessions or
paths outside the repository.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from mergekit_lite import load_spec, run_merge
from mergekit_lite.strategies.registry import all_strategies
from mergekit_lite.testing.adapters import write_demo_adapters
from mergekit_lite.testing.synthetic import LlamaShape, write_demo_models

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
USER_TEXT = [*PAGES, REPO / "CONTRIBUTING.md"]
README_MAX_LINES = 300

# A fenced block: the line before it (for the marker), its language, its text.
FENCE = re.compile(r"(?:^|\n)(?P<before>[^\n]*)\n```(?P<lang>[\w+-]*)[^\n]*\n(?P<body>.*?)\n```", re.S)
NOT_RUN = re.compile(r"<!--\s*not run:\s*(?P<reason>.*?)\s*-->")


def blocks(path: Path, language: str) -> list[tuple[str, str, str | None]]:
    """The ```language blocks of a page as (id, text, reason not to run or None), ids like "docs/lora.md-2"
    (1-based among the page's blocks of that kind)."""
    text = "\n" + path.read_text()
    name = path.relative_to(REPO).as_posix()
    found = []
    for match in FENCE.finditer(text):
        if match["lang"] != language:
            continue
        marker = NOT_RUN.search(match["before"])
        found.append((match["body"] + "\n", marker["reason"] if marker else None))
    return [(f"{name}-{i}", body, reason) for i, (body, reason) in enumerate(found, 1)]


SPECS = [block for page in PAGES for block in blocks(page, "yaml") if "merge_method:" in block[1]]
SNIPPETS = [block for page in PAGES for block in blocks(page, "python")]


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    """A folder laid out like the repository root after `make demo`: tiny demo models, their LoRA adapters,
    the example specs, and the demo merge in demo/merged."""
    shape = LlamaShape(hidden=64, intermediate=128, layers=6, heads=4, kv_heads=2, vocab=256)
    root = tmp_path_factory.mktemp("docs-demo")
    write_demo_models(str(root / "demo" / "models"), shape, max_shard_size=60_000)
    write_demo_adapters(str(root / "demo" / "adapters"), shape)
    shutil.copytree(REPO / "merge_configs", root / "merge_configs")
    return root


@pytest.fixture
def workdir(demo_root, tmp_path, monkeypatch) -> Path:
    """A fresh copy of demo_root with the demo merge done, as the current directory: snippets may write into
    demo/ without one test seeing another's outputs."""
    shutil.copytree(demo_root / "demo", tmp_path / "demo")
    (tmp_path / "merge_configs").symlink_to(demo_root / "merge_configs", target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    run_merge("merge_configs/demo.yaml", "demo/merged", progress=False, validate=False)
    return tmp_path


def test_there_are_snippets():
    assert len(PAGES) > 1 and SPECS and SNIPPETS


@pytest.mark.parametrize("ident, text, reason", SPECS, ids=[ident for ident, _, _ in SPECS])
def test_spec_runs(ident, text, reason, demo_root, monkeypatch):
    if reason:
        pytest.skip(reason)
    spec = load_spec(text)
    assert spec.merge_method in all_strategies(), f"{ident}: unknown method {spec.merge_method}"
    monkeypatch.chdir(demo_root)
    out = demo_root / "out" / ident.replace("/", "_")
    result = run_merge(text, out, progress=False, overwrite=True)
    assert result.tensors > 0 and any(out.glob("*.safetensors"))
    assert result.validation is None or result.validation.passed, f"{ident}: {result.validation}"


@pytest.mark.parametrize("ident, text, reason", SNIPPETS, ids=[ident for ident, _, _ in SNIPPETS])
def test_python_snippet_runs(ident, text, reason, workdir):
    if reason:
        pytest.skip(reason)
    exec(compile(text, ident, "exec"), {"__name__": "__snippet__"})


# ---------------------------------------------------------------------------------------------------------
# The documentation is a user guide


def test_readme_is_short():
    lines = len((REPO / "README.md").read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move details to docs/"


FORBIDDEN = {
    "an issue reference": re.compile(r"\bissues? ?#?\d+|#\d+\b", re.I),
    "work-session history": re.compile(r"\bsessions?\b", re.I),
    "a path outside the repository": re.compile(r"\.\./shared|(?<![\w.])/(?:work|tmp|home|root)/"),
}


@pytest.mark.parametrize("path", USER_TEXT, ids=[p.relative_to(REPO).as_posix() for p in USER_TEXT])
def test_no_private_references(path):
    found = [f"{path.relative_to(REPO).as_posix()}:{number}: {what}: {line.strip()}"
             for number, line in enumerate(path.read_text().splitlines(), 1)
             for what, pattern in FORBIDDEN.items() if pattern.search(line)]
    assert not found, "\n".join(found)


def test_docs_links_resolve():
    """Relative links between the pages point at files that exist."""
    broken = []
    for path in USER_TEXT:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text()):
            if "://" not in target and not (path.parent / target).exists():
                broken.append(f"{path.relative_to(REPO).as_posix()}: {target}")
    assert not broken, broken
