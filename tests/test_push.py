"""`merge push` against a Hub-compatible server on 127.0.0.1: what is sent, through both upload paths.

The real CLI runs in a subprocess with HF_ENDPOINT pointing at the fake Hub (tests/fakehub.py): with
HF_HUB_DISABLE_XET=1 huggingface_hub uploads through LFS; by default through Xet, into a local CAS folder.
Every test also checks (in hubcli.merge) that the token appears in no output.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path

import pytest
from helpers.hubcli import TOKEN, hub_env, merge, python

from mergekit_lite import run_merge

SENT = ["README.md", "config.json", "generation_config.json", "merge_run.json", "mergekit_config.yml",
        "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors",
        "model.safetensors.index.json",
        "tokenizer.json", "tokenizer_config.json"]


@pytest.fixture(scope="module")
def merged(models_f32, tmp_path_factory) -> Path:
    """A real merge output, plus files that must stay local."""
    out = tmp_path_factory.mktemp("push") / "merged"
    spec = {"merge_method": "linear", "parameters": {"weight": 1.0},
            "models": [{"model": str(models_f32 / "ft-a")}, {"model": str(models_f32 / "ft-b")}]}
    run_merge(spec, out, max_shard_size="300KB", progress=False)
    (out / "notes.txt").write_text("scratch")
    (out / "pytorch_model.bin").write_bytes(b"pickle")
    (out / ".env").write_text(f"HF_TOKEN={TOKEN}")
    (out / "runs").mkdir()
    (out / "runs" / "extra.safetensors").write_bytes(b"x")
    return out


def api_calls(hub):
    return [r for r in hub.log if r.path.startswith("/api/") or ".git/" in r.path]


def committed(hub, repo_id: str, ref: str = "main") -> dict:
    """The NDJSON lines of the last commit to ``ref``, by key."""
    quoted = ref.replace("/", "%2F")
    lines = hub.requests("POST", rf"^/api/models/{repo_id}/commit/{quoted}$")[-1].body
    return {"header": [x["value"] for x in lines if x["key"] == "header"][0],
            "file": {x["value"]["path"]: x["value"] for x in lines if x["key"] == "file"},
            "lfsFile": {x["value"]["path"]: x["value"] for x in lines if x["key"] == "lfsFile"}}


def download(hub, env: dict, repo_id: str, folder: Path, revision: str = "main") -> Path:
    """Download the repo back with snapshot_download, as a user would; the local snapshot folder."""
    code = (f"from huggingface_hub import snapshot_download\n"
            f"print(snapshot_download({repo_id!r}, revision={revision!r}, cache_dir={str(folder)!r}))")
    return Path(python(code, env).strip())


def published(folder: Path, name: str) -> bytes:
    """A file's bytes as a push sends them: the run record without the local folder it ran in."""
    data = (folder / name).read_bytes()
    if name != "merge_run.json":
        return data
    record = json.loads(data)
    del record["working_dir"]
    return (json.dumps(record, indent=2) + "\n").encode()


@pytest.mark.parametrize("xet", [False, True], ids=["lfs", "xet"])
def test_push_sends_the_model_files_and_they_come_back(merged, fake_hub, tmp_path, xet):
    env = hub_env(fake_hub, tmp_path / "home", xet=xet)
    result = merge("push", merged, "--repo", "user/merged", "--private", "--commit-message", "Merge v1", env=env)
    assert result.returncode == 0, result.stderr
    total = sum((merged / f).stat().st_size for f in SENT)
    assert result.stdout.startswith(f"Pushed 11 files ({_size(total)}) to {fake_hub.url}/user/merged\ncommit: ")

    create = api_calls(fake_hub)[0]
    assert (create.method, create.path) == ("POST", "/api/repos/create")
    assert create.body == {"name": "merged", "organization": "user", "visibility": "private"}
    assert fake_hub.repos["user/merged"].private
    preupload = fake_hub.requests("POST", "/preupload/main$")
    assert sorted(f["path"] for r in preupload for f in r.body["files"]) == SENT
    commit = committed(fake_hub, "user/merged")
    assert commit["header"]["summary"] == "Merge v1"
    assert sorted([*commit["file"], *commit["lfsFile"]]) == SENT
    weights = [f for f in SENT if f.endswith(".safetensors")]
    assert sorted(commit["lfsFile"]) == weights
    for name in weights:  # recorded by sha256, in both paths
        assert commit["lfsFile"][name]["oid"] == hashlib.sha256((merged / name).read_bytes()).hexdigest()
    for name, entry in commit["file"].items():
        assert base64.b64decode(entry["content"]) == published(merged, name)
    if xet:
        assert fake_hub.requests("GET", "/xet-write-token/main$") and not fake_hub.requests("PUT")
    else:
        assert len(fake_hub.requests("PUT", "^/lfs-upload/")) == len(weights)
        assert not fake_hub.requests("GET", "/xet-write-token/")
    assert all(r.authorization == f"Bearer {TOKEN}" for r in api_calls(fake_hub))
    validated = fake_hub.requests("POST", "^/api/validate-yaml$")[0].body
    assert validated["content"] == (merged / "README.md").read_text()

    for name in weights:  # Xet-stored files download through the same local CAS
        fake_hub.register_xet(merged / name)
    snapshot = download(fake_hub, env, "user/merged", tmp_path / "cache")
    got = sorted(p.name for p in snapshot.iterdir())
    assert got == sorted([".gitattributes", *SENT])
    for name in SENT:
        assert (snapshot / name).read_bytes() == published(merged, name), name
    record = json.loads((snapshot / "merge_run.json").read_text())
    local = json.loads((merged / "merge_run.json").read_text())
    assert os.path.isabs(local["working_dir"]) and "working_dir" not in record   # the local folder stays local
    assert record == {k: v for k, v in local.items() if k != "working_dir"}


@pytest.mark.parametrize("xet", [False, True], ids=["lfs", "xet"])
def test_create_pr_leaves_main_alone(merged, fake_hub, tmp_path, xet):
    env = hub_env(fake_hub, tmp_path / "home", xet=xet)
    result = merge("push", merged, "--repo", "org/merged", "--create-pr", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Pushed 11 files (")
    assert f" to pull request {fake_hub.url}/org/merged/discussions/1\n" in result.stdout
    # one commit, through either upload path: the server opens the pull request with it
    assert fake_hub.requests("POST", "^/api/models/org/merged/commit/main$")[0].query == {"create_pr": "1"}
    assert fake_hub.repos["org/merged"].discussions[0]["title"] == "Upload merged model (linear, 2 models)"
    assert sorted(fake_hub.files("org/merged", "main")) == [".gitattributes"]
    assert sorted(fake_hub.files("org/merged", "refs/pr/1")) == sorted([".gitattributes", *SENT])


def test_push_to_a_new_branch_creates_it(merged, fake_hub, tmp_path):
    env = hub_env(fake_hub, tmp_path / "home", xet=False)
    assert merge("push", merged, "--repo", "user/merged", "--revision", "dev", env=env).returncode == 0
    assert fake_hub.requests("POST", "^/api/models/user/merged/branch/dev$")
    assert sorted(fake_hub.files("user/merged", "dev")) == sorted([".gitattributes", *SENT])
    assert sorted(fake_hub.files("user/merged", "main")) == [".gitattributes"]


AUTH_HINT = "Hint: run `hf auth login` or set HF_TOKEN, with write access to {namespace}\n"
RESUME_HINT = "Hint: check the connection, then run the same push again: files the Hub already has are not sent twice\n"
# (id, set-up of the fake Hub, --repo, extra arguments, environment changes, the end of stderr, any request made?)
REFUSALS = [
    ("no-token", None, "user/merged", (), {"token": None},
     "error: no Hugging Face token found\n" + AUTH_HINT.format(namespace="user"), False),
    ("offline", None, "user/merged", (), {"HF_HUB_OFFLINE": "1"},
     "error: HF_HUB_OFFLINE is set, so nothing can be pushed\n"
     "Hint: unset HF_HUB_OFFLINE (or set it to 0), then re-run\n", False),
    ("invalid-token", None, "user/merged", (), {"token": "hf_not_a_valid_token_0123"},
     "error: user/merged: the Hub refused to create the repository (401: Invalid credentials in Authorization "
     "header)\n" + AUTH_HINT.format(namespace="user"), True),
    ("403-namespace", None, "acme/merged", (), {},
     "error: acme/merged: the Hub refused to create the repository (403: You don't have the rights to create a "
     'model under the namespace "acme")\n' + AUTH_HINT.format(namespace="acme"), True),
    ("403-echoing-the-token", lambda hub: hub.fail("POST", "/preupload/", 403, f"token {TOKEN} is read-only"),
     "user/merged", ("-vv",), {},
     "error: user/merged: the Hub refused to upload the files (403: token hf_*** is read-only)\n"
     + AUTH_HINT.format(namespace="user"), True),
    ("missing-repo", lambda hub: hub.fail("POST", "^/api/repos/create$", 404, "Namespace ghost not found",
                                          code="RepoNotFound"), "ghost/merged", (), {},
     "error: ghost/merged: repository not found, and it could not be created (Namespace ghost not found)\n"
     "Hint: check the name: the namespace 'ghost' must exist, and your token needs write access to it\n", True),
    ("public-repo-with-private", lambda hub: hub.add_repo("user/merged", {"README.md": b"# public\n"}),
     "user/merged", ("--private",), {},
     "error: user/merged: the repo already exists and is public; --private does not change an existing repo\n"
     "Hint: make it private in its settings on {url}/user/merged, or push to another repo\n", True),
    ("unreachable", None, "user/merged", (), {"HF_ENDPOINT": "http://127.0.0.1:9"},
     "error: user/merged: the transfer failed while trying to create the repository: [Errno 111] Connection "
     "refused\n" + RESUME_HINT, False),
]


@pytest.mark.parametrize("setup, repo, args, env, expected, requests", [case[1:] for case in REFUSALS],
                         ids=[case[0] for case in REFUSALS])
def test_refusals_say_what_to_do(merged, fake_hub, tmp_path, setup, repo, args, env, expected, requests):
    if setup is not None:
        setup(fake_hub)
    result = merge("push", merged, "--repo", repo, *args, env=hub_env(fake_hub, tmp_path / "home", xet=False, **env))
    assert result.returncode == 1
    assert result.stderr.endswith(expected.format(url=fake_hub.url)), result.stderr
    assert bool(fake_hub.log) == requests
    assert not fake_hub.requests("POST", "/commit/")  # nothing was committed
    assert "hf_not_a_valid_token_0123" not in result.stdout + result.stderr


def test_interrupted_upload_resumes_without_sending_the_weights_again(merged, fake_hub, tmp_path):
    """The connection drops at the commit, after the weights were uploaded; the same push again completes."""
    env = hub_env(fake_hub, tmp_path / "home", xet=False)
    fake_hub.fail("POST", "/commit/main$", drop=True, times=1)
    first = merge("push", merged, "--repo", "user/merged", env=env)
    assert first.returncode == 1
    assert first.stderr.endswith("error: user/merged: the transfer failed while trying to upload the files: Server "
                                 "disconnected without sending a response.\nHint: check the connection, then run the "
                                 "same push again: files the Hub already has are not sent twice\n")
    assert len(fake_hub.requests("PUT", "^/lfs-upload/")) == 3
    sent_before = len(fake_hub.log)
    second = merge("push", merged, "--repo", "user/merged", env=env)
    assert second.returncode == 0, second.stderr
    assert not [r for r in fake_hub.log[sent_before:] if r.method == "PUT"]
    stored = fake_hub.files("user/merged")
    assert all(stored[name].data == published(merged, name) for name in SENT)


def test_run_pushes_after_the_merge(models_f32, fake_hub, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"merge_method: linear\nparameters: {{weight: 1}}\nmodels:\n  - model: {models_f32}/ft-a\n"
                    f"  - model: {models_f32}/ft-c\n")
    result = merge("run", spec, "-o", tmp_path / "out", "--push-to-hub", "user/run-merged", "--private",
                   env=hub_env(fake_hub, tmp_path / "home", xet=False))
    assert result.returncode == 0, result.stderr
    assert "\nPushed 8 files (" in result.stdout and f"to {fake_hub.url}/user/run-merged\n" in result.stdout
    assert result.stdout.index("Validation passed on cpu") < result.stdout.index("Pushed"), result.stdout
    assert fake_hub.repos["user/run-merged"].private
    stored = fake_hub.files("user/run-merged")
    assert stored["model.safetensors"].data == (tmp_path / "out" / "model.safetensors").read_bytes()


def test_dry_run_makes_no_request(merged, fake_hub, tmp_path):
    result = merge("push", merged, "--repo", "user/merged", "--dry-run", env=hub_env(fake_hub, tmp_path / "home"))
    assert result.returncode == 0, result.stderr
    assert "token     : found (the HF_TOKEN environment variable)\n" in result.stdout
    assert fake_hub.log == []


def _size(n: int) -> str:
    from mergekit_lite.units import format_size

    return format_size(n)

