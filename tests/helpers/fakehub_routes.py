"""The Hub API routes of the fake Hub (see fakehub.py): what each endpoint answers, as the real Hub does.

Paths are matched on the raw (URL-encoded) path, so a revision such as ``refs%2Fpr%2F1`` is one segment.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import time
from pathlib import Path

from .fakehub import LFS_SUFFIXES, Blob, FakeHub, HubError, Reply, Repo, Request, Route

REPO = r"(?P<repo>[^/]+/[^/]+)"
REV = r"(?P<rev>[^/]+)"


def serve(cas_dir: Path, **kwargs) -> FakeHub:
    """Start a fake Hub on 127.0.0.1 (a free port); ``hub.url`` is what HF_ENDPOINT should be."""
    return FakeHub(ROUTES, cas_dir, **kwargs).start()


# ---------------------------------------------------------------------- helpers
def writer(hub: FakeHub, request: Request, namespace: str) -> str:
    """The user behind a write request, who must be allowed to write to ``namespace``."""
    if request.user is None:
        raise HubError(401, "Invalid credentials in Authorization header")
    if namespace not in (request.user, *hub.orgs):
        raise HubError(403, f'You don\'t have the rights to create a model under the namespace "{namespace}"')
    return request.user


def readable(hub: FakeHub, request: Request) -> Repo:
    repo = hub.repos.get(request.args["repo"])
    if repo is None or (repo.private and request.user is None):
        raise HubError(404, "Repository not found", "RepoNotFound")
    return repo


def commit_of(repo: Repo, rev: str) -> str:
    if rev in repo.commits:
        return rev
    if rev in repo.branches:
        return repo.branches[rev]
    raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")


def gate(hub: FakeHub, repo: Repo) -> None:
    if repo.gated:
        raise HubError(403, f"Access to model {repo.repo_id} is restricted and you are not in the authorized list. "
                            f"Visit {hub.url}/{repo.repo_id} to ask for access.", "GatedRepo")


def tree_entry(path: str, blob: Blob) -> dict:
    entry = {"type": "file", "path": path, "size": blob.size,
             "oid": git_sha1_of_pointer(blob) if blob.lfs else blob.oid}
    if blob.lfs:
        entry["lfs"] = {"oid": blob.sha256, "size": blob.size, "pointerSize": 134}
    return entry


def git_sha1_of_pointer(blob: Blob) -> str:
    pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{blob.sha256}\nsize {blob.size}\n".encode()
    return hashlib.sha1(b"blob %d\0" % len(pointer) + pointer).hexdigest()


def xet_token(hub: FakeHub) -> Reply:
    """Xet connection info in both forms hf_xet and huggingface_hub read: JSON body and headers."""
    cas, exp = f"local://{hub.cas_dir}", int(time.time()) + 3600
    return Reply(200, {"casUrl": cas, "accessToken": "xet-fake-token", "exp": exp},
                 {"X-Xet-Cas-Url": cas, "X-Xet-Access-Token": "xet-fake-token", "X-Xet-Token-Expiration": str(exp)})


def pull_request(hub: FakeHub, repo: Repo, title: str) -> dict:
    num = len(repo.discussions) + 1
    repo.branches[f"refs/pr/{num}"] = repo.branches["main"]
    discussion = {"num": num, "title": title, "status": "open", "isPullRequest": True, "createdAt":
                  "2026-01-01T00:00:00.000Z", "author": {"name": hub.user}, "events": [], "filesWithConflicts": [],
                  "repo": {"name": repo.repo_id, "type": "model"}, "changes": {"base": "refs/heads/main"}}
    repo.discussions.append(discussion)
    return discussion


# ---------------------------------------------------------------------- account and repos
def whoami(hub: FakeHub, request: Request) -> Reply:
    if request.user is None:
        raise HubError(401, "Invalid credentials in Authorization header")
    return Reply(200, {"type": "user", "name": request.user, "orgs": [{"name": o} for o in hub.orgs],
                       "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}}})


def create_repo(hub: FakeHub, request: Request) -> Reply:
    body = request.json()
    namespace = body.get("organization") or request.user or ""
    writer(hub, request, namespace)
    repo_id = f"{namespace}/{body['name']}"
    url = f"{hub.url}/{repo_id}"
    if repo_id in hub.repos:
        return Reply(409, {"error": "You already created this model repo", "url": url})
    repo = hub.repos[repo_id] = Repo(repo_id, private=body.get("visibility") == "private")
    attributes = _blob(b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n")
    hub.record_commit(repo, "main", {".gitattributes": attributes}, "initial commit")
    return Reply(200, {"url": url, "name": repo_id})


def create_branch(hub: FakeHub, request: Request) -> Reply:
    repo = readable(hub, request)
    writer(hub, request, repo.repo_id.split("/")[0])
    if request.args["branch"] in repo.branches:
        raise HubError(409, "Reference already exists")
    repo.branches[request.args["branch"]] = repo.branches["main"]
    return Reply(200, {})


def model_info(hub: FakeHub, request: Request) -> Reply:
    repo = readable(hub, request)
    sha = commit_of(repo, request.args.get("rev", "main"))
    siblings = [{"rfilename": path, "size": blob.size, **({"lfs": {"sha256": blob.sha256, "size": blob.size,
                                                                   "pointerSize": 134}} if blob.lfs else {})}
                for path, blob in sorted(repo.commits[sha].items())]
    return Reply(200, {"id": repo.repo_id, "modelId": repo.repo_id, "sha": sha, "private": repo.private,
                       "gated": "manual" if repo.gated else False, "siblings": siblings, "tags": []})


def auth_check(hub: FakeHub, request: Request) -> Reply:
    gate(hub, readable(hub, request))
    return Reply(200, {})


def tree(hub: FakeHub, request: Request) -> Reply:
    repo = readable(hub, request)
    files = repo.commits[commit_of(repo, request.args["rev"])]
    prefix = request.args.get("path", "").strip("/")
    return Reply(200, [tree_entry(p, b) for p, b in sorted(files.items()) if p.startswith(prefix)])


def validate_yaml(hub: FakeHub, request: Request) -> Reply:
    return Reply(200, {"errors": [], "warnings": []})


# ---------------------------------------------------------------------- upload
def preupload(hub: FakeHub, request: Request) -> Reply:
    repo = readable(hub, request)
    writer(hub, request, repo.repo_id.split("/")[0])
    current = repo.commits[commit_of(repo, request.args["rev"])]
    answers = []
    for file in request.json()["files"]:
        sample = base64.b64decode(file["sample"])
        # The Hub decides from .gitattributes, the size and a binary sniff of the first 512 bytes.
        lfs = file["path"].endswith(LFS_SUFFIXES) or file["size"] >= 1_000_000 or b"\0" in sample
        known = current.get(file["path"])
        answers.append({"path": file["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                        "oid": known.oid if known is not None else None})
    return Reply(200, {"files": answers})


def xet_write_token(hub: FakeHub, request: Request) -> Reply:
    repo = readable(hub, request)
    writer(hub, request, repo.repo_id.split("/")[0])
    return xet_token(hub)


def xet_read_token(hub: FakeHub, request: Request) -> Reply:
    readable(hub, request)
    return xet_token(hub)


def lfs_batch(hub: FakeHub, request: Request) -> Reply:
    repo = readable(hub, request)
    writer(hub, request, repo.repo_id.split("/")[0])
    objects = []
    for obj in request.json()["objects"]:
        entry = {"oid": obj["oid"], "size": obj["size"]}
        if obj["oid"] not in hub.lfs_objects:  # already stored: no actions, the client skips the upload
            entry["actions"] = {"upload": {"href": f"{hub.url}/lfs-upload/{obj['oid']}"},
                                "verify": {"href": f"{hub.url}/lfs-verify/{obj['oid']}"}}
        objects.append(entry)
    return Reply(200, {"transfer": "basic", "objects": objects}, {"Content-Type": "application/vnd.git-lfs+json"})


def lfs_upload(hub: FakeHub, request: Request) -> Reply:
    if hashlib.sha256(request.body).hexdigest() != request.args["oid"]:
        raise HubError(400, "sha256 mismatch")
    hub.lfs_objects[request.args["oid"]] = request.body
    return Reply(200, {})


def lfs_verify(hub: FakeHub, request: Request) -> Reply:
    if request.args["oid"] not in hub.lfs_objects:
        raise HubError(404, "object not found")
    return Reply(200, {})


def open_discussion(hub: FakeHub, request: Request) -> Reply:
    repo = readable(hub, request)
    writer(hub, request, repo.repo_id.split("/")[0])
    return Reply(200, pull_request(hub, repo, request.json()["title"]))


def discussion(hub: FakeHub, request: Request) -> Reply:
    repo = readable(hub, request)
    return Reply(200, repo.discussions[int(request.args["num"]) - 1])


def commit(hub: FakeHub, request: Request) -> Reply:
    repo = readable(hub, request)
    writer(hub, request, repo.repo_id.split("/")[0])
    ref = request.args["rev"]
    commit_of(repo, ref)
    pr_url = None
    if request.query.get("create_pr") == "1":  # the legacy path lets the server open the PR
        pr = pull_request(hub, repo, "")
        ref, pr_url = f"refs/pr/{pr['num']}", f"{hub.url}/{repo.repo_id}/discussions/{pr['num']}"
    lines = [json.loads(line) for line in request.body.splitlines() if line.strip()]
    summary, changes = "", {}
    for line in lines:
        key, value = line["key"], line["value"]
        if key == "header":
            summary = value["summary"]
            if pr_url:
                repo.discussions[-1]["title"] = summary
        elif key == "file":
            changes[value["path"]] = _blob(base64.b64decode(value["content"]))
        elif key == "lfsFile":
            data = hub.lfs_objects.get(value["oid"])  # None when the bytes went to the Xet CAS
            changes[value["path"]] = Blob(value["size"], value["oid"], data, lfs=True)
        elif key == "deletedFile":
            changes[value["path"]] = None
    sha = hub.record_commit(repo, ref, changes, summary)
    return Reply(200, {"commitOid": sha, "commitUrl": f"{hub.url}/{repo.repo_id}/commit/{sha}",
                       "pullRequestUrl": pr_url, "success": True})


# ---------------------------------------------------------------------- download
def resolve(hub: FakeHub, request: Request) -> Reply:
    repo = readable(hub, request)
    gate(hub, repo)
    sha = commit_of(repo, request.args["rev"])
    blob = repo.commits[sha].get(request.args["path"])
    if blob is None:
        raise HubError(404, "Entry not found", "EntryNotFound")
    headers = {"X-Repo-Commit": sha, "ETag": f'"{blob.sha256 if blob.lfs else blob.oid}"',
               "Content-Length": str(blob.size)}
    if blob.data is None:  # stored in Xet: the client downloads it from the CAS
        xet_hash = hub.xet_hashes.get(blob.sha256)
        if xet_hash is None:
            raise HubError(500, f"test setup: register_xet() the file behind {request.args['path']}")
        headers.update({"X-Xet-Hash": xet_hash, "X-Linked-Size": str(blob.size), "X-Linked-Etag": f'"{blob.sha256}"',
                        "X-Xet-Refresh-Route": f"{hub.url}/api/models/{repo.repo_id}/xet-read-token/{sha}"})
        if request.method == "GET":
            headers["Content-Length"] = "0"
        return Reply(200, b"", headers)
    return Reply(200, blob.data, headers)


def _blob(data: bytes, lfs: bool = False) -> Blob:
    return Blob(len(data), hashlib.sha256(data).hexdigest(), data, lfs)


def _r(methods: str, pattern: str, handler) -> Route:
    return methods, re.compile(pattern), handler


ROUTES: list[Route] = [
    _r("GET", r"/api/whoami-v2", whoami),
    _r("POST", r"/api/repos/create", create_repo),
    _r("POST", r"/api/validate-yaml", validate_yaml),
    _r("GET", rf"/api/models/{REPO}(?:/revision/{REV})?", model_info),
    _r("GET", rf"/api/models/{REPO}/auth-check", auth_check),
    _r("GET", rf"/api/models/{REPO}/tree/{REV}(?:/(?P<path>.*))?", tree),
    _r("POST", rf"/api/models/{REPO}/branch/(?P<branch>[^/]+)", create_branch),
    _r("POST", rf"/api/models/{REPO}/preupload/{REV}", preupload),
    _r("GET", rf"/api/models/{REPO}/xet-write-token/{REV}", xet_write_token),
    _r("GET", rf"/api/models/{REPO}/xet-read-token/{REV}", xet_read_token),
    _r("POST", rf"/api/models/{REPO}/commit/{REV}", commit),
    _r("POST", rf"/api/models/{REPO}/discussions", open_discussion),
    _r("GET", rf"/api/models/{REPO}/discussions/(?P<num>\d+)", discussion),
    _r("POST", rf"/{REPO}\.git/info/lfs/objects/batch", lfs_batch),
    _r("PUT", r"/lfs-upload/(?P<oid>[0-9a-f]{64})", lfs_upload),
    _r("POST", r"/lfs-verify/(?P<oid>[0-9a-f]{64})", lfs_verify),
    _r("HEAD|GET", rf"/{REPO}/resolve/{REV}/(?P<path>.+)", resolve),
]
