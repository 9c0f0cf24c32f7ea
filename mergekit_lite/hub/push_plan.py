"""What a push would do, worked out locally: the target, the token's source, the files, the card's metadata.

This is ``merge push --dry-run``, and the first step of every real push, so a push that cannot succeed
(no weights, an incomplete folder, bad card metadata, no token) fails before any request is made. It
makes no network call and never reads the token's value.

Only the model's files are sent, and only as regular files (push_files.py): weights and their index, config,
tokenizer, the card and the recipe (the spec and the run's settings), each read and scanned for secrets first.
A link or a special file among them, a secret in one, or a *.safetensors file that is not one stops the push,
naming the file. Pickles, hidden files, subfolders, leftovers of an interrupted merge and anything else in the
folder stay local, and the plan lists them with the reason.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Optional, Sequence

from ..errors import HubError, MergeError, UsageError
from ..spec.references import REPO_ID
from ..spec.safe_yaml import load_yaml
from ..units import format_size
from .card_check import FRONT_MATTER, CardCheck, check_card
from .client import AUTH_HINT, endpoint, offline, token_source
from .push_files import CARD, INDEX, RECIPE, FileEntry, check_files, select_files, shown


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
    card_bytes: Optional[bytes] = None   # README.md as sent, when --license/--base-model changed it (in memory)

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
            *[f"  excluded: {shown(f.path)} ({f.reason})" for f in self.excluded],
            f"model card: {self.card.summary()}",
            *[f"warning   : {w}" for w in self.warnings],
            *[f"error     : {p.what}" + (f" ({p.where})" if p.where else "") for p in self.problems],
            "verdict   : " + ("the push would fail (see the errors above)" if self.problems
                              else "ready: run again without --dry-run to push"),
        ]
        return "\n".join(lines)


def check_repo_id(repo_id: str, where: str = "--repo") -> None:
    if not REPO_ID.fullmatch(repo_id or "") or len(repo_id.split("/")[1]) > 96 or ".." in repo_id or "--" in repo_id:
        raise UsageError(f"'{repo_id}' is not a Hub repo id", where=where,
                         hint="write namespace/name (your user name or an organization, then the model's name)")


LICENSE_ID = re.compile(r"[a-z0-9][a-z0-9.+-]{0,63}")   # the Hub's identifiers: apache-2.0, llama3.1, cc-by-4.0


def check_card_options(license: Optional[str], base_models: Sequence[str]) -> None:
    if license is not None and not LICENSE_ID.fullmatch(license):
        raise UsageError(f"'{license}' is not a license identifier of the Hub", where="--license",
                         hint="use the Hub's lowercase id (apache-2.0, mit, llama3.1, cc-by-nc-4.0, ...), or other")
    for model in base_models:
        check_repo_id(model, "--base-model")


def card_metadata(card: bytes, license: Optional[str], base_models: Sequence[str]) -> bytes:
    """README.md with ``license`` set and ``base_models`` added to ``base_model`` (relation: merge), in its
    front matter (added when it has none). A card whose front matter cannot be read is returned as it is
    (the card check reports it)."""
    import yaml

    try:
        text = card.decode("utf-8")
    except UnicodeDecodeError:
        return card
    match = FRONT_MATTER.match(text)
    try:
        meta = load_yaml("\n" + match.group(1), None) if match else {}
    except MergeError:
        return card
    if not isinstance(meta, dict):
        return card
    meta = dict(meta or {})
    if base_models:
        known = meta.get("base_model") or []
        known = known if isinstance(known, list) else [known]
        meta["base_model"] = list(dict.fromkeys([*known, *base_models]))
        meta.setdefault("base_model_relation", "merge")
    if license is not None:
        meta["license"] = license
    body = text[match.end():] if match else text
    return ("---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n" + body).encode("utf-8")


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
              create_pr: bool = False, commit_message: Optional[str] = None, token: Optional[str] = None,
              license: Optional[str] = None, base_models: Sequence[str] = ()) -> PushPlan:
    """``license`` and ``base_models`` are written into README.md's front matter as sent (the file on disk
    is left as it is), before the card is checked: what is checked is what is sent."""
    folder = os.fspath(folder)
    check_repo_id(repo_id)
    check_card_options(license, base_models)
    if create_pr and revision not in (None, "main"):
        raise UsageError("--create-pr opens a pull request against main; it cannot be combined with --revision",
                         where="--revision", hint="drop --revision, or push to the branch without --create-pr")
    if not os.path.isdir(folder):
        raise UsageError(f"'{folder}' is not a folder", where="OUT",
                         hint="give the output folder of `merge run` (the one holding *.safetensors)")
    try:
        files, excluded, refused = select_files(folder)
    except OSError as exc:
        raise UsageError(f"cannot list '{folder}': {exc.strerror}", where="OUT",
                         hint="check the folder's permissions") from None
    contents, unsafe = check_files(folder, files)
    card_bytes = None
    if (license or base_models) and CARD in contents:
        card_bytes = contents[CARD] = card_metadata(contents[CARD], license, base_models)
    elif license or base_models:
        unsafe.append(UsageError("there is no README.md (model card) to write --license/--base-model into",
                                 where=folder, hint="push the output folder of `merge run`, which writes one"))
    card, card_problems = _card(contents.get(CARD), present=os.path.lexists(os.path.join(folder, CARD)))
    plan = PushPlan(folder, repo_id, endpoint(), private, revision or "main", create_pr,
                    commit_message or default_message(contents.get(RECIPE)), token_source(token), files, excluded,
                    card)
    plan.card_bytes = card_bytes
    plan.warnings += card.warnings
    pickles = [shown(f.path) for f in excluded if f.reason.startswith("pickle")]
    if pickles:
        plan.warnings.append("pickle files present (not uploaded): " + ", ".join(pickles))
    plan.problems += _folder_problems(folder, files, contents, refused + unsafe)
    plan.problems += card_problems
    plan.problems += target_problems(repo_id, token)
    return plan


def _card(data: Optional[bytes], present: bool) -> tuple[CardCheck, list[MergeError]]:
    """The card's check, and its errors as problems. A README.md that could not be read (a link, a secret) is
    reported as such already: no "no model card" warning on top."""
    if data is None:
        return (check_card(None) if not present else CardCheck()), []
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return CardCheck(), [HubError("is not UTF-8 text", where=CARD, hint="save README.md as UTF-8, then re-run")]
    card = check_card(text)
    return card, [HubError(message, where=CARD, hint="fix the front matter of README.md, then re-run")
                  for message in card.errors]


def _folder_problems(folder: str, files: list[FileEntry], contents: dict[str, bytes],
                     unsafe: list[MergeError]) -> list[MergeError]:
    """What is wrong with the folder: unfinished, a file that must not be sent (``unsafe``), no weights, an
    index naming missing shards."""
    names = {f.path for f in files}
    if os.path.basename(os.path.normpath(folder)).endswith(".partial"):
        return [UsageError(f"'{folder}' is the unfinished output of a merge", where="OUT",
                           hint="push the final folder (without .partial), after the merge completed")]
    problems = list(unsafe)
    if not any(n.endswith(".safetensors") for n in names):
        problems.append(HubError("no *.safetensors weights to upload", where=folder,
                                 hint="give the output folder of `merge run`; pickle weights are never uploaded"))
    for index in sorted(n for n in contents if INDEX.fullmatch(n)):
        try:
            shards = _shards(contents[index], index)
        except MergeError as exc:
            problems.append(exc)
            continue
        missing = sorted(shards - names)
        if missing:
            problems.append(HubError(f"the index lists {len(missing)} shard(s) that are not in the folder: "
                                     + ", ".join(shown(m) for m in missing[:3]), where=index,
                                     hint="the folder is incomplete; re-run the merge"))
    return problems


def _shards(data: bytes, index: str) -> set[str]:
    """The shard files a safetensors index names, from the bytes push_files read and checked (a regular file, not
    through a link, bounded). Parsed here rather than by sources.user_files.read_json_object, which reads the path
    again and loads torch (2 to 6 s): a push never needs torch."""
    hint = "re-run the merge; the index must list every tensor's shard"
    try:
        weight_map = json.loads(data.decode("utf-8")).get("weight_map")
    except (ValueError, RecursionError, AttributeError) as exc:
        why = "it is nested too deeply" if isinstance(exc, RecursionError) else \
            "it is not a JSON object" if isinstance(exc, AttributeError) else exc
        raise HubError(f"cannot read the shard index: {why}", where=index, hint=hint) from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise HubError("the shard index has no weight_map of tensor names to shard files", where=index, hint=hint)
    return set(weight_map.values())


def default_message(recipe: Optional[bytes]) -> str:
    """'Upload merged model (linear, 3 models)', from the recipe (its checked bytes) when there is one."""
    try:
        spec = load_yaml((recipe or b"").decode("utf-8"), RECIPE)
        method = spec["merge_method"]
        entries = spec.get("models") or [s for piece in spec.get("slices") or () for s in piece["sources"]]
        names = {str(entry["model"]) for entry in entries} | ({str(spec["base_model"])} if spec.get("base_model")
                                                             else set())
        return f"Upload merged model ({method}, {len(names)} models)"
    except (MergeError, UnicodeDecodeError, TypeError, KeyError, AttributeError):
        return "Upload merged model"
