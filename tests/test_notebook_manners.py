"""Notebook and library manners: dir() shows the lazy exports, results and reports have short reprs and HTML
tables, a failed validation raises (strict=False: warns), load_tensor reads one tensor, a fold's card speaks
of a fold and embeds a spec mergekit's own parser accepts."""

from __future__ import annotations

import re

import pytest
import torch
import yaml
from helpers.models import SHAPE
from safetensors import safe_open

import mergekit_lite
from mergekit_lite import ValidationFailed, load_tensor, run_merge
from mergekit_lite.errors import ModelError

SPEC = "merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.5}}\n  - model: {b}\n" \
       "    parameters: {{weight: 0.5}}\ndtype: float32\n"


def spec_for(models) -> str:
    return SPEC.format(a=models / "ft-a", b=models / "ft-b")


def test_dir_lists_the_lazy_exports():
    names = dir(mergekit_lite)
    for name in ("run_merge", "load_tensor", "validate", "fold_lora", "push_to_hub", "MergeResult", "__version__"):
        assert name in names


def test_result_and_report_reprs_are_short_with_html_tables(models_f32, tmp_path):
    result = run_merge(spec_for(models_f32), tmp_path / "out", progress=False, device="cpu")
    assert re.fullmatch(r"<MergeResult 39 tensors \(.+, 1 shard\(s\)\) in '.+/out', validation passed>", repr(result))
    assert re.fullmatch(r"<ValidationReport PASSED '.+/out' on cpu: structure=passed, finite=passed, "
                        r"recompute=passed, forward=\w+>", repr(result.validation)), repr(result.validation)
    html = result._repr_html_()
    assert "<table>" in html and "<th>tensors</th><td style='text-align:left'>39</td>" in html
    assert "<td>recompute</td><td><b>passed</b></td>" in html   # the report's table, under the result's
    planned = mergekit_lite.push_to_hub(result.path, "user/x", dry_run=True)   # no request is made
    assert re.fullmatch(r"<PushResult would push 8 files \(.+\) to \S+/user/x>", repr(planned))   # conftest's endpoint
    assert "<b>Push (dry run: nothing sent)</b>" in planned._repr_html_()
    dry = run_merge(spec_for(models_f32), tmp_path / "out2", progress=False, dry_run=True)
    assert repr(dry).startswith("<MergeResult dry run: 39 tensors") and len(repr(dry)) < 200
    assert "<pre>" in dry._repr_html_() and "Dry run: nothing was written" in dry._repr_html_()


def corrupt_lm_head(monkeypatch):
    from mergekit_lite.output import writer

    original = writer.ShardWriter.write

    def corrupting(self, name, tensor, rows=None):
        original(self, name, tensor * 1.001 if name == "lm_head.weight" else tensor, rows)

    monkeypatch.setattr(writer.ShardWriter, "write", corrupting)


def test_a_failed_validation_raises_and_strict_false_warns(models_f32, tmp_path, monkeypatch):
    corrupt_lm_head(monkeypatch)
    with pytest.raises(ValidationFailed) as raised:
        run_merge(spec_for(models_f32), tmp_path / "out", progress=False, device="cpu")
    error = raised.value
    assert error.exit_code == 1 and error.report.failed and error.result.validation is error.report
    assert str(error).startswith(f"run_merge: validation failed (recompute); the output was written and stays in "
                                 f"{tmp_path / 'out'} for inspection\nHint: ")
    assert (tmp_path / "out" / "model.safetensors").exists()
    with pytest.warns(UserWarning, match=r"the validation of .*/out2 failed: Validation FAILED on cpu"):
        result = run_merge(spec_for(models_f32), tmp_path / "out2", progress=False, device="cpu", strict=False)
    assert result.validation.failed


def test_a_not_checked_validation_never_raises(models_f32, tmp_path, monkeypatch):
    import mergekit_lite.validation as validation
    from mergekit_lite.validation.report import CheckResult, ValidationReport

    report = ValidationReport(str(tmp_path / "out"), "cpu", "given", False,
                              [CheckResult("forward", "not_checked", "no transformers")])
    monkeypatch.setattr(validation, "validate", lambda *args, **kwargs: report)
    result = run_merge(spec_for(models_f32), tmp_path / "out", progress=False, device="cpu")
    assert result.validation.status == "not_checked"


def test_load_tensor_reads_one_tensor_and_suggests_names(models_f32, tmp_path):
    out = tmp_path / "out"
    run_merge(spec_for(models_f32), out, progress=False, max_shard_size="300KB", device="cpu")
    name = "model.layers.1.mlp.up_proj.weight"
    index = (out / "model.safetensors.index.json").read_text()
    shard = re.search(rf'"{re.escape(name)}": "([^"]+)"', index).group(1)
    with safe_open(str(out / shard), framework="pt") as f:   # the independent reader: the safetensors library
        assert torch.equal(load_tensor(out, name), f.get_tensor(name))
    with pytest.raises(ModelError) as raised:
        load_tensor(out, "model.layers.1.mlp.up_proj.weigth")
    assert str(raised.value) == (f"{out}: no tensor 'model.layers.1.mlp.up_proj.weigth' here (39 tensors). "
                                 f"Did you mean '{name}'?")


def test_load_tensor_reads_an_adapter(tmp_path):
    from mergekit_lite.testing.adapters import AdapterShape, write_adapter
    from mergekit_lite.testing.synthetic import LlamaShape

    shape = LlamaShape(hidden=32, intermediate=64, layers=1, heads=2, kv_heads=1, vocab=64)
    adapter = write_adapter(str(tmp_path / "adapter"), shape, AdapterShape(targets=("q_proj",), r=2), seed=1)
    name = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), framework="pt") as f:
        assert torch.equal(load_tensor(adapter, name), f.get_tensor(name))


def test_a_fold_card_speaks_of_a_fold_and_mergekit_reads_its_spec(models_f32, tmp_path):
    pytest.importorskip("peft")
    from mergekit.config import MergeConfiguration

    from mergekit_lite import fold_lora
    from mergekit_lite.testing.adapters import write_adapter

    adapter = write_adapter(str(tmp_path / "adapter"), SHAPE)
    fold_lora(models_f32 / "base", adapter, tmp_path / "out", progress=False, device="cpu", validate=False)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "LoRA adapters folded into its weights" in card and "## Fold details" in card
    assert "This is a merge" not in card and "Models merged" not in card
    spec = yaml.safe_load(card.split("```yaml\n")[1].split("```")[0])
    assert spec == {"merge_method": "passthrough", "models": [{"model": f"{models_f32 / 'base'}+{adapter}"}]}
    parsed = MergeConfiguration.model_validate(spec)   # mergekit's own parser: base+adapter is its LoRA syntax
    (model,) = parsed.referenced_models()
    assert str(model.model.path) == str(models_f32 / "base") and str(model.lora.path) == adapter
    # Two adapters, or a weight, have no mergekit form: the card keeps mergekit_lite's spec
    fold_lora(models_f32 / "base", [adapter, adapter], tmp_path / "two", [1.0, 0.5], progress=False, device="cpu",
              validate=False)
    assert "lora:" in (tmp_path / "two" / "README.md").read_text()
