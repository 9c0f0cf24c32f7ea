"""The model card (README.md) of a merged model, with front matter the Hub understands.

``base_model`` lists Hub ids only (a local path there would break the Hub's model tree), and
``base_model_relation: merge`` puts the result under "Merges" of its parents.

Nothing the user wrote can change the card's structure: the front matter holds only strict Hub ids (as
YAML), the spec sits in a code block whose fence is longer than any run of backticks in it (CommonMark's
rule, so no line of the spec can close it), and names and paths are printed on one line, in code spans.
"""

from __future__ import annotations

import re
from typing import Optional, Union

import yaml

from .. import __version__
from ..spec.references import REPO_ID, ModelPath, ModelRef

Model = Union[ModelPath, ModelRef]


def card_text(name: str, method_title: str, paper: Optional[str], models: list[Model],
              base: Optional[Model], spec_text: str, tags: tuple[str, ...] = ("merge", "mergekit", "mergekit-lite"),
              notes: tuple[str, ...] = (), commits: Optional[dict[ModelPath, str]] = None,
              recipe: Optional[str] = None) -> str:
    """``commits`` pins each Hub input to the commit that was merged (its revision may be a moving branch);
    ``recipe``, a multi-stage file whose final stage this is, is shown whole instead of the spec."""
    commits = commits or {}
    fold = _fold_of(method_title, models, base)
    if fold is not None:   # a fold speaks of a fold, and shows a spec mergekit reads too when one can say it
        method_title, paper = "LoRA fold", None
        spec_text = _mergekit_fold_spec(fold, spec_text) or spec_text
    paths = [p for m in [*([base] if base else []), *models] for p in _paths(m)]
    hub_ids = list(dict.fromkeys(p.repo_id for p in paths if _hub_id(p)))
    meta: dict = {}
    if hub_ids:
        meta["base_model"] = hub_ids
        meta["base_model_relation"] = "merge"
    meta["library_name"] = "transformers"
    meta["tags"] = list(tags)
    method = f"[{method_title}]({paper})" if paper else method_title
    shown = recipe if recipe is not None else spec_text
    fence = "`" * max(3, _longest_backtick_run(shown) + 1)
    produced = ("The following multi-stage spec produced this model, as its final stage (the document without a "
                "name); each named stage was merged first (`merge run` of mergekit_lite, and mergekit-multi-"
                "compatible):" if recipe is not None else
                "The following spec produced this model (`merge run` of mergekit_lite, and mergekit-compatible):")
    lines = [
        "---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---",
        f"# {_one_line(name)}", "",
        *(_fold_lines(fold, commits) if fold is not None else [
            f"This is a merge of pre-trained language models created with mergekit_lite {__version__}.", "",
            "## Merge details", "",
            f"Method: {method}" + (f", with {_link(base, commits)} as the base." if base else "."), "",
            "Models merged:", "",
            *[f"- {_link(m, commits)}" for m in models], ""]),
        *([*map(_one_line, notes), ""] if notes else []),
        "## Configuration", "",
        produced, "",
        f"{fence}yaml", shown.rstrip(), fence, "",
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
    if _hub_id(path):
        pins = [f"revision {_code(path.revision)}"] if path.revision and path.revision != commits.get(path) else []
        pins += [f"commit {_code(commits[path])}"] if path in commits else []
        pinned = f" ({', '.join(pins)})" if pins else ""
        return f"[{path.repo_id}](https://huggingface.co/{path.repo_id}){pinned}"
    return f"{_code(path.path)} (local)"


def _hub_id(path: ModelPath) -> bool:
    """A Hub id the card may name as such: the whole string, so 'org/a\\n' (which REPO_ID's '$' lets through)
    is not one."""
    return bool(path.repo_id and REPO_ID.fullmatch(path.repo_id))


def _one_line(text: str) -> str:
    """``text`` on one line: line breaks and other control characters escaped (\\n), as Python writes them."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _longest_backtick_run(text: str) -> int:
    return max((len(run) for run in re.findall(r"`+", text)), default=0)


def _code(text: str) -> str:
    """A code span holding ``text`` as it is: delimited by more backticks than any run inside, padded with
    spaces when it holds one (CommonMark strips one space on each side)."""
    text = _one_line(text)
    ticks = _longest_backtick_run(text)
    return f"`{text}`" if ticks == 0 else f"{'`' * (ticks + 1)} {text} {'`' * (ticks + 1)}"


def _fold_of(method_title: str, models: list[Model], base: Optional[Model]) -> Optional[ModelRef]:
    """The one model carrying adapters of a fold (a passthrough of base+adapters), else None."""
    if base is None and len(models) == 1 and isinstance(models[0], ModelRef) and models[0].adapters \
            and method_title.lower().startswith("passthrough"):
        return models[0]
    return None


def _fold_lines(fold: ModelRef, commits: dict[ModelPath, str]) -> list[str]:
    return [f"This is {_link(fold.model, commits)} with LoRA adapters folded into its weights "
            f"(W + scale * B A, as peft's merge_and_unload), created with mergekit_lite {__version__}.", "",
            "## Fold details", "", f"Base model: {_link(fold.model, commits)}", "", "Adapters, folded in order:", "",
            *[f"- {_link(a.path, commits)}" + (f" (weight {a.weight:g})" if a.weight != 1 else "")
              for a in fold.adapters], ""]


def _mergekit_fold_spec(fold: ModelRef, spec_text: str) -> Optional[str]:
    """mergekit's own form of a fold, ``model: base+adapter`` (one adapter at full weight: mergekit has no
    syntax for more); None when the fold needs mergekit_lite's form."""
    adapter = fold.adapters[0]
    if len(fold.adapters) != 1 or adapter.weight != 1 or fold.tied_embeddings != "untie" or not adapter.check_base:
        return None
    base, lora = str(fold.model), str(adapter.path)
    if "+" in base or "+" in lora:   # mergekit splits the reference at '+'
        return None
    spec = {"merge_method": "passthrough", "models": [{"model": f"{base}+{lora}"}]}
    out_dtype = (yaml.safe_load(spec_text) or {}).get("out_dtype")
    if out_dtype:
        spec["out_dtype"] = out_dtype
    return yaml.safe_dump(spec, sort_keys=False)
