"""The specs scripts/showcase.py writes are accepted as they are: every parameter known to its method, none
ignored with a warning. The showcase itself (a real model, minutes of CPU) is not run in CI; this catches a
misspelt parameter before a user spends those minutes. Methods not registered yet are skipped."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from mergekit_lite import make_plan
from mergekit_lite.strategies.registry import all_strategies

sys.path.insert(0, str(Path(__file__).parent.parent / "scripts"))
import showcase  # noqa: E402


def showcase_merges(models: Path) -> list:
    base, fine_tunes = str(models / "base"), [str(models / "ft-a"), str(models / "ft-b")]
    return showcase.merges(base, fine_tunes, showcase.MergeSettings()) + showcase.sweep_grid(base, fine_tunes)


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "dare_ties"])
def test_every_parameter_is_accepted(models_f32, method):
    if method not in all_strategies():
        pytest.skip(f"{method} is not registered yet")
    merges = [m for m in showcase_merges(models_f32) if m.method == method]
    assert len(merges) == {"linear": 1, "task_arithmetic": 4, "ties": 10, "dare_ties": 10}[method]
    for merge in merges:
        plan = make_plan(merge.spec)
        try:
            assert plan.strategy.name == method
            assert plan.warnings == [], merge.name
            assert len(plan.jobs) == 4 * 9 + 3   # 4 layers of 9 tensors, embeddings, final norm, lm_head
        finally:
            plan.close()
