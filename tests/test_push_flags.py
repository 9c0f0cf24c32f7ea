"""`merge push --license / --base-model / --token` against the fake Hub (tests/helpers/fakehub.py): the card
is changed in memory, checked, and sent as checked; the file on disk is left as it was; the token given on
the command line is used and appears in no output."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from helpers.hubcli import TOKEN, hub_env, merge

from mergekit_lite import run_merge
from mergekit_lite.hub.card_check import FRONT_MATTER, check_card
from mergekit_lite.hub.push_plan import card_metadata


@pytest.fixture(scope="module")
def merged(models_f32, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("flags") / "merged"
    spec = {"merge_method": "linear", "parameters": {"weight": 1.0},
            "models": [{"model": str(models_f32 / "ft-a")}, {"model": str(models_f32 / "ft-b")}]}
    run_merge(spec, out, progress=False, device="cpu")
    return out


def front_matter(card: bytes) -> dict:
    return yaml.safe_load(FRONT_MATTER.match(card.decode()).group(1))


def test_license_base_model_and_token_reach_the_hub(merged, fake_hub, tmp_path):
    on_disk = (merged / "README.md").read_bytes()
    env = hub_env(fake_hub, tmp_path / "home", xet=False, token=None)   # no HF_TOKEN, no stored token
    result = merge("push", merged, "--repo", "user/flags", "--license", "apache-2.0", "--base-model", "org/a",
                   "--base-model", "org/b", "--token", TOKEN, env=env)
    assert result.returncode == 0, result.stderr
    sent = fake_hub.files("user/flags")["README.md"].data
    meta = front_matter(sent)
    assert (meta["license"], meta["base_model"], meta["base_model_relation"]) == ("apache-2.0", ["org/a", "org/b"],
                                                                                  "merge")
    assert meta["library_name"] == "transformers" and check_card(sent.decode()).errors == []
    assert sent.split(b"\n---\n", 1)[1] == on_disk.split(b"\n---\n", 1)[1]   # the body as it was
    assert (merged / "README.md").read_bytes() == on_disk                  # the local card is untouched
    assert not (tmp_path / "home" / "token").exists()                      # --token is never stored


def test_dry_run_shows_the_card_as_it_will_be_sent(merged, fake_hub, tmp_path):
    env = hub_env(fake_hub, tmp_path / "home", token=None)
    result = merge("push", merged, "--repo", "user/flags", "--license", "mit", "--base-model", "org/a",
                   "--token", TOKEN, "--dry-run", env=env)
    assert result.returncode == 0, result.stderr
    assert "token     : found (the token argument)" in result.stdout
    assert "model card: base_model=[org/a] base_model_relation=merge library_name=transformers license=mit" \
           in result.stdout
    assert fake_hub.requests() == []


@pytest.mark.parametrize("option, value, message", [
    ("--license", "Apache 2.0", "error: --license: 'Apache 2.0' is not a license identifier of the Hub\n"),
    ("--base-model", "./local/model", "error: --base-model: './local/model' is not a Hub repo id\n"),
])
def test_bad_flags_are_refused_before_any_request(merged, fake_hub, tmp_path, option, value, message):
    env = hub_env(fake_hub, tmp_path / "home")
    result = merge("push", merged, "--repo", "user/flags", option, value, env=env)
    assert result.returncode == 2 and result.stderr.startswith(message), result.stderr
    assert fake_hub.requests() == []


def test_card_metadata_adds_to_what_the_card_has():
    card = b"---\nbase_model:\n- org/a\nlibrary_name: transformers\n---\n# Title\n"
    assert card_metadata(card, "llama3.1", ["org/a", "org/c"]) == (
        b"---\nbase_model:\n- org/a\n- org/c\nlibrary_name: transformers\nbase_model_relation: merge\n"
        b"license: llama3.1\n---\n# Title\n")
    assert card_metadata(b"# No front matter\n", "mit", []) == b"---\nlicense: mit\n---\n# No front matter\n"
