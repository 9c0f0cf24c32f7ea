"""The model card (README.md) of a merged model, with front matter the Hub understands.

``base_model`` lists Hub ids only (a local path there would break the Hub's model tree), and
``base_model_relation: merge`` puts the result under "Merges" of its parents.
"""

from __future__ import annotations

from typing import Optional, Union

import yaml

from .. import __version__
from ..spec.references import ModelPath, ModelRef

Model = Union[ModelPath, ModelRef]


def card_text(name: str, method_title: str, paper: Optional[str], models: list[Model],
              base: Optional[Model], spec_text: str, tags: tuple[str, ...] = ("merge", "mergekit", "mergekit-lite"),
              notes: tuple[str, ...] = (), commits: Optional[dict[ModelPath, str]] = None) -> str:
    """``commits`` pins each Hub input to the commit that was merged (its revision may be a moving branch)."""
    commits = commits or {}
    paths = [p for m in [*([base] if base else []), *models] for p in _paths(m)]
    hub_ids = list(dict.fromkeys(p.repo_id for p in paths if p.repo_id))
    meta: dict = {}
    if hub_ids:
        meta["base_model"] = hub_ids
        meta["base_model_relation"] = "merge"
    meta["library_name"] = "transformers"
    meta["tags"] = list(tags)
    method = f"[{method_title}]({paper})" if paper else method_title
    lines = [
        "---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---",
        f"# {name}", "",
        f"This is a merge of pre-trained language models created with mergekit_lite {__version__}.", "",
        "## Merge details", "",
        f"Method: {method}" + (f", with {_link(base, commits)} as the base." if base else "."), "",
        "Models merged:", "",
        *[f"- {_link(m, commits)}" for m in models], "",
        *([*notes, ""] if notes else []),
        "## Configuration", "",
        "The following spec produced this model (`merge run` of mergekit_lite, and mergekit-compatible):", "",
        "```yaml", spec_text.rstrip(), "```", "",
    ]
    return "\n".join(lines)


def _paths(model: Model) -> list[ModelPath]:
    """The model and, for ``base+adapter``, its adapters: all of them are parents of the output."""
    return [model.model, *(a.path for a in model.adapters)] if isinstance(model, ModelRef) else [model]


def _link(path: Model, commits: dict[ModelPath, str]) -> str:
    if isinstance(path, ModelRef):
        adapters = "".join(f" + LoRA adapter {_link(a.path, commits)}" +
                           (f" (weight {a.weight:g})" if a.weight != 1 else "") for a in path.adapters)
        return _link(path.model, commits) + adapters
    if path.repo_id:
        pins = [f"revision `{path.revision}`"] if path.revision and path.revision != commits.get(path) else []
        pins += [f"commit `{commits[path]}`"] if path in commits else []
        pinned = f" ({', '.join(pins)})" if pins else ""
        return f"[{path.repo_id}](https://huggingface.co/{path.repo_id}){pinned}"
    return f"`{path.path}` (local)"
