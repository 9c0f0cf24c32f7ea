"""`merge push --dry-run` and the checks every push makes first: local only, no request, no token shown."""

from __future__ import annotations

import json
import logging
import socket
import struct
from pathlib import Path

import pytest

from mergekit_lite import push_to_hub, run_merge
from mergekit_lite.hub.card_check import check_card
from mergekit_lite.hub.push_files import select_files
from mergekit_lite.output.card import card_text
from mergekit_lite.spec.references import ModelPath

SECRET = "hf_local_secret_token_123"
CARD = """---
base_model:
- org/model-a
- org/model-b
base_model_relation: merge
library_name: transformers
license: apache-2.0
tags: [merge, mergekit]
---
# merged
"""


@pytest.fixture(autouse=True)
def offline_machine(monkeypatch, tmp_path):
    """No socket may connect, and the developer's own token is out of reach."""
    import huggingface_hub.constants as constants

    def refuse(*args, **kwargs):
        raise AssertionError("a dry run opened a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token-file"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_TOKEN", SECRET)


def safetensors(size: int) -> bytes:
    """A safetensors file of exactly ``size`` bytes: one uint8 tensor filling what the header leaves."""
    header = b""
    for _ in range(2):  # the tensor's length changes the header's length by at most a digit: settle it
        data = size - 8 - len(header)
        header = json.dumps({"w": {"dtype": "U8", "shape": [data], "data_offsets": [0, data]}}).encode()
    return struct.pack("<Q", len(header)) + header + b"\0" * (size - 8 - len(header))


def model_folder(root: Path, card: str | None = CARD, **extra: bytes) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    files = {"model.safetensors": safetensors(3000), "config.json": b"{}", "tokenizer.json": b"{}" * 10,
             "mergekit_config.yml": b"merge_method: linear\nmodels:\n  - model: org/model-a\n  - model: org/model-b\n"}
    for name, data in {**files, **extra}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    if card is not None:
        (root / "README.md").write_text(card)
    return root


def dry_run(cli, folder, *args):
    result = cli("push", folder, "--repo", "user/merged", "--dry-run", *args)
    assert SECRET not in result.output
    return result


def test_dry_run_prints_the_plan(cli, tmp_path):
    folder = model_folder(tmp_path / "out", **{"notes.txt": b"x", "pytorch_model.bin": b"p", ".cache/x": b"",
                                                "runs/extra.safetensors": b"x", "old.partial/y": b""})
    result = dry_run(cli, folder, "--private")
    assert result.exit_code == 0, result.output
    assert result.stdout == """\
DRY RUN: nothing was sent, and no request was made
target    : http://127.0.0.1:9/user/merged (model, private=yes, revision=main, create_pr=no)
repo      : created if missing; an existing repo keeps its visibility
token     : found (the HF_TOKEN environment variable)
commit    : "Upload merged model (linear, 2 models)"
files     : 5 to upload, 3.25 kB; 5 excluded
  README.md                                     155 B
  config.json                                     2 B
  mergekit_config.yml                            75 B
  model.safetensors                           3.00 kB  (large: Xet/LFS)
  tokenizer.json                                 20 B
  excluded: .cache/ (hidden)
  excluded: notes.txt (not a model file)
  excluded: old.partial/ (left by an interrupted merge)
  excluded: pytorch_model.bin (pickle (loading one can run code))
  excluded: runs/ (a subfolder: a merge writes none)
model card: base_model=[org/model-a, org/model-b] base_model_relation=merge library_name=transformers \
license=apache-2.0 tags=[merge, mergekit]
warning   : pickle files present (not uploaded): pytorch_model.bin
verdict   : ready: run again without --dry-run to push
"""


def test_dry_run_without_a_token_says_so_and_fails(cli, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    result = dry_run(cli, model_folder(tmp_path / "out"))
    assert result.exit_code == 1
    assert "token     : MISSING: the push would fail\n" in result.stdout
    assert "error     : no Hugging Face token found\nverdict   : the push would fail (see the errors above)\n" \
        in result.stdout
    assert result.stderr == ("error: no Hugging Face token found\n"
                             "Hint: run `hf auth login` or set HF_TOKEN, with write access to user\n")


def test_token_file_is_named_never_shown(cli, tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.delenv("HF_TOKEN")
    (tmp_path / "token").write_text(SECRET + "\n")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "token"))
    result = dry_run(cli, model_folder(tmp_path / "out"))
    assert result.exit_code == 0
    assert f"token     : found (the token file {tmp_path}/token (from `hf auth login`))\n" in result.stdout


def test_card_warnings(cli, tmp_path):
    result = dry_run(cli, model_folder(tmp_path / "out", card="---\ntags: [merge]\n---\n# x\n"))
    assert result.exit_code == 0
    assert ("warning   : README.md has no library_name: the Hub will not show how to load the model (add "
            "library_name: transformers)\nwarning   : README.md has no license: set the license the merged models "
            "allow (e.g. license: apache-2.0), or license: other with license_name and license_link\n") in result.stdout


@pytest.mark.parametrize("card, message", [
    ("---\nbase_model: [org/a\n---\n",
     "metadata is not valid YAML at line 2, column 19: expected ',' or ']', but got '<stream end>'"),
    ("---\n- a\n- b\n---\n", "metadata must be a mapping of keys to values, not a list"),
    ("---\nbase_model: [org/a, ./models/ft-b]\n---\n",
     "base_model: './models/ft-b' is not a Hub repo id (org/name); the Hub rejects a local path there. "
     "List Hub ids only, or remove base_model"),
    ("---\nbase_model: org/a\nbase_model_relation: merged\n---\n",
     "base_model_relation: 'merged' is not one of adapter, merge, quantized, finetune"),
    ("---\ntags: merge\n---\n", "tags: must be a list of strings"),
], ids=["yaml", "mapping", "local-path", "relation", "tags"])
def test_card_errors_block_the_push(cli, tmp_path, card, message):
    result = dry_run(cli, model_folder(tmp_path / "out", card=card))
    assert result.exit_code == 1
    assert f"error     : {message} (README.md)\n" in result.stdout
    assert result.stderr == f"error: README.md: {message}\nHint: fix the front matter of README.md, then re-run\n"


def test_no_weights(cli, tmp_path):
    folder = model_folder(tmp_path / "out")
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"pickle")
    result = dry_run(cli, folder)
    assert result.exit_code == 1
    assert result.stderr == (f"error: {folder}: no *.safetensors weights to upload\n"
                             "Hint: give the output folder of `merge run`; pickle weights are never uploaded\n")


def test_index_naming_a_missing_shard(cli, tmp_path):
    index = b'{"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors", ' \
            b'"b": "model-00002-of-00002.safetensors"}}'
    folder = model_folder(tmp_path / "out", **{"model.safetensors.index.json": index,
                                               "model-00001-of-00002.safetensors": safetensors(100)})
    result = dry_run(cli, folder)
    assert result.exit_code == 1
    assert result.stderr == ("error: model.safetensors.index.json: the index lists 1 shard(s) that are not in the "
                             "folder: model-00002-of-00002.safetensors\nHint: the folder is incomplete; re-run the "
                             "merge\n")


@pytest.mark.parametrize("args, expected", [
    (("--repo", "user/merged", "--create-pr", "--revision", "dev"),
     "error: --revision: --create-pr opens a pull request against main; it cannot be combined with --revision\n"
     "Hint: drop --revision, or push to the branch without --create-pr\n"),
    (("--repo", "not a repo"),
     "error: --repo: 'not a repo' is not a Hub repo id\n"
     "Hint: write namespace/name (your user name or an organization, then the model's name)\n"),
], ids=["pr-and-revision", "repo-id"])
def test_usage_errors(cli, tmp_path, args, expected):
    result = cli("push", model_folder(tmp_path / "out"), *args, "--dry-run")
    assert (result.exit_code, result.stderr) == (2, expected)


def test_missing_and_unfinished_folders(cli, tmp_path):
    result = cli("push", tmp_path / "nope", "--repo", "user/merged", "--dry-run")
    assert (result.exit_code, result.stderr) == (2, f"error: OUT: '{tmp_path}/nope' is not a folder\nHint: give the "
                                                    "output folder of `merge run` (the one holding *.safetensors)\n")
    partial = model_folder(tmp_path / "out.partial")
    result = cli("push", partial, "--repo", "user/merged", "--dry-run")
    assert (result.exit_code, result.stderr) == (2, f"error: OUT: '{partial}' is the unfinished output of a merge\n"
                                                    "Hint: push the final folder (without .partial), after the merge "
                                                    "completed\n")


def test_library_dry_run(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    result = push_to_hub(model_folder(tmp_path / "out"), "user/merged", dry_run=True, token=SECRET)
    assert result.dry_run and result.files == 5 and result.bytes == 3252 and result.commit_url is None
    assert str(result) == result.summary and result.summary.startswith("DRY RUN: nothing was sent")
    assert "token     : found (the token argument)\n" in result.summary and SECRET not in result.summary


def test_selection_is_the_files_a_merge_reads_plus_card_and_recipe(tmp_path):
    names = ["model-00001-of-00002.safetensors", "model.safetensors.index.json", "config.json",
             "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
             "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "README.md",
             "mergekit_config.yml", "merge_run.json",
             "training_args.bin", "optimizer.pt", "rng_state.pth", "notes.md", ".gitattributes"]
    for name in names:
        (tmp_path / name).write_text("x")
    sent, left, refused = select_files(str(tmp_path))
    assert sorted(f.path for f in sent) == sorted(names[:15])
    assert {f.path: f.reason for f in left} == {
        ".gitattributes": "hidden", "notes.md": "not a model file", "optimizer.pt": "pickle (loading one can run code)",
        "rng_state.pth": "pickle (loading one can run code)", "training_args.bin": "pickle (loading one can run code)"}
    assert refused == []


def test_our_own_card_passes_the_check():
    text = card_text("merged", "Linear", None, [ModelPath("org/b"), ModelPath("./local-c")], ModelPath("org/a", "v1"),
                     "merge_method: linear\n", commits={ModelPath("org/a", "v1"): "a" * 40})
    check = check_card(text)
    assert check.errors == []
    assert check.metadata["base_model"] == ["org/a", "org/b"] and check.metadata["base_model_relation"] == "merge"
    assert [w.split(":")[0] for w in check.warnings] == ["README.md has no license"]
    assert f"[org/a](https://huggingface.co/org/a) (revision `v1`, commit `{'a' * 40}`)" in text


def test_run_checks_the_push_options_before_merging(cli, models_f32, tmp_path, monkeypatch):
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"merge_method: linear\nparameters: {{weight: 1}}\nmodels:\n  - model: {models_f32}/ft-a\n")
    result = cli("run", spec, "-o", tmp_path / "out", "--private")
    assert (result.exit_code, result.stderr) == (2, "error: --private: --private only applies with --push-to-hub\n"
                                                    "Hint: add --push-to-hub ORG/NAME, or drop --private\n")
    result = cli("run", spec, "-o", tmp_path / "out", "--push-to-hub", "nope")
    assert (result.exit_code, result.stderr) == (2, "error: --push-to-hub: 'nope' is not a Hub repo id\nHint: write "
                                                    "namespace/name (your user name or an organization, then the "
                                                    "model's name)\n")
    monkeypatch.delenv("HF_TOKEN")
    result = cli("run", spec, "-o", tmp_path / "out", "--push-to-hub", "user/x", "--dry-run")
    assert (result.exit_code, result.stderr) == (1, "error: no Hugging Face token found\nHint: run `hf auth login` "
                                                    "or set HF_TOKEN, with write access to user\n")
    assert not (tmp_path / "out").exists()
    monkeypatch.setenv("HF_TOKEN", SECRET)
    result = cli("run", spec, "-o", tmp_path / "out", "--push-to-hub", "user/x", "--dry-run")
    assert result.exit_code == 0 and result.stdout.endswith("\nThen push to the Hub repo user/x.\n")


def test_a_merge_that_fails_validation_is_not_pushed(models_f32, tmp_path, monkeypatch, caplog):
    import mergekit_lite.validation as validation

    class Failed:
        passed, failed = False, True

        def verdict(self):
            return "Validation FAILED on cpu"

    monkeypatch.setattr(validation, "validate", lambda *args, **kwargs: Failed())
    monkeypatch.setattr(logging.getLogger("mergekit_lite"), "propagate", True)  # a CLI test may have turned it off
    spec = {"merge_method": "linear", "parameters": {"weight": 1.0}, "models": [{"model": str(models_f32 / "ft-a")}]}
    with pytest.warns(UserWarning, match="Validation FAILED on cpu"):   # strict=False: warns instead of raising
        result = run_merge(spec, tmp_path / "out", progress=False, push_to_hub="user/x", strict=False)  # no request
    assert result.pushed is None and not result.validation.passed
    assert f"not pushed to user/x: the validation failed (after a look at the report, `merge push {tmp_path}/out " \
           "--repo user/x` pushes it anyway)" in caplog.text
