"""Shared fixtures: tiny synthetic checkpoints (several shards each), readers, and a CLI runner."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers.models import SHAPE, SHARD, TIED, build_set

from mergekit_lite.testing.synthetic import write_model

# No test reaches the real Hugging Face Hub. huggingface_hub's calls home (telemetry and its agent registry,
# update checks) are off, and a Hub call a test makes by mistake goes to a closed local port. Tests of the Hub
# start the fake Hub of tests/helpers/fakehub.py and run the CLI in a subprocess pointed at it (helpers/hubcli.py).
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_DISABLE_UPDATE_CHECK"] = "1"
os.environ["HF_ENDPOINT"] = "http://127.0.0.1:9"

torch.set_num_threads(1)  # tiny tensors: threads only add overhead and noise on a shared 2-core box


@pytest.fixture(autouse=True)
def _package_logger():
    """The package logger as each test found it: the CLI sets its level (``--quiet``: errors only), its handler
    and propagation for the process, which would otherwise hide later tests' warnings from ``caplog``."""
    logger = logging.getLogger("mergekit_lite")
    saved = (logger.level, list(logger.handlers), logger.propagate)
    yield
    logger.setLevel(saved[0])
    logger.handlers[:] = saved[1]
    logger.propagate = saved[2]


@pytest.fixture(scope="session")
def models_f32(tmp_path_factory) -> Path:
    return build_set(tmp_path_factory.mktemp("f32"), torch.float32)


@pytest.fixture(scope="session")
def models_bf16(tmp_path_factory) -> Path:
    return build_set(tmp_path_factory.mktemp("bf16"), torch.bfloat16)


@pytest.fixture(scope="session")
def models_tied(tmp_path_factory) -> Path:
    """Tied-embedding models (no lm_head.weight on disk), plus one untied fine-tune."""
    root = build_set(tmp_path_factory.mktemp("tied"), torch.float32, TIED)
    write_model(str(root / "untied"), SHAPE, dtype=torch.float32, seed=0, delta_seed=9, max_shard_size=SHARD)
    return root


@pytest.fixture
def tiny_shards(monkeypatch):
    """Let `merge run --max-shard-size` take sizes of a few kB, so that the tiny test models get several shards
    (users get at least 1 MB: cli/mergekit_flags.py)."""
    monkeypatch.setattr("mergekit_lite.cli.mergekit_flags.MIN_SHARD", 1)


@pytest.fixture
def cli():
    """Run `merge ...` in-process; returns click's Result (exit_code, stdout, stderr)."""
    from mergekit_lite.cli import cli as group

    def invoke(*args: str):
        return CliRunner().invoke(group, [str(a) for a in args], catch_exceptions=False)

    return invoke


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory) -> dict[str, Path]:
    """Tiny transformers checkpoints of several layouts (tests/hf_models.py); transformers is imported here only."""
    pytest.importorskip("transformers")
    from helpers import hf_models as hf

    return hf.build(tmp_path_factory.mktemp("hf"))


@pytest.fixture
def fake_hub(tmp_path):
    """A Hub-compatible server on 127.0.0.1 (tests/fakehub.py), with its Xet store under tmp_path."""
    from helpers.fakehub_routes import serve

    hub = serve(tmp_path / "xet-cas")
    yield hub
    hub.stop()
