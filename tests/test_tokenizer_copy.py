"""``tokenizer_source: base`` / ``tokenizer: {source: ...}`` over models that already share the source's vocabulary:
nothing is remapped, so the source's tokenizer files are copied as they are, without transformers (as before
tokenizer merging existed). A source that does change rows still needs transformers, and says so."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from helpers.models import read_folder

from mergekit_lite import run_merge
from mergekit_lite.errors import SpecError
from mergekit_lite.testing.synthetic import LlamaShape, write_model

SHAPE = LlamaShape(hidden=32, intermediate=48, layers=2, heads=4, kv_heads=2, vocab=64)
FILES = ("tokenizer.json", "tokenizer_config.json")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("copy_models")
    for name, delta in (("base", None), ("ft-a", 1), ("ft-b", 2)):
        write_model(str(root / name), SHAPE, seed=0, delta_seed=delta, max_shard_size=40_000)
    # ft-b's tokenizer files differ in bytes from the base's (key order, a chat template), not in vocabulary
    config = root / "ft-b" / "tokenizer_config.json"
    data = json.loads(config.read_text())
    config.write_text(json.dumps({"chat_template": "{{ 'b' }}{# twenty chars #}", **dict(reversed(data.items()))}))
    write_model(str(root / "wide"), LlamaShape(**{**SHAPE.__dict__, "vocab": 72}), seed=3, delta_seed=4)
    return root


@pytest.fixture
def no_transformers(monkeypatch):
    """``import transformers`` raises ImportError, as when the [tokenizer] extra is not installed."""
    for name in [n for n in sys.modules if n == "transformers" or n.startswith("transformers.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "transformers", None)


@pytest.fixture(scope="module")
def plain(models, tmp_path_factory):
    """The same merge with no tokenizer key."""
    out = tmp_path_factory.mktemp("plain") / "out"
    run_merge(spec(models, ""), out, progress=False, validate=False)
    return read_folder(out)


def spec(root, tokenizer: str) -> str:
    return (f"merge_method: ties\nbase_model: {root}/base\nmodels:\n"
            f"  - model: {root}/ft-a\n    parameters: {{weight: 0.6, density: 0.5}}\n"
            f"  - model: {root}/ft-b\n    parameters: {{weight: 0.4, density: 0.7}}\n{tokenizer}")


@pytest.mark.parametrize("tokenizer, source", [
    ("tokenizer_source: base\n", "base"),
    ("tokenizer:\n  source: base\n", "base"),
    ("tokenizer_source: {root}/ft-b\n", "ft-b"),
    ("tokenizer: {{source: {root}/ft-a}}\n", "ft-a"),
])
def test_a_shared_vocabulary_is_copied_without_transformers(models, plain, tmp_path, no_transformers, tokenizer,
                                                            source):
    run_merge(spec(models, tokenizer.format(root=models)), tmp_path / "out", progress=False, validate=False)
    assert "transformers" not in {n.split(".")[0] for n in sys.modules if sys.modules[n] is not None}
    for name in FILES:   # byte for byte the source's
        assert (tmp_path / "out" / name).read_bytes() == (models / source / name).read_bytes(), name
    # the tensors are those of the same merge with no tokenizer key (rows unchanged)
    out = read_folder(tmp_path / "out")
    assert sorted(out) == sorted(plain) and all(torch.equal(out[n], plain[n]) for n in out)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == 64


@pytest.mark.parametrize("tokenizer", [
    "tokenizer_source: {root}/wide\n",                    # 72 tokens over 64-row models: the rows change
    "tokenizer_source: union\n",
    "tokenizer:\n  source: base\n  pad_to_multiple_of: 48\n",
    "tokenizer:\n  source: base\n  tokens: {{'<s>': {{source: {root}/ft-a, force: true}}}}\n",
    "tokenizer_source: base\nchat_template: chatml\n",
])
def test_a_real_remap_still_needs_transformers(models, tmp_path, no_transformers, tokenizer):
    with pytest.raises(SpecError) as error:
        run_merge(spec(models, tokenizer.format(root=models)), tmp_path / "out", progress=False, validate=False)
    assert "need the transformers package, which is not installed" in str(error.value)
    assert "pip install 'mergekit-lite[tokenizer]'" in str(error.value)
    assert not (tmp_path / "out").exists()


def test_models_with_more_rows_than_the_source_are_remapped(models, tmp_path):
    """The wide model's 72 rows are cut to the base's 64 tokens: a remap, through transformers, as mergekit."""
    pytest.importorskip("transformers")
    text = (f"merge_method: linear\nbase_model: {models}/base\nmodels:\n  - model: {models}/base\n"
            f"    parameters: {{weight: 0.5}}\n  - model: {models}/wide\n    parameters: {{weight: 0.5}}\n"
            "tokenizer_source: base\n")
    run_merge(text, tmp_path / "out", progress=False, validate=False)
    assert read_folder(tmp_path / "out")["model.embed_tokens.weight"].shape[0] == 64
