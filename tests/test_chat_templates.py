"""The named chat templates are mergekit 0.1.5's (its mergekit/_data/chat_templates/*.jinja, read here at test
time), so the output's tokenizer renders exactly mergekit's prompts; end to end, the saved template is the one
mergekit saves."""

from __future__ import annotations

import importlib.resources

import pytest

from mergekit_lite import run_merge
from mergekit_lite.output.chat_template import TEMPLATES
from mergekit_lite.spec.tokenizer import CHAT_TEMPLATE_NAMES
from mergekit_lite.testing.synthetic import LlamaShape, write_model

pytest.importorskip("mergekit")


def mergekit_template(name: str) -> str:
    from mergekit._data import chat_templates

    return importlib.resources.files(chat_templates).joinpath(name + ".jinja").read_text()


@pytest.mark.parametrize("name", CHAT_TEMPLATE_NAMES)
def test_named_templates_are_mergekits(name):
    assert TEMPLATES[name] == mergekit_template(name)


def test_every_mergekit_template_has_a_name():
    from mergekit._data import chat_templates

    names = {f.name[:-len(".jinja")] for f in importlib.resources.files(chat_templates).iterdir()
             if f.name.endswith(".jinja")}
    assert names == set(CHAT_TEMPLATE_NAMES) == set(TEMPLATES)


@pytest.mark.parametrize("name", ["llama3", "exaone"])
def test_the_output_renders_mergekits_prompt(tmp_path, name):
    transformers = pytest.importorskip("transformers")
    from helpers.mergekit_oracle import run_mergekit

    shape = LlamaShape(hidden=32, intermediate=48, layers=1, heads=4, kv_heads=2, vocab=64)
    for model, delta in (("base", None), ("ft", 1)):
        write_model(str(tmp_path / model), shape, seed=0, delta_seed=delta)
    text = (f"merge_method: linear\nmodels:\n  - model: {tmp_path}/base\n    parameters: {{weight: 0.5}}\n"
            f"  - model: {tmp_path}/ft\n    parameters: {{weight: 0.5}}\nchat_template: {name}\n")
    run_merge(text, tmp_path / "ours", progress=False, validate=False)
    run_mergekit(text, tmp_path / "mergekit")
    messages = [{"role": "system", "content": " be brief "}, {"role": "user", "content": "hello "},
                {"role": "assistant", "content": "hi"}, {"role": "user", "content": "again"}]
    ours, theirs = (transformers.AutoTokenizer.from_pretrained(str(tmp_path / d)) for d in ("ours", "mergekit"))
    assert ours.chat_template == theirs.chat_template == mergekit_template(name)
    prompt = ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
