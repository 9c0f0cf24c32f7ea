"""Property: any spec, with any parameter values, ends in a merge or in one of our errors; never a traceback.

Specs are generated from the pieces users write (methods, model references, parameters with scalars,
gradients and filters, dtypes) and the pieces they get wrong (unknown keys and methods, NaN, Inf, huge,
negative and zero weights, wrong types, missing models). Most runs are dry runs (the whole check, no
tensor read); a bounded number merge for real, and what they write must be finite and complete.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from helpers.hostile import Models, build_models
from helpers.models import read_folder
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mergekit_lite.output.folder import LOCK_SUFFIX

NUMBERS = st.one_of(st.sampled_from([0.0, 0.5, 1.0, -0.5, -1.0, 1e-9, 2.0, 1e30, 3e38, 1e39, float("nan"),
                                     float("inf"), -float("inf")]),
                    st.floats(-10, 10), st.integers(-3, 3), st.integers(10**20, 10**30))
SCALARS = st.one_of(NUMBERS, st.booleans(), st.sampled_from(["0.5", "1e-3", "yes", "maybe", "", "linear"]))
VALUES = st.one_of(SCALARS, st.lists(SCALARS, min_size=1, max_size=4),
                   st.lists(st.fixed_dictionaries({"value": SCALARS},
                                                  optional={"filter": st.sampled_from(["mlp", "self_attn", "norm",
                                                                                       "embed", "*", None])}),
                            min_size=1, max_size=3))
PARAM_NAMES = st.sampled_from(["weight", "weight", "weight", "normalize", "lambda", "scale", "attention", "fallback",
                               "density", "weigth", "t", "t", "gamma", "epsilon", "rescale", "nuslerp_flatten",
                               "nuslerp_row_wise", "filter_wise", "int8_mask"])
PARAMETERS = st.dictionaries(PARAM_NAMES, VALUES, max_size=3)
METHODS = st.sampled_from(["linear", "linear", "task_arithmetic", "task_arithmetic", "passthrough", "concat", "ties",
                           "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear",
                           "slerp", "slerp", "nuslerp", "nuslerp", "model_stock", "lineer"])


SOUND = st.fixed_dictionaries({"weight": st.one_of(st.sampled_from([0.25, 0.5, 1.0]),
                                                 st.lists(st.sampled_from([0.0, 0.5, 1.0]), min_size=2, max_size=3))})


@st.composite
def specs(draw, models: Models) -> dict:
    """Half of the specs are sound but for one random part; the rest are random throughout."""
    refs = [str(models.a), str(models.b), str(models.sharded)]
    sound = draw(st.booleans())
    ref = st.sampled_from(refs) if sound else \
        st.one_of(st.sampled_from(refs), st.sampled_from([str(models.root / "missing"), "org/name@", "", 5]))
    spec: dict = {"merge_method": draw(st.sampled_from(["linear", "task_arithmetic", "ties", "dare_linear", "della",
                                                        "model_stock"]) if sound else METHODS)}
    spec["models"] = [{"model": draw(ref), "parameters": draw(SOUND if sound else PARAMETERS)}
                      for _ in range(draw(st.integers(1, 3)))]
    if sound and spec["merge_method"] != "linear":
        spec["base_model"] = str(models.a)
    if draw(st.booleans()):
        spec["base_model"] = draw(ref)
    if draw(st.booleans()):
        spec["parameters"] = draw(PARAMETERS)
    for key, choices in (("dtype", ["bfloat16", "float16", "float32", "int8", 3]),
                         ("out_dtype", ["bfloat16", "float16", "float32"]),
                         ("tokenizer_source", ["base", "union", *refs]), ("merge_methd", ["linear"])):
        if not draw(st.integers(0, 4)):
            spec[key] = draw(st.sampled_from(choices))
    return spec


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Models:
    return build_models(tmp_path_factory.mktemp("tiny"))


def run_spec(cli, spec: dict, folder: Path, *extra: str):
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    out = folder / "out"
    return cli("run", path, "-o", out, "--quiet", "--overwrite", *extra), out


def assert_ours(result) -> None:
    """Exit 0, or 1/2 with one error of ours: 'error: ...' and at most a hint; never 'internal error'."""
    assert result.exit_code in (0, 1, 2), result.output
    if result.exit_code:
        lines = result.stderr.splitlines()
        errors = [line for line in lines if line.startswith("error: ")]
        assert len(errors) == 1 and "internal error" not in result.stderr and "Traceback" not in result.stderr, \
            result.stderr
        after = lines[lines.index(errors[0]) + 1:]
        assert not after or (len(after) >= 1 and after[0].startswith("Hint: ")), result.stderr


# derandomize: CI sees the same examples every run (scripts/fuzz_headers.py is the open-ended search).
SETTINGS = dict(deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))


def test_dry_runs_end_in_a_plan_or_our_error(cli, tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("dry")

    @settings(max_examples=250, **SETTINGS)
    @given(specs(tiny))
    def check(spec):
        result, out = run_spec(cli, spec, folder, "--dry-run")
        assert_ours(result)
        assert not out.exists()

    check()


def test_merges_end_in_a_finite_output_or_our_error(cli, tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("real")
    merged = []

    @settings(max_examples=60, **SETTINGS)
    @given(specs(tiny))
    def check(spec):
        result, out = run_spec(cli, spec, folder, "--no-validate")
        assert_ours(result)
        if result.exit_code == 0:
            tensors = read_folder(out)
            assert tensors and all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point())
            merged.append(spec["merge_method"])
        assert not Path(f"{out}{LOCK_SUFFIX}").exists()

    check()
    assert len(merged) >= 3, "the generator should produce some valid specs"


@settings(max_examples=150, **SETTINGS)
@given(st.floats(allow_nan=True, allow_infinity=True) | st.integers(-10**400, 10**400) | st.text(max_size=5))
def test_any_weight_value_is_a_number_in_range_or_a_spec_error(value):
    from mergekit_lite.errors import SpecError
    from mergekit_lite.strategies.registry import get_strategy

    for method in ("linear", "task_arithmetic", "concat"):
        param = get_strategy(method).param("weight")
        try:
            number = param.coerce(value, "models[0].parameters.weight")
        except SpecError as exc:
            assert exc.where == "models[0].parameters.weight" and len(str(exc)) < 300
            continue
        assert math.isfinite(number) and abs(number) <= 3.4028234663852886e38
        assert param.min is None or number >= param.min
