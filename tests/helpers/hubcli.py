"""Running `merge` and huggingface_hub in a subprocess pointed at the fake Hub.

huggingface_hub reads HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE once, at import; a fresh process per call is
what makes each test see only its own fake Hub and its own cache. Every call checks that the token appears
in no output.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from .fakehub import FakeHub

TOKEN = "hf_fake_write_token"     # the fake Hub's write token: no output may ever contain it
ROOT = Path(__file__).resolve().parent.parent
DROPPED = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HUGGINGFACE_CO_STAGING", "HF_OIDC_RESOURCE",
           "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN", "HF_HUB_CACHE", "HF_XET_CACHE", "HF_TOKEN_PATH")


def hub_env(hub: FakeHub, home: Path, *, xet: bool = True, token: str | None = TOKEN, **extra: str) -> dict:
    """The environment of a user whose Hub is the fake one, with HF_HOME (cache, token file) under ``home``."""
    env = {k: v for k, v in os.environ.items() if k not in DROPPED}
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               HF_ENDPOINT=hub.url, HF_HOME=str(home), HF_HUB_DISABLE_XET="0" if xet else "1",
               HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_UPDATE_CHECK="1",
               OMP_NUM_THREADS="1")
    env.update(extra)
    if token is not None:
        env["HF_TOKEN"] = token
    return env


def merge(*args, env: dict) -> subprocess.CompletedProcess:
    """`merge ARGS...` as a user runs it; asserts the token is in no output."""
    result = subprocess.run([sys.executable, "-m", "mergekit_lite", *map(str, args)], env=env, capture_output=True,
                            text=True, timeout=300, cwd=ROOT)
    assert TOKEN not in result.stdout + result.stderr
    return result


def python(code: str, env: dict) -> str:
    """Run a Python snippet (e.g. snapshot_download) against the fake Hub; its stdout."""
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def point_at(hub: FakeHub, monkeypatch, cache: Path) -> None:
    """This process's huggingface_hub pointed at the fake Hub, with its cache in ``cache``. Resolving uses
    HfApi(), which reads the endpoint when it is built; a download would not (its URL template is fixed at
    import), and would go to the closed port conftest sets, never to the internet."""
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)


def mock_downloads(monkeypatch, models: Path, snapshots: Path) -> None:
    """huggingface_hub.snapshot_download replaced by a copy of ``models/<name>`` for repo ``org/<name>``, drawing
    huggingface_hub's own bar as the real one does (so tests can see it shown or silenced)."""
    import shutil

    import huggingface_hub
    from huggingface_hub.utils import tqdm as hf_tqdm

    def snapshot_download(repo_id, revision=None, allow_patterns=None, **options):
        files = list(allow_patterns or ())
        for _ in hf_tqdm(files, desc=f"Fetching {len(files)} files", mininterval=0):
            pass
        folder = snapshots / repo_id / revision
        if not folder.exists():
            shutil.copytree(models / repo_id.split("/")[1], folder)
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
