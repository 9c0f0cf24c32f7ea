"""Was this adapter made for this base? Checking ``base_model_name_or_path`` against the base we were given.

peft folds an adapter into any base whose shapes fit, and shapes do not tell Llama-3-8B from its instruct
fine-tune. The adapter's config names the model it was trained on, as a Hub id or as the local path used at
training time. The rules, from most to least certain:

1. The adapter names no base: nothing to compare.
2. Both sides are known Hub ids (the base given as ``org/name[@rev]``, or a local folder inside the Hub
   cache, ``.../models--org--name/snapshots/<rev>``): they must be equal (case-insensitively), else it is an
   error. A user who means it (a fine-tune of that base, same shapes) sets ``check_base: false``.
3. Otherwise one side is a local path, and paths differ between machines. The same folder (resolved) or the
   same last name (``.../Llama-3-8B`` vs ``meta-llama/Llama-3-8B``) passes; anything else is a warning,
   because it cannot be verified either way.

Different revisions on both sides are a warning: a branch name and a commit can name the same files.
"""

from __future__ import annotations

import os
import re
from typing import Optional

from ..errors import ModelError
from ..spec.references import REPO_ID, ModelPath

_HUB_CACHE = re.compile(r"models--([^/\\]+?)--([^/\\]+)[/\\]snapshots[/\\]")


def check_base(claimed: Optional[str], claimed_revision: Optional[str], base: ModelPath, base_folder: str,
               adapter_label: str) -> Optional[str]:
    """Raise if the adapter names another Hub model than the base; return a warning when it cannot tell."""
    if not claimed:
        return None
    given_id = base.repo_id or _cache_repo_id(base_folder)
    claimed_id = _hub_id(claimed)
    revision_note = None
    if claimed_revision and base.revision and claimed_revision != base.revision:
        revision_note = (f"{adapter_label}: the adapter was trained on revision '{claimed_revision}' of its base, "
                         f"the base given is revision '{base.revision}'")
    if given_id and claimed_id:
        if given_id.lower() != claimed_id.lower():
            raise ModelError(f"the adapter was made for '{claimed}', but the base is '{given_id}'",
                             file=adapter_label,
                             hint="use the base it was trained on; if you mean this base (same shapes, e.g. a "
                                  "fine-tune of it), set check_base: false on the adapter (merge fold: "
                                  "--no-check-base)")
        return revision_note
    if _same_folder(claimed, base_folder) or _last_name(claimed) == _last_name(given_id or base.path):
        return revision_note
    return (f"{adapter_label}: the adapter names '{claimed}' as its base and the base given is '{base}'; "
            "one is a local path, so they cannot be compared. Shapes match, so it is folded; check that this "
            "is the base it was trained on")


def _hub_id(name: str) -> Optional[str]:
    """A Hub repo id, unless the name is (or looks like) a local path."""
    if os.path.isabs(name) or name.startswith((".", "~")) or os.path.exists(name) or not REPO_ID.match(name):
        return None
    return name


def _cache_repo_id(folder: str) -> Optional[str]:
    match = _HUB_CACHE.search(os.path.abspath(folder) + os.sep)
    return f"{match.group(1)}/{match.group(2)}" if match else None


def _same_folder(claimed: str, folder: str) -> bool:
    return os.path.exists(claimed) and os.path.realpath(claimed) == os.path.realpath(folder)


def _last_name(path: str) -> str:
    return os.path.basename(os.path.normpath(path)).lower()
