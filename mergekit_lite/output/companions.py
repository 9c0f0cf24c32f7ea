"""The non-tensor files of an output folder: shard index, config.json, tokenizer, the spec, the card."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Optional, Sequence

from ..plan.planner import MergePlan
from ..plan.vocabulary import load_tokenizer
from ..sources.checkpoint import contained_path
from ..sources.user_files import check_copyable, read_copyable
from ..spec.references import ModelPath
from .card import card_text
from .chat_template import chat_template_text
from .folder import write_new
from .writer import INDEX_NAME, WrittenShards

# Copied from the tokenizer source as they are: tokenizer, chat template and generation defaults.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "spiece.model",
                   "chat_template.jinja", "chat_template.json", "generation_config.json")


def check_tokenizer_files(plan: MergePlan) -> None:
    """Refuse a tokenizer file that is a link out of its model folder before the merge starts: copied into the
    output (and perhaps published), it could carry any file the user can read."""
    for source, filename in _copied(plan):
        if os.path.lexists(os.path.join(source, filename)):
            check_copyable(contained_path(source, filename, source), source)


def _copied(plan: MergePlan) -> list[tuple[str, str]]:
    """(folder, file name) of the files copied as they are: the tokenizer source's, or only the reference
    model's generation defaults when a tokenizer merge builds the tokenizer."""
    if plan.tokenizer_folder:   # a chat_template of the spec replaces the source's (written by _write_tokenizer)
        stale = ("chat_template.jinja", "chat_template.json") if plan.spec.chat_template else ()
        return [(plan.tokenizer_folder, filename) for filename in TOKENIZER_FILES if filename not in stale]
    return [(plan.reference.folder, "generation_config.json")] if plan.vocabulary is not None else []


def write_companions(plan: MergePlan, folder: str, shards: WrittenShards, name: str, *, tokenizer: bool = True,
                     card: bool = True, code_files: Sequence[tuple[str, str]] = (), recipe: Optional[str] = None
                     ) -> None:
    """``tokenizer``/``card`` False: no tokenizer files / no README.md (mergekit's --no-copy-tokenizer,
    --no-write-model-card); ``code_files``: (folder, name) of a model's own code to copy (remote_code.py);
    ``recipe``: the whole multi-stage file this output is the final stage of, shown on the card."""
    if len(shards.files) > 1:
        index = {"metadata": {"total_size": shards.total_size}, "weight_map": dict(sorted(shards.weight_map.items()))}
        _write_text(os.path.join(folder, INDEX_NAME), json.dumps(index, indent=2) + "\n")
    if plan.config:
        _write_text(os.path.join(folder, "config.json"), json.dumps(plan.config, indent=2) + "\n")
    for source_folder, filename in [*(_copied(plan) if tokenizer else ()), *code_files]:
        source = os.path.join(source_folder, filename)
        if os.path.isfile(contained_path(source_folder, filename, source_folder)):
            write_new(os.path.join(folder, filename), read_copyable(source), replace=True)   # checked above
    if tokenizer:
        _write_tokenizer(plan, folder)
    _write_text(os.path.join(folder, "mergekit_config.yml"), plan.spec.text.rstrip() + "\n")
    if not card:
        return
    spec = plan.spec
    models = list(dict.fromkeys([m.ref for m in spec.all_models()] + [s.ref for p in spec.all_slices()
                                                                       for s in p.sources]))
    base = spec.base_model
    card = card_text(name, plan.strategy.title, plan.strategy.paper, [m for m in models if m != base], base,
                     spec.text, notes=tuple(plan.card_notes), commits=_commits(plan), recipe=recipe)
    _write_text(os.path.join(folder, "README.md"), card)


def _write_tokenizer(plan: MergePlan, folder: str) -> None:
    """A tokenizer merge's built tokenizer, and the spec's chat_template, saved as transformers saves them
    (tokenizer.json, tokenizer_config.json, special_tokens_map.json, chat_template.jinja), over the copied files."""
    tokenizer = plan.vocabulary.tokenizer if plan.vocabulary is not None and not plan.tokenizer_folder else None
    template = chat_template_text(plan)
    if tokenizer is None and template is None:
        return
    if tokenizer is None:   # a copied tokenizer with another chat template: loaded and saved again, as mergekit
        folder_in = plan.tokenizer_folder or plan.reference.folder
        tokenizer = load_tokenizer(folder_in, folder_in)
    if template is not None:
        tokenizer.chat_template = template
    with tempfile.TemporaryDirectory() as saved:
        tokenizer.save_pretrained(saved)
        for filename in sorted(os.listdir(saved)):
            with open(os.path.join(saved, filename), "rb") as handle:
                write_new(os.path.join(folder, filename), handle.read(), replace=True)


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
