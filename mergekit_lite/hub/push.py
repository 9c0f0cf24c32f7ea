"""Publishing a merged model to the Hugging Face Hub: ``push_to_hub(out, "org/name")`` and ``merge push``.

A push is the local plan (push_plan.py: which files, is the card sound, is there a token), then
``create_repo(exist_ok=True)`` and one commit of exactly the planned files, as the bytes that were checked
(push_files.py): each file is opened again without following links and must be the file the plan read; the
small ones are sent as the very bytes scanned, the weights by path, and checked to be the same files once
uploaded, before the commit that publishes them. huggingface_hub does the transfer: through Xet when hf_xet is
installed (the default), else through LFS; either way an interrupted upload resumes when the same push is run
again, because files the Hub already holds are not sent twice. Every failure becomes a HubError that says
what to do, and the token never appears in one.
"""

from __future__ import annotations

import logging
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

from ..errors import HubError, MergeError
from ..units import format_size
from .client import AUTH_HINT, client, progress_bars, redact, server_message, status_code
from .push_files import CARD, check_unchanged, upload_sources
from .push_plan import PushPlan, check_repo_id, plan_push, target_problems

log = logging.getLogger("mergekit_lite")
RESUME_HINT = "check the connection, then run the same push again: files the Hub already has are not sent twice"


@dataclass(frozen=True)
class PushResult:
    """What a push did (or, for a dry run, would do)."""

    repo_id: str
    url: str                          # the repo's page
    files: int
    bytes: int
    dry_run: bool = False
    commit_url: Optional[str] = None
    pr_url: Optional[str] = None
    warnings: list[str] = field(default_factory=list)
    summary: str = ""                 # for a dry run: the plan, as `merge push --dry-run` prints it

    def __str__(self) -> str:
        if self.dry_run:
            return self.summary
        where = f"pull request {self.pr_url}" if self.pr_url else self.url
        return f"Pushed {self.files} files ({format_size(self.bytes)}) to {where}\ncommit: {self.commit_url}"

    def __repr__(self) -> str:
        what = "would push" if self.dry_run else "pushed"
        return f"<PushResult {what} {self.files} files ({format_size(self.bytes)}) to {self.url}>"

    def _repr_html_(self) -> str:
        from html import escape

        rows = [("repo", self.repo_id), ("files", f"{self.files} ({format_size(self.bytes)})"),
                ("page", self.url), ("commit", self.commit_url), ("pull request", self.pr_url),
                *[("warning", w) for w in self.warnings]]
        title = "Push (dry run: nothing sent)" if self.dry_run else "Pushed"
        return (f"<p><b>{title}</b></p><table>" + "".join(
            f"<tr><th>{key}</th><td style='text-align:left'>{escape(str(value))}</td></tr>"
            for key, value in rows if value is not None) + "</table>")


def push_to_hub(out: str | os.PathLike, repo_id: str, *, private: bool = False, revision: Optional[str] = None,
                create_pr: bool = False, commit_message: Optional[str] = None, dry_run: bool = False,
                token: Optional[str] = None, progress: bool = True, license: Optional[str] = None,
                base_models: Sequence[str] = ()) -> PushResult:
    """Upload the merged model in ``out`` to the Hub repo ``repo_id`` (created if missing).

    Only the model's files are sent (weights, index, config, tokenizer, README.md and the recipe), as regular
    files checked for secrets; a link, a special file or a secret among them raises a HubError naming it.
    ``dry_run`` checks everything locally and makes no request. ``token`` defaults to HF_TOKEN or the
    token of `hf auth login`. ``license`` (a Hub license id) and ``base_models`` (Hub ids: the parents of a
    merge of local folders, for the Hub's model tree) go into README.md's front matter as sent. Raises a
    HubError (or UsageError) that says what to do.
    """
    plan = plan_push(out, repo_id, private=private, revision=revision, create_pr=create_pr,
                     commit_message=commit_message, token=token, license=license, base_models=base_models)
    if dry_run:
        return PushResult(repo_id, plan.url, len(plan.files), plan.total_bytes, dry_run=True,
                          warnings=plan.warnings, summary=plan.summary())
    if plan.problems:
        raise plan.problems[0]
    for message in plan.warnings:
        log.warning(message)
    with progress_bars(progress):
        info = _upload(plan, token)
    return PushResult(repo_id, plan.url, len(plan.files), plan.total_bytes, commit_url=info.commit_url,
                      pr_url=info.pr_url, warnings=plan.warnings)


def check_push_target(repo_id: str, token: Optional[str] = None, where: str = "--push-to-hub") -> None:
    """Before a long merge that ends in a push: the repo id is valid, a token exists, the Hub is not offline."""
    check_repo_id(repo_id, where)
    problems = target_problems(repo_id, token)
    if problems:
        raise problems[0]


def _upload(plan: PushPlan, token: Optional[str]):
    hf = client()
    secret = _secret(hf, token)
    api = hf.HfApi(token=token, library_name="mergekit_lite", library_version=_version())
    with _translated("create the repository", plan, secret):
        api.create_repo(plan.repo_id, private=plan.private or None, exist_ok=True)  # None: the account's default
        info = api.repo_info(plan.repo_id)
    if plan.private and not info.private:
        raise HubError("the repo already exists and is public; --private does not change an existing repo",
                       where=plan.repo_id,
                       hint=f"make it private in its settings on {plan.url}, or push to another repo")
    if plan.revision != "main" and not plan.create_pr:
        with _translated(f"create the branch '{plan.revision}'", plan, secret):
            _ensure_branch(api, hf, plan)
    log.info("uploading %d files (%s) to %s", len(plan.files), format_size(plan.total_bytes), plan.url)
    with _translated("upload the files", plan, secret):
        return _commit(api, hf, plan)


def _commit(api, hf, plan: PushPlan):
    """Upload the planned files as they were checked, then commit them, unless one changed meanwhile."""
    revision = None if plan.create_pr else plan.revision
    replaced = {CARD: plan.card_bytes} if plan.card_bytes is not None else None
    additions = [hf.CommitOperationAdd(path_in_repo=name, path_or_fileobj=source)
                 for name, source in upload_sources(plan.folder, plan.files, replaced)]
    api.preupload_lfs_files(plan.repo_id, additions, revision=revision, create_pr=plan.create_pr)
    check_unchanged(plan.folder, plan.files)  # the weights went by path: still the files checked?
    return api.create_commit(plan.repo_id, additions, commit_message=plan.commit_message, revision=revision,
                             create_pr=plan.create_pr or None)


def _secret(hf, token: Optional[str]) -> Optional[str]:
    """The token this push sends, known only to mask it in messages."""
    try:
        return token or hf.get_token()
    except Exception as exc:  # e.g. a failed OIDC exchange in CI (HF_OIDC_RESOURCE)
        raise HubError(f"could not get a Hugging Face token: {redact(str(exc))}",
                       hint="check HF_OIDC_RESOURCE, or run `hf auth login` or set HF_TOKEN") from None


def _ensure_branch(api, hf, plan: PushPlan) -> None:
    """Pushing to a branch that does not exist yet creates it from main, as `hf upload --revision` does."""
    try:
        api.repo_info(plan.repo_id, revision=plan.revision)
    except hf.errors.RevisionNotFoundError:
        log.info("creating branch '%s' of %s", plan.revision, plan.repo_id)
        api.create_branch(plan.repo_id, branch=plan.revision, exist_ok=True)


@contextmanager
def _translated(step: str, plan: PushPlan, token: Optional[str]) -> Iterator[None]:
    """Turn a huggingface_hub failure during ``step`` into a HubError a user can act on; mask the token."""
    hf = client()
    errors = hf.errors
    namespace = plan.repo_id.split("/")[0]
    try:
        yield
    except MergeError:
        raise
    except errors.OfflineModeIsEnabled:
        raise HubError("HF_HUB_OFFLINE is set, so nothing can be pushed",
                       hint="unset HF_HUB_OFFLINE (or set it to 0), then re-run") from None
    except errors.RevisionNotFoundError:
        raise HubError(f"branch '{plan.revision}' not found", where=plan.repo_id,
                       hint="check the name given to --revision") from None
    except errors.RepositoryNotFoundError as exc:
        raise HubError(f"repository not found, and it could not be created ({redact(server_message(exc), token)})",
                       where=plan.repo_id, hint=f"check the name: the namespace '{namespace}' must exist, and your "
                                                f"token needs write access to it") from None
    except errors.HfHubHTTPError as exc:
        status = status_code(exc)
        message = f"the Hub refused to {step} ({status}: {redact(server_message(exc), token)})"
        if status in (401, 403):
            raise HubError(message, where=plan.repo_id, hint=AUTH_HINT.format(namespace=namespace)) from None
        raise HubError(message.replace("refused", "failed"), where=plan.repo_id, hint=RESUME_HINT) from None
    except (hf.utils.httpx.TransportError, ConnectionError) as exc:  # ConnectionError: hf_xet's, from Rust
        text = redact(str(exc) or type(exc).__name__, token)
        hint = AUTH_HINT.format(namespace=namespace) if re.search(r"\b40[13]\b", text) else RESUME_HINT
        raise HubError(f"the transfer failed while trying to {step}: {text}", where=plan.repo_id,
                       hint=hint) from None
    except ValueError as exc:  # e.g. the Hub's YAML validation of README.md
        raise HubError(f"the Hub rejected the upload: {redact(str(exc), token)}", where=plan.repo_id,
                       hint="fix the metadata at the top of README.md, then re-run") from None
    except Exception as exc:
        if type(exc).__module__.split(".")[0] != "hf_xet":
            raise
        raise HubError(f"the Xet transfer failed while trying to {step}: {redact(str(exc), token)}",
                       where=plan.repo_id, hint=RESUME_HINT) from None


def _version() -> str:
    from .. import __version__

    return __version__
