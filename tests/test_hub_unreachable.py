"""The Hub unreachable or down, through the fake Hub (tests/helpers/fakehub*.py): one clear line naming the
reference and what to do, never "internal error"; a path that is no local folder says so first."""

from __future__ import annotations

import pytest
from helpers.fakehub import folder_files
from helpers.hubcli import TOKEN
from helpers.models import write_spec

SPEC = """merge_method: task_arithmetic
base_model: {base}
models:
  - model: {a}
    parameters: {{weight: 0.5}}
"""


@pytest.fixture
def hub(fake_hub, models_f32, monkeypatch, tmp_path):
    """org/base and org/ft-a on the fake Hub; this process's huggingface_hub resolves through it. A download
    goes to the closed port conftest sets (its URL template is fixed at import): the Hub is unreachable then."""
    import huggingface_hub.constants as constants

    fake_hub.add_repo("org/base", folder_files(models_f32 / "base"))
    fake_hub.add_repo("org/ft-a", folder_files(models_f32 / "ft-a"))
    monkeypatch.setattr(constants, "ENDPOINT", fake_hub.url)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    return fake_hub


def assert_one_clear_error(result, spec, where: str) -> str:
    assert result.exit_code == 1, result.output
    assert "internal error" not in result.output and "Traceback" not in result.output
    message = result.stderr[result.stderr.find("error: "):]   # after huggingface_hub's "Fetching N files" bar
    assert message.startswith(f"error: {spec}: {where}: "), result.stderr
    return message


def test_server_down(cli, hub, tmp_path):
    hub.stop()   # nothing answers any more
    spec = write_spec(tmp_path / "spec.yaml", SPEC.format(base="org/base", a="models/ft-b"))
    message = assert_one_clear_error(cli("run", spec, "-o", tmp_path / "out"), spec, "base_model")
    assert "no local folder 'org/base', and the Hub could not be reached" in message
    assert "check the network connection" in message and len(message.splitlines()) == 2
    assert not (tmp_path / "out").exists()


def test_unreachable_while_downloading(cli, hub, tmp_path, monkeypatch):
    import huggingface_hub.utils._http as http

    monkeypatch.setattr(http.time, "sleep", lambda seconds: None)   # huggingface_hub's retries, without the waits
    spec = write_spec(tmp_path / "spec.yaml", SPEC.format(base="org/base", a="org/ft-a"))
    message = assert_one_clear_error(cli("run", spec, "-o", tmp_path / "out", "--quiet"), spec, "base_model")
    assert message.startswith(f"error: {spec}: base_model: could not reach the Hub while downloading 'org/base': "
                              "ConnectError: "), message
    assert message.endswith("Hint: check the network connection (and HF_ENDPOINT), then re-run: the download "
                            "resumes; or set HF_HUB_OFFLINE=1 to use only what is in the local Hub cache\n")
    assert not (tmp_path / "out").exists()


def test_mistyped_path_says_so_before_the_hub(cli, hub, tmp_path):
    hub.stop()
    spec = write_spec(tmp_path / "spec.yaml", SPEC.format(base="org/base", a="models/ft-b"))
    result = cli("check", spec)   # merge check never asks the Hub
    assert (result.exit_code, result.stdout) == (0, "")
    message = assert_one_clear_error(cli("run", spec, "-o", tmp_path / "out"), spec, "base_model")
    assert message.startswith(f"error: {spec}: base_model: no local folder 'org/base', and the Hub could not be "
                              "reached when asked for it as a repo ("), message
