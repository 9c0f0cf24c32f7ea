"""`merge methods` documents every method from its declarations; third-party strategies register through
the `mergekit_lite.strategies` entry-point group."""

from __future__ import annotations

import importlib
import sys
import textwrap

import torch
from helpers.models import read_folder

TIES = """\
ties: TIES
  Task arithmetic after trimming each task vector to its largest entries and electing a sign per entry; only agreeing entries are averaged.
  paper: https://arxiv.org/abs/2306.01708
  base_model: required
  models (besides a separate base): 1 or more
  random: no
  parameters:
    weight (float, per model, not for the base, required, range [-inf, inf]): scales this model's task vector (before the sign vote)
    density (float, per model, not for the base, default 1, range [0, 1]): fraction of this model's task vector entries kept
    normalize (bool, per merge, default true, range true/false): divide the combined task vector by the sum of the weights that took part
    rescale (bool, per merge, default false, range true/false): after pruning, scale each task vector back to its L1 norm
    lambda (float, per merge, default 1, range [-inf, inf]): scales the combined task vector, applied last
    int8_mask (bool, per merge, default false, range true/false): accepted for mergekit configs; no effect on the result (mergekit: the dtype of a temporary mask)
  Every parameter accepts a value, a gradient list, or a list of {filter, value} entries.
"""  # noqa: E501


def test_methods_ties_in_detail(cli):
    result = cli("methods", "ties")
    assert result.exit_code == 0 and result.stdout == TIES


def test_each_method_shows_its_own_parameters_and_paper(cli):
    expected = {
        "dare_ties": ("https://arxiv.org/abs/2311.03099", "random: yes", "rescale (bool, per merge, default true"),
        "breadcrumbs": ("https://arxiv.org/abs/2312.06795", "gamma (float, per model, not for the base, default "
                        "0.01, range [0, 1])", "normalize (bool, per merge, default false"),
        "della": ("https://arxiv.org/abs/2406.11617", "epsilon (float, per model, not for the base, default 0.15, "
                  "range [0, 1])", "normalize (bool, per merge, default true"),
        "slerp": ("models (besides a separate base): exactly 1", "t (float, per merge, required", "base_model: required"),
        "nuslerp": ("base_model: optional", "nuslerp_flatten (bool, per merge, default true",
                    "nuslerp_row_wise (bool, per merge, default false"),
        "model_stock": ("https://arxiv.org/abs/2403.19522", "models (besides a separate base): 2 or more",
                        "filter_wise (bool, per merge, default false"),
    }
    for method, lines in expected.items():
        result = cli("methods", method)
        assert result.exit_code == 0
        for line in lines:
            assert line in result.stdout, (method, line)
    listing = cli("methods").stdout
    for method in ["ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear",
                   "slerp", "nuslerp", "model_stock"]:
        assert f"\n{method} " in "\n" + listing


def test_entry_point_plugin(cli, models_f32, tmp_path, monkeypatch):
    """A package that declares a strategy under the entry-point group is listed and runs by name."""
    (tmp_path / "negate_plugin.py").write_text(textwrap.dedent('''
        from mergekit_lite.strategy import Param, Strategy

        def negate(inputs, base, ctx, *, weight):
            return -sum(w * x for w, x in zip(weight, inputs))

        STRATEGY = Strategy(name="negate", fn=negate, title="Negated sum", summary="minus the weighted sum",
                            base="input", params=(Param("weight", float, "how much", per_model=True),))
    '''))
    dist = tmp_path / "negate_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: negate-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[mergekit_lite.strategies]\nnegate = negate_plugin:STRATEGY\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    try:
        assert "negate" in cli("methods").stdout
        assert "negate: Negated sum" in cli("methods", "negate").stdout
        spec = (f"merge_method: negate\nmodels:\n  - model: {models_f32}/ft-a\n    parameters: {{weight: 1}}\n"
                f"  - model: {models_f32}/ft-b\n    parameters: {{weight: 0.5}}\n")
        (tmp_path / "spec.yaml").write_text(spec)
        result = cli("run", tmp_path / "spec.yaml", "-o", tmp_path / "out", "--quiet")
        assert result.exit_code == 0, result.output
        got = read_folder(tmp_path / "out")
        a, b = read_folder(models_f32 / "ft-a"), read_folder(models_f32 / "ft-b")
        name = "model.layers.1.self_attn.q_proj.weight"
        assert torch.equal(got[name], -(0 + 1.0 * a[name] + 0.5 * b[name]))
    finally:
        sys.modules.pop("negate_plugin", None)


def test_sce_multislerp_karcher_nearswap_are_documented(cli):
    expected = {
        "sce": ("https://arxiv.org/abs/2408.07990", "base_model: required",
                "select_topk (float, per merge, default 1, range [0, 1])", "int8_mask (bool, per merge, default false"),
        "multislerp": ("base_model: optional\n", "weight (float, per model, not for the base, required",
                       "normalize_weights (bool, per merge, default true", "eps (float, per merge, default 1e-08"),
        "karcher": ("base_model: optional; when given it is merged as one more input",
                    "max_iter (int, per merge, default 10, range [0, inf])", "tol (float, per merge, default 1e-05"),
        "nearswap": ("models (besides a separate base): exactly 1", "t (float, per merge, required"),
    }
    for method, lines in expected.items():
        result = cli("methods", method)
        assert result.exit_code == 0
        for line in lines:
            assert line in result.stdout, (method, line)
        assert f"\n{method} " in "\n" + cli("methods").stdout
