"""The non-tensor files of an output folder: shard index, config.json, tokenizer, the spec, the card."""

from __future__ import annotations

import json
import os

from ..plan.planner import MergePlan
from ..sources.checkpoint import contained_path
from ..sources.user_files import check_copyable, read_copyable
from ..spec.references import ModelPath
from .card import card_text
from .folder import write_new
from .writer import INDEX_NAME, WrittenShards

# Copied from the tokenizer source as they are: tokenizer, chat template and generation defaults.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "spiece.model",
                   "chat_template.jinja", "chat_template.json", "generation_config.json")


def check_tokenizer_files(plan: MergePlan) -> None:
    """Refuse a tokenizer file that is a link out of its model folder before the merge starts: copied into the
    output (and perhaps published), it could carry any file the user can read."""
    if plan.tokenizer_folder:
        for filename in TOKENIZER_FILES:
            if os.path.lexists(os.path.join(plan.tokenizer_folder, filename)):
                check_copyable(contained_path(plan.tokenizer_folder, filename, plan.tokenizer_folder), plan.tokenizer_folder)


def write_companions(plan: MergePlan, folder: str, shards: WrittenShards, name: str) -> None:
    if len(shards.files) > 1:
        index = {"metadata": {"total_size": shards.total_size}, "weight_map": dict(sorted(shards.weight_map.items()))}
        _write_text(os.path.join(folder, INDEX_NAME), json.dumps(index, indent=2) + "\n")
    if plan.config:
        _write_text(os.path.join(folder, "config.json"), json.dumps(plan.config, indent=2) + "\n")
    if plan.tokenizer_folder:
        for filename in TOKENIZER_FILES:
            source = os.path.join(plan.tokenizer_folder, filename)
            if os.path.isfile(contained_path(plan.tokenizer_folder, filename, plan.tokenizer_folder)):
                write_new(os.path.join(folder, filename), read_copyable(source), replace=True)   # checked above
    _write_text(os.path.join(folder, "mergekit_config.yml"), plan.spec.text.rstrip() + "\n")
    spec = plan.spec
    models = [m.ref for m in spec.models or ()] or [s.ref for p in spec.slices or () for s in p.sources]
    base = spec.base_model
    card = card_text(name, plan.strategy.title, plan.strategy.paper, [m for m in models if m != base], base,
                     spec.text, notes=tuple(plan.card_notes), commits=_commits(plan))
    _write_text(os.path.join(folder, "README.md"), card)


def _commits(plan: MergePlan) -> dict[ModelPath, str]:
    """The Hub commit each input model was read at (a LoRA source, base+adapter, answers with its base's)."""
    commits = {}
    for ref, source in plan.checkpoints.items():
        commit = getattr(getattr(source, "base", source), "commit", None)
        if commit:
            commits[ref.model] = commit
    return commits


def _write_text(path: str, text: str) -> None:
    write_new(path, text.encode("utf-8"), replace=True)   # never through a link planted in the partial folder
