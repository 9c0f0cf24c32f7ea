"""A small Hugging Face Hub on 127.0.0.1, for testing pushes and pulls without the internet.

It speaks the part of the Hub's HTTP API that ``huggingface_hub`` (1.x and 2.x) uses to create a repo,
upload a folder (the legacy LFS path with ``HF_HUB_DISABLE_XET=1``, and the default Xet path), open a pull
request, and download a snapshot. Routes and bodies follow ../shared/research/hub.md, section 3.

- Repos live in memory: branch -> commit -> {path: Blob}. Every request is logged (method, path, query,
  Authorization header, decoded body) so tests can assert what the client sent.
- Xet: the write/read token routes hand out ``casUrl: local://<dir>``, so hf_xet stores and reads chunks in a
  local folder (xet-core's disk-backed client). The server never sees Xet bytes; to serve a Xet-stored file
  back, a test registers its Xet hash with ``register_xet`` (computed by ``hf_xet.hash_files``).
- Faults: ``fail()`` makes a route answer with an error status (and the Hub's error headers), or drop the
  connection without an answer (a network failure mid-upload).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Optional
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".model", ".gguf")


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Blob:
    size: int
    sha256: str
    data: Optional[bytes]          # None for a file uploaded through Xet: its bytes are in the local CAS
    lfs: bool

    @property
    def oid(self) -> str:
        """What the preupload route reports as the remote oid (the client compares it with its own)."""
        return self.sha256 if self.lfs else git_blob_sha1(self.data or b"")


@dataclass
class Repo:
    repo_id: str
    private: bool = False
    gated: bool = False                                        # gated, and nobody has been granted access
    branches: dict[str, str] = field(default_factory=dict)     # ref -> commit sha
    commits: dict[str, dict[str, Blob]] = field(default_factory=dict)
    discussions: list[dict] = field(default_factory=list)


@dataclass
class Logged:
    method: str
    path: str                     # as sent (URL-encoded)
    query: dict[str, str]
    authorization: Optional[str]
    body: Any                     # dict/list for JSON, a list of dicts for NDJSON, else the byte count


@dataclass
class Fault:
    method: str
    pattern: re.Pattern
    status: int
    message: str
    code: Optional[str]
    drop: bool
    times: Optional[int]


@dataclass
class Request:
    method: str
    args: dict[str, str]           # the route's named groups, URL-decoded (repo, rev, path, ...)
    query: dict[str, str]
    body: bytes
    user: Optional[str]            # whose token came with the request, None without a valid one

    def json(self) -> Any:
        return json.loads(self.body or b"null")


@dataclass
class Reply:
    status: int = 200
    body: Any = None               # JSON-serializable, or bytes sent as they are
    headers: dict[str, str] = field(default_factory=dict)


class HubError(Exception):
    """An error answer, with the headers huggingface_hub maps to its typed errors (X-Error-Code)."""

    def __init__(self, status: int, message: str, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


Route = tuple[str, re.Pattern, Callable[["FakeHub", Request], Reply]]


def folder_files(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder``, by posix relative path: what add_repo takes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


class FakeHub:
    def __init__(self, routes: list[Route], cas_dir: Path, token: str = "hf_fake_write_token", user: str = "user",
                 orgs: tuple[str, ...] = ("org",)):
        self.routes = routes
        self.cas_dir = cas_dir
        self.tokens = {token: user}
        self.user, self.orgs = user, orgs
        self.repos: dict[str, Repo] = {}
        self.log: list[Logged] = []
        self.lfs_objects: dict[str, bytes] = {}       # sha256 -> bytes received by LFS PUT
        self.xet_hashes: dict[str, str] = {}          # sha256 -> Xet file hash
        self.faults: list[Fault] = []
        self.lock = threading.RLock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_class(self))
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    # ------------------------------------------------------------------ test API
    def start(self) -> "FakeHub":
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def add_repo(self, repo_id: str, files: dict[str, bytes], private: bool = False, gated: bool = False) -> str:
        """Create a repo whose main branch holds ``files``; returns the commit sha."""
        self.repos[repo_id] = Repo(repo_id, private=private, gated=gated)
        return self.add_commit(repo_id, files, summary="initial commit")

    def add_commit(self, repo_id: str, files: dict[str, bytes], ref: str = "main", summary: str = "update") -> str:
        blobs = {path: Blob(len(data), hashlib.sha256(data).hexdigest(), data, path.endswith(LFS_SUFFIXES))
                 for path, data in files.items()}
        return self.record_commit(self.repos[repo_id], ref, blobs, summary)

    def add_branch(self, repo_id: str, name: str, sha: str) -> None:
        self.repos[repo_id].branches[name] = sha

    def register_xet(self, path: Path) -> None:
        """Let Xet-uploaded copies of this local file be downloaded (HEAD then carries X-Xet-Hash)."""
        import hf_xet

        info = hf_xet.hash_files([str(path)])[0]
        self.xet_hashes[hashlib.sha256(path.read_bytes()).hexdigest()] = info.hash

    def fail(self, method: str, pattern: str, status: int = 500, message: str = "", code: Optional[str] = None,
             drop: bool = False, times: Optional[int] = None) -> None:
        """Answer requests whose path matches ``pattern`` with an error (or drop the connection)."""
        self.faults.append(Fault(method, re.compile(pattern), status, message, code, drop, times))

    def requests(self, method: Optional[str] = None, pattern: str = "") -> list[Logged]:
        return [r for r in self.log if (method is None or r.method == method) and re.search(pattern, r.path)]

    def files(self, repo_id: str, ref: str = "main") -> dict[str, Blob]:
        repo = self.repos[repo_id]
        return repo.commits[repo.branches[ref]]

    # ------------------------------------------------------------------ state changes
    def record_commit(self, repo: Repo, ref: str, changes: dict[str, Optional[Blob]], summary: str) -> str:
        tree = dict(repo.commits.get(repo.branches.get(ref, ""), {}))
        for path, blob in changes.items():
            if blob is None:
                tree.pop(path, None)
            else:
                tree[path] = blob
        seed = json.dumps([repo.branches.get(ref), summary, sorted((p, b.sha256) for p, b in tree.items()),
                           len(repo.commits)])
        sha = hashlib.sha1(seed.encode()).hexdigest()
        repo.commits[sha] = tree
        repo.branches[ref] = sha
        return sha

    def user_of(self, authorization: Optional[str]) -> Optional[str]:
        if authorization and authorization.startswith("Bearer "):
            return self.tokens.get(authorization[len("Bearer "):])
        return None


def _handler_class(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # keep pytest output clean
            pass

        def do_GET(self) -> None:
            self._dispatch("GET")

        def do_HEAD(self) -> None:
            self._dispatch("HEAD")

        def do_POST(self) -> None:
            self._dispatch("POST")

        def do_PUT(self) -> None:
            self._dispatch("PUT")

        def _dispatch(self, method: str) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            url = urlsplit(self.path)
            query = {k: v[0] for k, v in parse_qs(url.query).items()}
            with hub.lock:
                hub.log.append(Logged(method, url.path, query, self.headers.get("Authorization"),
                                      _decode(raw, self.headers.get("Content-Type", ""))))
                fault = _matching_fault(hub, method, url.path)
            if fault is not None and fault.drop:
                self.close_connection = True
                self.connection.close()
                return
            try:
                if fault is not None:
                    raise HubError(fault.status, fault.message, fault.code)
                reply = _route(hub, method, url.path, query, raw, self.headers)
            except HubError as exc:
                reply = Reply(exc.status, {"error": exc.message},
                              {"X-Error-Message": exc.message, **({"X-Error-Code": exc.code} if exc.code else {})})
            self._send(reply, head=method == "HEAD")

        def _send(self, reply: Reply, head: bool) -> None:
            body = reply.body if isinstance(reply.body, bytes) else json.dumps(reply.body).encode()
            self.send_response(reply.status)
            if not isinstance(reply.body, bytes):
                self.send_header("Content-Type", "application/json")
            for key, value in reply.headers.items():
                self.send_header(key, value)
            if "Content-Length" not in reply.headers:
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

    return Handler


def _matching_fault(hub: FakeHub, method: str, path: str) -> Optional[Fault]:
    for fault in hub.faults:
        if fault.method == method and fault.pattern.search(path) and fault.times != 0:
            if fault.times is not None:
                fault.times -= 1
            return fault
    return None


def _route(hub: FakeHub, method: str, path: str, query: dict[str, str], raw: bytes, headers) -> Reply:
    for route_method, pattern, handler in hub.routes:
        match = pattern.fullmatch(path)
        if match and method in route_method.split("|"):
            request = Request(method, {k: unquote(v) for k, v in match.groupdict().items() if v is not None},
                              query, raw, hub.user_of(headers.get("Authorization")))
            with hub.lock:
                return handler(hub, request)
    raise HubError(404, f"no route for {method} {path}")


def _decode(raw: bytes, content_type: str) -> Any:
    if not raw:
        return None
    if "ndjson" in content_type:
        return [json.loads(line) for line in raw.splitlines() if line.strip()]
    if "json" in content_type:
        try:
            return json.loads(raw)
        except ValueError:
            return len(raw)
    return len(raw)
