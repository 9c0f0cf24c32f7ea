"""The peer oracle: run a YAML spec through mergekit 0.1.5 in-process (a test extra; CI installs it)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml


def run_mergekit(spec_text: str, out: Path, seed: int | None = None) -> Path:
    pytest.importorskip("mergekit", reason="mergekit is not installed (pip install -e '.[test]')")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    config = MergeConfiguration.model_validate(yaml.safe_load(spec_text))
    options = MergeOptions(quiet=True, random_seed=seed)
    run_merge(config, str(out), options=options, config_source=spec_text)
    return out


def scale_ulp(tensor: torch.Tensor) -> float:
    """One ulp of the tensor's dtype at the tensor's largest magnitude: the rounding step of its scale."""
    mantissa_bits = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}[tensor.dtype]
    largest = float(tensor.float().abs().max()) if tensor.numel() else 0.0
    return 0.0 if largest == 0 else 2.0 ** (math.floor(math.log2(largest)) - mantissa_bits)


def max_diff_in_scale_ulps(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest |a - b| in units of one ulp at the tensors' scale.

    Element-wise ulp counts are meaningless near zero, where task arithmetic cancels large terms; what a
    lower-precision computation can change is the rounding of the terms, i.e. ulps at the weights' scale.
    """
    step = max(scale_ulp(a), scale_ulp(b))
    diff = float((a.float() - b.float()).abs().max()) if a.numel() else 0.0
    return 0.0 if diff == 0 else diff / step
