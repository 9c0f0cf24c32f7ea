"""`merge extract` with Hub repo ids (`org/name[@revision]`) for --model and --base-model, served by the fake Hub
on 127.0.0.1: resolved, downloaded and cached by the code `merge run` uses (plan/inputs.py, hub/pull.py).

End to end (a subprocess, as a user runs it): the adapter's bytes equal those of the same extraction from the
local folders, and only what a merge reads is downloaded; then a dry run offline from the warm cache makes no
request. The errors run in-process: they happen while resolving, before anything is downloaded.
"""

from __future__ import annotations

import json

import pytest
from helpers.fakehub import folder_files
from helpers.hubcli import hub_env, merge, mock_downloads, point_at

from mergekit_lite import extract_lora

EXTRAS = {"README.md": b"# a model\n", "pytorch_model.bin": b"pickle", "onnx/model.safetensors": b"\0" * 16}
NEEDED = {"config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json",
          "tokenizer_config.json"}
WEIGHTS = "adapter_model.safetensors"


@pytest.fixture
def hub_models(fake_hub, models_f32):
    """org/base (with files extraction must not download); org/ft-a: branch v1 = ft-a, main moved on to ft-c."""
    fake_hub.add_repo("org/base", {**folder_files(models_f32 / "base"), **EXTRAS})
    v1 = fake_hub.add_repo("org/ft-a", folder_files(models_f32 / "ft-a"))
    fake_hub.add_branch("org/ft-a", "v1", v1)
    fake_hub.add_commit("org/ft-a", folder_files(models_f32 / "ft-c"), summary="retrain")
    return fake_hub


def test_hub_ids_give_the_bytes_of_the_local_folders(hub_models, models_f32, tmp_path):
    hub = hub_models
    env = hub_env(hub, tmp_path / "home", xet=False)
    result = merge("extract", "--model", "org/ft-a@v1", "--base-model", "org/base@main", "-o", tmp_path / "hub",
                   "--max-rank", "4", "-q", env=env)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", ""), result.stderr   # -q: no download bar
    local = extract_lora(models_f32 / "ft-a", models_f32 / "base", tmp_path / "local", max_rank=4)
    assert local.rank == 4
    assert (tmp_path / "hub" / WEIGHTS).read_bytes() == (tmp_path / "local" / WEIGHTS).read_bytes()

    # Both references resolved before the first download; each needed file downloaded once, nothing else.
    paths = [r.path for r in hub.log]
    first_download = min(i for i, p in enumerate(paths) if "/resolve/" in p)
    looked_up = {p.split("/")[4] for p in paths[:first_download] if p.startswith("/api/models/org/")}
    assert looked_up == {"ft-a", "base"}
    for repo in ("org/base", "org/ft-a"):
        fetched = sorted(r.path.rsplit("/", 1)[1] for r in hub.requests("GET", rf"^/{repo}/resolve/"))
        shards = {p for p in hub.files(repo, "main") if p.startswith("model-")}
        assert fetched == sorted(NEEDED | shards), repo
    assert not hub.requests("GET", r"^/org/ft-a/resolve/" + hub.repos["org/ft-a"].branches["main"])  # not ft-c

    # The config names the base as PEFT loads it (PeftConfig.revision); the card pins both commits.
    config = json.loads((tmp_path / "hub" / "adapter_config.json").read_text())
    expected = json.loads((tmp_path / "local" / "adapter_config.json").read_text())
    assert config == {**expected, "base_model_name_or_path": "org/base", "revision": "main"}
    card = (tmp_path / "hub" / "README.md").read_text()
    v1, base = hub.repos["org/ft-a"].branches["v1"], hub.repos["org/base"].branches["main"]
    assert card.startswith("---\nlibrary_name: peft\n") and "\nbase_model: org/base\n" in card
    assert f"` org/ft-a@v1 (commit {v1}) ` and its base ` org/base@main (commit {base}) `" in card.replace("\n", " ")

    # Offline, from the warm cache: the dry run (which, as merge run's, opens the downloaded headers) asks nothing.
    before = len(hub.log)
    dry = merge("extract", "--model", "org/ft-a@v1", "--base-model", "org/base", "-o", tmp_path / "dry",
                "--max-rank", "4", "--dry-run", env={**env, "HF_HUB_OFFLINE": "1"})
    assert dry.returncode == 0, dry.stderr
    expected = extract_lora(models_f32 / "ft-a", models_f32 / "base", tmp_path / "dry", max_rank=4, dry_run=True)
    assert dry.stdout == expected.summary + "\n" and "Would extract 28 module(s) as LoRA (rank <= 4)" in dry.stdout
    assert len(hub.log) == before and not (tmp_path / "dry").exists()


@pytest.fixture
def hub_in_process(hub_models, monkeypatch, tmp_path):
    """This process's huggingface_hub pointed at the fake Hub, for errors raised while resolving (as in
    tests/test_pull.py: a download would go to the closed port conftest sets, never to the internet)."""
    point_at(hub_models, monkeypatch, tmp_path / "cache")
    return hub_models


@pytest.mark.parametrize("model, base, message", [
    ("org/nope", "org/base", "--model: no local folder 'org/nope' and no Hub repository of that name\n"
     "Hint: check the spelling; for a private repo run `hf auth login` or set HF_TOKEN"),
    ("org/ft-a", "org/gated", "--base-model: 'org/gated' is gated: your account has not been granted access\n"
     "Hint: accept its terms on the Hub page of org/gated, then `hf auth login` or set HF_TOKEN"),
    ("org/ft-a@v9", "org/base", "--model: revision 'v9' of 'org/ft-a' not found\n"
     "Hint: check the branch, tag or commit after '@'"),
], ids=["missing", "gated", "revision"])
def test_bad_reference_fails_before_any_download(cli, hub_in_process, tmp_path, model, base, message):
    hub = hub_in_process
    hub.add_repo("org/gated", {"config.json": b"{}", "model.safetensors": b"\0" * 8}, gated=True)
    result = cli("extract", "--model", model, "--base-model", base, "-o", tmp_path / "out")
    assert (result.exit_code, result.stderr) == (1, f"error: {message}\n")
    assert not hub.requests(pattern="/resolve/")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_offline_with_a_cold_cache_names_the_option(cli, hub_in_process, tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    result = cli("extract", "--model", "org/ft-a@v1", "--base-model", "org/base", "-o", tmp_path / "out",
                 "--dry-run")
    assert (result.exit_code, result.stderr) == (1, "error: --model: 'org/ft-a@v1' is not in the local Hub cache and "
                                                    "HF_HUB_OFFLINE is set\nHint: unset HF_HUB_OFFLINE, or download "
                                                    "the model once while online\n")
    assert hub_in_process.log == []


def test_adapters_take_hub_ids_through_the_same_resolver(cli, hub_in_process, tmp_path):
    """`merge adapters` resolves its ADAPTERS with the same code (adapter files only): every one is checked
    before the first download, so a missing second repo fails before the first adapter is fetched."""
    from helpers.models import SHAPE

    from mergekit_lite.testing.adapters import write_adapter

    write_adapter(str(tmp_path / "adapter"), SHAPE, seed=3, base_model="org/base")
    hub_in_process.add_repo("org/adapter", folder_files(tmp_path / "adapter"))
    result = cli("adapters", "org/adapter", "org/no-adapter", "-o", tmp_path / "out", "--method", "cat")
    assert (result.exit_code, result.stderr) == (1, "error: ADAPTERS: no local folder 'org/no-adapter' and no Hub "
                                                    "repository of that name\nHint: check the spelling; for a private "
                                                    "repo run `hf auth login` or set HF_TOKEN\n")
    assert hub_in_process.requests(pattern="^/api/models/org/adapter")
    assert not hub_in_process.requests(pattern="/resolve/")
    missing = cli("adapters", tmp_path / "adapter", tmp_path / "gone", "-o", tmp_path / "out", "--method", "cat")
    assert (missing.exit_code, missing.stderr) == (2, f"error: ADAPTERS: adapter folder '{tmp_path / 'gone'}' not "
                                                      "found\nHint: check the path (relative paths are relative to "
                                                      "the current directory)\n")


@pytest.fixture
def mocked_download(hub_in_process, models_f32, monkeypatch, tmp_path):
    """Resolving asks the fake Hub; the download is mocked (from this process it would go to conftest's closed
    port), drawing huggingface_hub's own bar as snapshot_download does (as tests/test_cli_manners.py)."""
    mock_downloads(monkeypatch, models_f32, tmp_path / "snapshots")
    return hub_in_process


def test_quiet_silences_the_download_bar_as_in_merge_run(cli, mocked_download, models_f32, tmp_path, capsys):
    import re

    from huggingface_hub import constants
    from huggingface_hub.utils import are_progress_bars_disabled

    if constants.HF_HUB_DISABLE_PROGRESS_BARS:
        pytest.skip("HF_HUB_DISABLE_PROGRESS_BARS is set: no bar to silence")
    args = ("--model", "org/ft-a", "--base-model", "org/base", "--max-rank", "4", "--device", "cpu")
    quiet = cli("extract", *args, "-o", tmp_path / "quiet", "-q")
    assert (quiet.exit_code, quiet.stdout, quiet.stderr) == (0, "", "")
    assert not are_progress_bars_disabled()   # switched off for the command only
    loud = cli("extract", *args, "-o", tmp_path / "loud", "--dry-run")
    assert loud.exit_code == 0 and re.search(r"Fetching \d+ files: 100%", loud.stderr)   # the dry run downloads
    extract_lora("org/ft-a", "org/base", tmp_path / "lib", max_rank=4, device="cpu", progress=False)
    assert capsys.readouterr().err == "" and not are_progress_bars_disabled()
    extract_lora(models_f32 / "ft-a", models_f32 / "base", tmp_path / "local", max_rank=4, device="cpu")
    local = (tmp_path / "local" / WEIGHTS).read_bytes()
    assert (tmp_path / "quiet" / WEIGHTS).read_bytes() == (tmp_path / "lib" / WEIGHTS).read_bytes() == local


def test_the_same_snapshot_twice_is_refused(cli, mocked_download, tmp_path):
    result = cli("extract", "--model", "org/ft-a", "--base-model", "org/ft-a@main", "-o", tmp_path / "out", "-q")
    assert (result.exit_code, result.stderr) == (2, "error: --base-model: --model and --base-model are the same model "
                                                    "(one Hub snapshot), so there is no change to extract\nHint: give "
                                                    "the base model the fine-tune was trained from\n")
    assert not (tmp_path / "out").exists()
