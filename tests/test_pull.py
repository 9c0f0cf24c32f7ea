"""Merge inputs given as Hub repo ids (`org/name[@revision]`), served by the fake Hub on 127.0.0.1.

End to end (a subprocess, as a user runs it): resolve every reference, download only what a merge needs at
the pinned commit, merge, pin the commits in the card, push the result; then the same merge offline from the
warm cache. The errors (gated, missing, unknown revision, no safetensors, offline with a cold cache) run
in-process: they happen while resolving, before anything is downloaded.
"""

from __future__ import annotations

import re

import pytest
from helpers.fakehub import folder_files
from helpers.hubcli import hub_env, merge, point_at
from helpers.models import read_folder, write_spec

from mergekit_lite import run_merge

NEEDED = {"config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json",
          "tokenizer_config.json"}
EXTRAS = {"README.md": b"# a model\n", "pytorch_model.bin": b"pickle", "onnx/model.safetensors": b"\0" * 16}
SPEC = """merge_method: task_arithmetic
base_model: {base}
models:
  - model: {a}
    parameters: {{weight: 0.5}}
  - model: {b}
    parameters: {{weight: 0.3}}
"""


@pytest.fixture
def hub_models(fake_hub, models_f32):
    """org/base (with files a merge must not download), org/ft-a (branch v1 = ft-a; main moved on), org/ft-b."""
    fake_hub.add_repo("org/base", {**folder_files(models_f32 / "base"), **EXTRAS})
    v1 = fake_hub.add_repo("org/ft-a", folder_files(models_f32 / "ft-a"))
    fake_hub.add_branch("org/ft-a", "v1", v1)
    fake_hub.add_commit("org/ft-a", folder_files(models_f32 / "ft-c"), summary="retrain")
    fake_hub.add_repo("org/ft-b", folder_files(models_f32 / "ft-b"))
    return fake_hub


def test_merge_of_hub_inputs_end_to_end(hub_models, models_f32, tmp_path):
    hub = hub_models
    spec = write_spec(tmp_path / "spec.yaml", SPEC.format(base="org/base", a="org/ft-a@v1", b="org/ft-b"))
    env = hub_env(hub, tmp_path / "home", xet=False)
    result = merge("run", spec, "-o", tmp_path / "out", "--push-to-hub", "user/merged", env=env)
    assert result.returncode == 0, result.stderr

    # The same merge of the local folders gives the same bytes.
    local = SPEC.format(base=models_f32 / "base", a=models_f32 / "ft-a", b=models_f32 / "ft-b")
    run_merge(local, tmp_path / "local", progress=False)
    got, expected = read_folder(tmp_path / "out"), read_folder(tmp_path / "local")
    assert got.keys() == expected.keys() and all(got[k].equal(expected[k]) for k in got)

    # Every reference was resolved before the first download; only what a merge reads was downloaded.
    paths = [r.path for r in hub.log]
    first_download = min(i for i, p in enumerate(paths) if "/resolve/" in p)
    lookups = [i for i, p in enumerate(paths) if re.fullmatch(r"/api/models/org/[^/]+(/revision/[^/]+)?", p)]
    # Per repo: revision -> commit, then its files; all 6 before the first download. (The validation after the
    # merge plans the spec again: its lookups come later, and it downloads nothing.)
    assert len(lookups) >= 6 and sorted(lookups)[5] < first_download
    for repo in ("org/base", "org/ft-a", "org/ft-b"):
        fetched = [re.sub(rf"^/{repo}/resolve/[0-9a-f]{{40}}/", "", r.path)
                   for r in hub.requests("GET", rf"^/{repo}/resolve/")]
        shards = {p for p in hub.files(repo, "main") if re.fullmatch(r"model-\d+-of-\d+\.safetensors", p)}
        assert sorted(fetched) == sorted(NEEDED | shards), repo  # each needed file once, nothing else

    # The card pins the commits that were merged; the pushed card lists the Hub ids as base models.
    card = (tmp_path / "out" / "README.md").read_text()
    commit = hub.repos["org/ft-a"].branches["v1"]
    assert f"[org/ft-a](https://huggingface.co/org/ft-a) (revision `v1`, commit `{commit}`)" in card
    assert f"(commit `{hub.repos['org/base'].branches['main']}`) as the base" in card
    pushed = hub.files("user/merged")["README.md"].data.decode()
    assert pushed == card and "base_model:\n- org/base\n- org/ft-a\n- org/ft-b\nbase_model_relation: merge\n" in card

    # Offline, from the warm cache: the same result, and not one request.
    before = len(hub.log)
    offline = merge("run", spec, "-o", tmp_path / "offline", env={**env, "HF_HUB_OFFLINE": "1"})
    assert offline.returncode == 0, offline.stderr
    assert len(hub.log) == before
    again = read_folder(tmp_path / "offline")
    assert all(again[k].equal(got[k]) for k in got)


@pytest.fixture
def hub_in_process(hub_models, monkeypatch, tmp_path):
    """This process's huggingface_hub pointed at the fake Hub, for errors raised while resolving.

    Resolving uses HfApi(), which reads the endpoint when it is built; a download would not (its URL
    template is fixed at import), and would go to the closed port conftest sets, never to the internet.
    """
    point_at(hub_models, monkeypatch, tmp_path / "cache")
    return hub_models


@pytest.mark.parametrize("model, where, message", [
    ("org/gated", "models[1].model", "'org/gated' is gated: your account has not been granted access\n"
     "Hint: accept its terms on the Hub page of org/gated, then `hf auth login` or set HF_TOKEN"),
    ("org/nope", "models[1].model", "no local folder 'org/nope' and no Hub repository of that name\n"
     "Hint: check the spelling; for a private repo run `hf auth login` or set HF_TOKEN"),
    ("org/ft-a@v9", "models[1].model", "revision 'v9' of 'org/ft-a' not found\n"
     "Hint: check the branch, tag or commit after '@'"),
    ("org/pickled", "models[1].model", "'org/pickled' has no safetensors weights at its root (config.json, "
     "pytorch_model.bin)\nHint: pickle checkpoints (*.bin, *.pt) are refused because loading one can run code; "
     "use a repo (or a revision) that has *.safetensors"),
], ids=["gated", "missing", "revision", "pickle-only"])
def test_bad_reference_fails_before_any_download(cli, hub_in_process, tmp_path, model, where, message):
    hub = hub_in_process
    hub.add_repo("org/gated", {"config.json": b"{}", "model.safetensors": b"\0" * 8}, gated=True)
    hub.add_repo("org/pickled", {"config.json": b"{}", "pytorch_model.bin": b"pickle"})
    spec = write_spec(tmp_path / "spec.yaml", SPEC.format(base="org/base", a="org/ft-b", b=model))
    result = cli("run", spec, "-o", tmp_path / "out")
    assert (result.exit_code, result.stderr) == (1, f"error: {spec}: {where}: {message}\n")
    assert not hub.requests(pattern="/resolve/")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_offline_with_a_cold_cache_names_the_reference(cli, hub_in_process, tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    spec = write_spec(tmp_path / "spec.yaml", SPEC.format(base="org/base", a="org/ft-a", b="org/ft-b"))
    result = cli("run", spec, "-o", tmp_path / "out")
    assert (result.exit_code, result.stderr) == (1, f"error: {spec}: base_model: no local folder 'org/base', and as a "
                                                    "Hub repo it is not in the local Hub cache (HF_HUB_OFFLINE is set)\n"
                                                    "Hint: check the path (relative paths are relative to the current "
                                                    "directory); for a Hub repo, unset HF_HUB_OFFLINE, or download it "
                                                    "once while online\n")
    assert hub_in_process.log == []


def test_fold_of_a_hub_adapter_into_a_hub_base(hub_models, models_f32, tmp_path):
    """`base+adapter` from the Hub: the adapter repo gives only its config and safetensors."""
    from helpers.models import SHAPE

    from mergekit_lite import fold_lora
    from mergekit_lite.testing.adapters import write_adapter

    hub = hub_models
    adapter = write_adapter(str(tmp_path / "adapter"), SHAPE, seed=3, base_model="org/base")
    hub.add_repo("org/adapter", {**folder_files(tmp_path / "adapter"), "adapter_model.bin": b"pickle",
                                 "README.md": b"# an adapter\n"})
    result = merge("fold", "org/base", "org/adapter", "-o", tmp_path / "out",
                   env=hub_env(hub, tmp_path / "home", xet=False))
    assert result.returncode == 0, result.stderr
    expected = fold_lora(models_f32 / "base", adapter, check_base=False)
    got = read_folder(tmp_path / "out")
    assert got.keys() == expected.keys() and all(got[k].equal(expected[k]) for k in got)
    fetched = sorted(r.path.rsplit("/", 1)[1] for r in hub.requests("GET", r"^/org/adapter/resolve/"))
    assert fetched == ["adapter_config.json", "adapter_model.safetensors"]
    commit = hub.repos["org/base"].branches["main"]
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"Base model: [org/base](https://huggingface.co/org/base) (commit `{commit}`)\n" in card
    assert "\n- [org/adapter](https://huggingface.co/org/adapter)" in card   # under "Adapters, folded in order"


def test_gated_adapter_fails_before_any_download(cli, hub_in_process, tmp_path):
    hub = hub_in_process
    hub.add_repo("org/gated-adapter", {"adapter_config.json": b"{}", "adapter_model.safetensors": b"\0" * 8},
                 gated=True)
    spec = write_spec(tmp_path / "spec.yaml",
                      SPEC.format(base="org/base", a="org/ft-a", b="org/ft-b+org/gated-adapter"))
    result = cli("run", spec, "-o", tmp_path / "out")
    assert (result.exit_code, result.stderr) == (1, f"error: {spec}: models[1].model: 'org/gated-adapter' is gated: "
                                                    "your account has not been granted access\nHint: accept its terms "
                                                    "on the Hub page of org/gated-adapter, then `hf auth login` or set "
                                                    "HF_TOKEN\n")
    assert not hub.requests(pattern="/resolve/")
