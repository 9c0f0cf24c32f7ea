"""What a push would do, worked out locally: the target, the token's source, the files, the card's metadata.

This is ``merge push --dry-run``, and the first step of every real push, so a push that cannot succeed
(no weights, an incomplete folder, bad card metadata, no token) fails before any request is made. It
makes no network call and never reads the token's value.

Only the model's files are sent: the files a merge reads from a repo (weights, index, config, tokenizer;
see pull.MODEL_PATTERNS), plus the card and the recipe (the spec and the run's settings). Pickles,
hidden files, leftovers of an interrupted merge and anything else in the folder stay local, and the plan
says why.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Optional

import yaml

from ..errors import HubError, MergeError, UsageError
from ..spec.references import REPO_ID
from ..units import format_size
from .card_check import CardCheck, check_card
from .client import AUTH_HINT, endpoint, offline, token_source
from .pull import needed_files

CARD, RECIPE = "README.md", "mergekit_config.yml"
# The run's settings that the spec does not hold (--dtype, --seed, ...), written by `merge run` since validation
# landed (run_settings.RUN_SETTINGS_FILE, not imported: it loads torch). Part of the recipe, so it is sent too.
RUN_SETTINGS = "merge_run.json"
# Suffixes of pickle checkpoints (loading one can run code): never uploaded. checkpoint.PICKLE_SUFFIXES says the
# same for reading; it is not imported because checkpoint.py loads torch, which a push never needs.
PICKLES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
INDEX_SUFFIX = ".safetensors.index.json"


@dataclass(frozen=True)
class FileEntry:
    path: str           # posix path relative to the folder
    size: int
    reason: str = ""    # why it is excluded; "" for a file that is sent


@dataclass
class PushPlan:
    folder: str
    repo_id: str
    endpoint: str
    private: bool
    revision: str
    create_pr: bool
    commit_message: str
    token_source: Optional[str]
    files: list[FileEntry]
    excluded: list[FileEntry]
    card: CardCheck
    warnings: list[str] = field(default_factory=list)
    problems: list[MergeError] = field(default_factory=list)    # each one would make the push fail

    @property
    def url(self) -> str:
        return f"{self.endpoint}/{self.repo_id}"

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def summary(self) -> str:
        """What ``merge push --dry-run`` prints: everything but the token."""
        token = f"found ({self.token_source})" if self.token_source else "MISSING: the push would fail"
        pr = "yes (a pull request against main)" if self.create_pr else "no"
        lines = [
            "DRY RUN: nothing was sent, and no request was made",
            f"target    : {self.url} (model, private={'yes' if self.private else 'account default'}, "
            f"revision={self.revision}, create_pr={pr})",
            "repo      : created if missing; an existing repo keeps its visibility",
            f"token     : {token}",
            f'commit    : "{self.commit_message}"',
            f"files     : {len(self.files)} to upload, {format_size(self.total_bytes)}; {len(self.excluded)} excluded",
            *[f"  {f.path:<40} {format_size(f.size):>10}" + ("  (large: Xet/LFS)" if f.path.endswith(".safetensors")
                                                              else "") for f in self.files],
            *[f"  excluded: {f.path} ({f.reason})" for f in self.excluded],
            f"model card: {self.card.summary()}",
            *[f"warning   : {w}" for w in self.warnings],
            *[f"error     : {p.what}" + (f" ({p.where})" if p.where else "") for p in self.problems],
            "verdict   : " + ("the push would fail (see the errors above)" if self.problems
                              else "ready: run again without --dry-run to push"),
        ]
        return "\n".join(lines)


def check_repo_id(repo_id: str, where: str = "--repo") -> None:
    if not REPO_ID.match(repo_id or "") or len(repo_id.split("/")[1]) > 96 or ".." in repo_id or "--" in repo_id:
        raise UsageError(f"'{repo_id}' is not a Hub repo id", where=where,
                         hint="write namespace/name (your user name or an organization, then the model's name)")


def target_problems(repo_id: str, token: Optional[str] = None) -> list[MergeError]:
    """What stops any push to ``repo_id`` from this machine, known without a request: no token, offline mode."""
    problems: list[MergeError] = []
    if offline():
        problems.append(HubError("HF_HUB_OFFLINE is set, so nothing can be pushed",
                                 hint="unset HF_HUB_OFFLINE (or set it to 0), then re-run"))
    if token_source(token) is None:
        problems.append(HubError("no Hugging Face token found",
                                 hint=AUTH_HINT.format(namespace=repo_id.split("/")[0])))
    return problems


def plan_push(folder: str | os.PathLike, repo_id: str, *, private: bool = False, revision: Optional[str] = None,
              create_pr: bool = False, commit_message: Optional[str] = None,
              token: Optional[str] = None) -> PushPlan:
    folder = os.fspath(folder)
    check_repo_id(repo_id)
    if create_pr and revision not in (None, "main"):
        raise UsageError("--create-pr opens a pull request against main; it cannot be combined with --revision",
                         where="--revision", hint="drop --revision, or push to the branch without --create-pr")
    if not os.path.isdir(folder):
        raise UsageError(f"'{folder}' is not a folder", where="OUT",
                         hint="give the output folder of `merge run` (the one holding *.safetensors)")
    files, excluded = select_files(folder)
    card = check_card(_read_text(os.path.join(folder, CARD)))
    plan = PushPlan(folder, repo_id, endpoint(), private, revision or "main", create_pr,
                    commit_message or default_message(folder), token_source(token), files, excluded, card)
    plan.warnings += card.warnings
    if any(f.reason.startswith("pickle") for f in excluded):
        plan.warnings.append("pickle files present (not uploaded): " +
                             ", ".join(f.path for f in excluded if f.reason.startswith("pickle")))
    plan.problems += _folder_problems(folder, files)
    plan.problems += [HubError(message, where=CARD, hint="fix the front matter of README.md, then re-run")
                      for message in card.errors]
    plan.problems += target_problems(repo_id, token)
    return plan


def select_files(folder: str) -> tuple[list[FileEntry], list[FileEntry]]:
    """Split the folder's files into those a push sends and those it leaves, with the reason."""
    sent, left = [], []
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        for name in sorted(names):
            path = os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
            reason = _exclusion(path)
            (left if reason else sent).append(FileEntry(path, os.path.getsize(os.path.join(root, name)), reason))
    return sent, left


def _exclusion(path: str) -> str:
    parts = path.split("/")
    if any(p.startswith(".") for p in parts):
        return "hidden"
    if any(p.endswith(".partial") for p in parts):
        return "left by an interrupted merge"
    if path.lower().endswith(PICKLES):
        return "pickle (loading one can run code)"
    if len(parts) > 1:
        return "in a subfolder (a merge writes none)"
    if path in (CARD, RECIPE, RUN_SETTINGS) or needed_files([path]):
        return ""
    return "not a model file"


def _folder_problems(folder: str, files: list[FileEntry]) -> list[MergeError]:
    names = {f.path for f in files}
    weights = sorted(n for n in names if n.endswith(".safetensors"))
    if os.path.basename(os.path.normpath(folder)).endswith(".partial"):
        return [UsageError(f"'{folder}' is the unfinished output of a merge", where="OUT",
                           hint="push the final folder (without .partial), after the merge completed")]
    if not weights:
        return [HubError("no *.safetensors weights to upload", where=folder,
                         hint="give the output folder of `merge run`; pickle weights are never uploaded")]
    problems: list[MergeError] = []
    for index in sorted(n for n in names if n.endswith(INDEX_SUFFIX)):
        try:
            with open(os.path.join(folder, index), encoding="utf-8") as f:
                shards = set(json.load(f)["weight_map"].values())
        except (OSError, ValueError, KeyError, AttributeError) as exc:
            problems.append(HubError(f"cannot read the shard index: {exc}", where=index,
                                     hint="re-run the merge; the index must list every tensor's shard"))
            continue
        missing = sorted(shards - names)
        if missing:
            problems.append(HubError(f"the index lists {len(missing)} shard(s) that are not in the folder: "
                                     + ", ".join(missing[:3]), where=index,
                                     hint="the folder is incomplete; re-run the merge"))
    return problems


def default_message(folder: str) -> str:
    """'Upload merged model (linear, 3 models)', from the recipe when there is one."""
    try:
        with open(os.path.join(folder, RECIPE), encoding="utf-8") as f:
            recipe = yaml.safe_load(f)
        method = recipe["merge_method"]
        entries = recipe.get("models") or [s for piece in recipe.get("slices") or () for s in piece["sources"]]
        names = {str(entry["model"]) for entry in entries} | ({str(recipe["base_model"])} if recipe.get("base_model")
                                                             else set())
        return f"Upload merged model ({method}, {len(names)} models)"
    except (OSError, yaml.YAMLError, TypeError, KeyError):
        return "Upload merged model"


def _read_text(path: str) -> Optional[str]:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        return None

