"""Tokenizer merges (tokenizer_source, tokenizer:, chat_template) against mergekit 0.1.5 run on the same YAML.

Tiny Llama checkpoints with real tiny tokenizers built in code (a BPE ``tokenizers.Tokenizer`` wrapped in
transformers' PreTrainedTokenizerFast and saved with save_pretrained), as in mergekit's own test_tokenizer.py:
a base with 64 tokens, a "chatml" fine-tune with two added tokens and 66 embedding rows, and a "padded"
model whose tokenizer names 4 ids beyond its 64 rows. Tensors must be bit-identical to mergekit's, and the
vocabulary, added and special tokens the same.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers.mergekit_oracle import run_mergekit
from helpers.models import read_folder

from mergekit_lite import run_merge
from mergekit_lite.errors import SpecError
from mergekit_lite.testing.synthetic import LlamaShape, write_model

pytest.importorskip("mergekit")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

SHAPE = dict(hidden=32, intermediate=48, layers=2, heads=4, kv_heads=2)


def make_tokenizer(size: int, added: list[str]):
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"_tok_{i}": i for i in range(3, size)}}
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>")
    fast.add_tokens(added)
    return fast


def make_model(folder, rows: int, seed: int, added: list[str], tied: bool = False, template: str | None = None):
    write_model(str(folder), LlamaShape(vocab=rows, tied=tied, **SHAPE), seed=seed, tokenizer=False)
    tokenizer = make_tokenizer(64, added)
    if template is not None:
        tokenizer.chat_template = template
    tokenizer.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizer_models")
    make_model(root / "base", 64, 0, [], template="{{ 'base template' }}{# 20+ chars #}")
    make_model(root / "chatml", 66, 1, ["<|im_start|>", "<|im_end|>"], template="{{ 'chat template' }}{# x #}")
    make_model(root / "padded", 64, 2, ["<UNUSED_0>", "<UNUSED_1>", "<UNUSED_2>", "<UNUSED_3>"],
               template="{{ 'chat template' }}{# x #}")
    return root


def both(spec: str, tmp_path):
    ours, theirs = tmp_path / "ours", tmp_path / "mergekit"
    run_merge(spec, ours, progress=False)
    run_mergekit(spec, theirs)
    return ours, theirs


def assert_same(ours, theirs) -> None:
    a, b = read_folder(ours), read_folder(theirs)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].shape == b[name].shape and a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name
    ta, tb = (transformers.AutoTokenizer.from_pretrained(str(p)) for p in (ours, theirs))
    assert ta.get_vocab() == tb.get_vocab()
    assert {i: str(t) for i, t in ta.added_tokens_decoder.items()} == {
        i: str(t) for i, t in tb.added_tokens_decoder.items()}
    assert ta.special_tokens_map == tb.special_tokens_map
    assert ta.chat_template == tb.chat_template
    ca, cb = (json.loads((p / "config.json").read_text()) for p in (ours, theirs))
    assert ca["vocab_size"] == cb["vocab_size"] == a["model.embed_tokens.weight"].shape[0]


def spec(models, tokenizer: str, method: str = "linear", extra: str = "") -> str:
    params = "\n    parameters: {weight: 0.5}" if method == "linear" else ""
    top = "parameters: {t: 0.3}\n" if method == "slerp" else ""
    return f"""
merge_method: {method}
base_model: {models}/base
dtype: float32
{top}models:
  - model: {models}/base{params}
  - model: {models}/chatml{params}
{tokenizer}
{extra}"""


@pytest.mark.parametrize("tokenizer", [
    "tokenizer_source: union",
    "tokenizer_source: base",
    "tokenizer:\n  source: base",
    "tokenizer:\n  source: {models}/chatml",
    "tokenizer_source: {models}/chatml",
    "tokenizer: {{}}",
])
def test_sources_equal_mergekit(models, tmp_path, tokenizer):
    ours, theirs = both(spec(models, tokenizer.format(models=models)), tmp_path)
    assert_same(ours, theirs)


def test_union_keeps_chatml_rows(models, tmp_path):
    ours, theirs = both(spec(models, "tokenizer_source: union"), tmp_path)
    assert_same(ours, theirs)
    tok = transformers.AutoTokenizer.from_pretrained(str(ours))
    assert len(tok.get_vocab()) == 66 and "<|im_start|>" in tok.get_vocab()
    merged, chat = read_folder(ours), read_folder(models / "chatml")
    row = tok.get_vocab()["<|im_start|>"]
    # only the chatml model has it: its own row, in both models' inputs, so the average is that row
    assert torch.equal(merged["model.embed_tokens.weight"][row], chat["model.embed_tokens.weight"][64])


def test_union_with_slerp_and_padded(models, tmp_path):
    text = spec(models, "tokenizer_source: union", method="slerp").replace(f"{models}/base", f"{models}/padded")
    ours, theirs = both(text, tmp_path)
    assert_same(ours, theirs)
    vocab = transformers.AutoTokenizer.from_pretrained(str(ours)).get_vocab()
    assert not any(token.startswith("<UNUSED") for token in vocab)


def test_forced_and_model_tokens(models, tmp_path):
    tokenizer = f"""tokenizer:
  source: union
  tokens:
    _tok_10: {{source: {models}/chatml, force: true}}
    _tok_11: {{source: {models}/base, force: true}}
    _tok_20: {{source: {{kind: model_token, model: {models}/chatml, token_id: 64}}, force: true}}
    _tok_21: {{source: {{kind: model_token, model: {models}/base, token: <s>}}, force: true}}
    new_token: {{source: {{kind: zero}}}}"""
    ours, theirs = both(spec(models, tokenizer), tmp_path)
    assert_same(ours, theirs)
    merged, chat = read_folder(ours), read_folder(models / "chatml")
    assert torch.equal(merged["model.embed_tokens.weight"][10], chat["model.embed_tokens.weight"][10])


def test_tied_model_stays_tied(models, tmp_path):
    make_model(tmp_path / "tied_base", 64, 3, [], tied=True)
    make_model(tmp_path / "tied_chat", 66, 4, ["<|im_start|>", "<|im_end|>"], tied=True)
    text = f"""
merge_method: linear
base_model: {tmp_path}/tied_base
dtype: float32
models:
  - model: {tmp_path}/tied_base
    parameters: {{weight: 0.5}}
  - model: {tmp_path}/tied_chat
    parameters: {{weight: 0.5}}
tokenizer_source: union
"""
    ours, theirs = both(text, tmp_path)
    assert_same(ours, theirs)
    assert "lm_head.weight" not in read_folder(ours)


@pytest.mark.parametrize("template", ["auto", "{{ 'a literal jinja template' }}"])
def test_chat_template_equals_mergekit(models, tmp_path, template):
    """auto: two of the three models have the chat template, one the base template."""
    text = spec(models, "tokenizer_source: union", extra=f"chat_template: \"{template}\"").replace(
        f"  - model: {models}/chatml", f"  - model: {models}/padded\n    parameters: {{weight: 0.5}}\n"
                                       f"  - model: {models}/chatml")
    ours, theirs = both(text, tmp_path)
    assert_same(ours, theirs)


@pytest.mark.parametrize("name", ["chatml", "llama3", "mistral", "alpaca", "exaone"])
def test_named_chat_template_copied_tokenizer(models, tmp_path, name):
    text = spec(models, "", extra=f"chat_template: {name}").replace(f"{models}/chatml", f"{models}/base")
    out = tmp_path / "ours"
    run_merge(text, out, progress=False)
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert len(tok.get_vocab()) == 64
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}]
    rendered = tok.apply_chat_template(messages, tokenize=False)
    marker = {"chatml": "<|im_start|>user\nhello<|im_end|>", "llama3": "<|start_header_id|>user",
              "mistral": "[INST] hello [/INST]", "alpaca": "### Instruction:\nhello", "exaone": "[|user|]hello"}
    assert marker[name] in rendered
    assert json.loads((out / "tokenizer_config.json").read_text()).get("chat_template") or (
        out / "chat_template.jinja").exists()


@pytest.mark.parametrize("extra, where", [
    ("tokenizer_source: base\ntokenizer: {source: base}", "tokenizer"),
    ("tokenizer: {source: union, tokens: {x: {force: true}}}", "tokenizer.tokens.x"),
    ("tokenizer: {sorce: union}", "tokenizer.sorce"),
    ("chat_template: chatm", "chat_template"),
    ("tokenizer: {tokens: {x: {source: {kind: model_token, model: m}}}}", "tokenizer.tokens.x.source"),
])
def test_spec_errors(models, extra, where):
    from mergekit_lite.spec.schema import load_spec

    with pytest.raises(SpecError) as info:
        load_spec(spec(models, "", extra=extra))
    assert info.value.where == where


def test_pad_to_multiple_of(models, tmp_path):
    ours, theirs = both(spec(models, "tokenizer:\n  source: union\n  pad_to_multiple_of: 16"), tmp_path)
    assert_same(ours, theirs)
    assert read_folder(ours)["model.embed_tokens.weight"].shape[0] == 80
    assert len(transformers.AutoTokenizer.from_pretrained(str(ours)).get_vocab()) == 66


def test_average_when_the_base_lacks_a_token(models, tmp_path):
    """<|im_start|> is in both fine-tunes but not the base: its default row is their average."""
    make_model(tmp_path / "chatml2", 66, 5, ["<|im_start|>", "<|im_end|>"])
    text = spec(models, "tokenizer_source: union").replace(
        f"  - model: {models}/chatml", f"  - model: {tmp_path}/chatml2\n    parameters: {{weight: 0.5}}\n"
                                       f"  - model: {models}/chatml")
    ours, theirs = both(text, tmp_path)
    assert_same(ours, theirs)


def test_a_tokenizer_from_outside_the_merge(models, tmp_path):
    """Tokens no merged model has get zero rows (mergekit's default), with a note on the card."""
    make_model(tmp_path / "other", 64, 6, ["<extra_a>", "<extra_b>"])
    text = spec(models, f"tokenizer_source: {tmp_path}/other").replace(f"{models}/chatml", f"{models}/padded")
    ours, theirs = both(text, tmp_path)
    assert_same(ours, theirs)
    embed = read_folder(ours)["model.embed_tokens.weight"]
    assert embed.shape[0] == 66 and not embed[64:].any()
    assert "in none of the merged models" in (ours / "README.md").read_text()


@pytest.mark.parametrize("method, slices", [
    ("linear", "  - sources:\n      - {{model: {m}/base, layer_range: [0, 2], parameters: {{weight: 0.5}}}}\n"
               "      - {{model: {m}/chatml, layer_range: [0, 2], parameters: {{weight: 0.5}}}}\n"),
    ("passthrough", "  - sources: [{{model: {m}/base, layer_range: [0, 1]}}]\n"
                    "  - sources: [{{model: {m}/chatml, layer_range: [1, 2]}}]\n"),
])
def test_slices_union(models, tmp_path, method, slices):
    """Embeddings come from the first slice's models, lm_head from the last's, each remapped (as mergekit)."""
    text = (f"merge_method: {method}\nbase_model: {models}/base\ndtype: float32\ntokenizer_source: union\n"
            "slices:\n" + slices.format(m=models))
    ours, theirs = both(text, tmp_path)
    assert_same(ours, theirs)


@pytest.mark.parametrize("method, module, tokenizer", [
    ("linear", "    models:\n      - {{model: {m}/base, parameters: {{weight: 0.5}}}}\n"
               "      - {{model: {m}/chatml, parameters: {{weight: 0.5}}}}\n", "tokenizer_source: union"),
    ("task_arithmetic", "    models:\n      - {{model: {m}/chatml, parameters: {{weight: 0.7}}}}\n",
     "tokenizer:\n  source: union\n  pad_to_multiple_of: 8"),
    ("passthrough", "    slices:\n      - sources: [{{model: {m}/base, layer_range: [0, 1]}}]\n"
                    "      - sources: [{{model: {m}/chatml, layer_range: [1, 2]}}]\n", "tokenizer_source: union"),
])
def test_modules_merge_tokenizers(models, tmp_path, method, module, tokenizer):
    """A tokenizer merge with modules: (whole or sliced) remaps every module's vocabulary rows (as mergekit)."""
    text = (f"merge_method: {method}\nbase_model: {models}/base\ndtype: float32\n{tokenizer}\n"
            "modules:\n  default:\n" + module.format(m=models))
    ours, theirs = both(text, tmp_path)
    assert_same(ours, theirs)


def test_concat_refuses_a_union(models):
    from mergekit_lite.plan.planner import make_plan

    with pytest.raises(SpecError, match=r"not supported with concat \(mergekit has no concat method"):
        make_plan(spec(models, "tokenizer_source: union", method="concat"))
def test_chat_template_auto_on_a_copied_tokenizer(models, tmp_path):
    """No tokenizer merge: the base's tokenizer is loaded and saved again with the chosen template."""
    text = f"""
merge_method: linear
base_model: {models}/base
dtype: float32
models:
  - model: {models}/base
    parameters: {{weight: 0.5}}
  - model: {models}/padded
    parameters: {{weight: 0.5}}
  - model: {tmp_path}/chat_b
    parameters: {{weight: 0.5}}
chat_template: auto
"""
    make_model(tmp_path / "chat_b", 64, 7, [], template="{{ 'chat template' }}{# x #}")
    ours, theirs = both(text, tmp_path)
    assert_same(ours, theirs)
    assert transformers.AutoTokenizer.from_pretrained(str(ours)).chat_template == "{{ 'chat template' }}{# x #}"


def test_bfloat16_average_and_padding(tmp_path):
    """Stored bfloat16 merged in float32 (dtype: float32): rows are converted first, then averaged and padded,
    as mergekit converts on load."""
    for name, rows, seed, added in (("b", 64, 0, []), ("c1", 66, 1, ["<|im_start|>", "<|im_end|>"]),
                                    ("c2", 66, 2, ["<|im_start|>", "<|im_end|>"])):
        write_model(str(tmp_path / name), LlamaShape(vocab=rows, **SHAPE), seed=seed, tokenizer=False,
                    dtype=torch.bfloat16)
        make_tokenizer(64, added).save_pretrained(str(tmp_path / name))
    text = f"""
merge_method: task_arithmetic
base_model: {tmp_path}/b
dtype: float32
models:
  - model: {tmp_path}/c1
    parameters: {{weight: 0.7}}
  - model: {tmp_path}/c2
    parameters: {{weight: 0.4}}
tokenizer:
  source: union
  pad_to_multiple_of: 32
"""
    ours, theirs = both(text, tmp_path)
    assert_same(ours, theirs)


def test_base_source_strips_ids_beyond_the_embeddings(models, tmp_path):
    """The padded base's tokenizer names 4 ids past its 64 rows: they are dropped from the output tokenizer."""
    text = spec(models, "tokenizer_source: base").replace(f"{models}/base", f"{models}/padded")
    ours, theirs = both(text, tmp_path)
    assert_same(ours, theirs)
    assert len(transformers.AutoTokenizer.from_pretrained(str(ours)).get_vocab()) == 64


def test_a_token_id_out_of_range_is_refused_before_merging(models, tmp_path):
    from mergekit_lite.plan.planner import make_plan

    tokenizer = f"""tokenizer:
  source: union
  tokens:
    _tok_20: {{source: {{kind: model_token, model: {models}/base, token_id: 64}}, force: true}}"""
    with pytest.raises(SpecError, match="token id 64 is out of range"):
        make_plan(spec(models, tokenizer))


@pytest.mark.parametrize("name", ["chatml", "mistral"])
def test_named_templates_render_as_mergekits(name):
    import importlib.resources

    from mergekit._data import chat_templates

    from mergekit_lite.output.chat_template import TEMPLATES

    tok = make_tokenizer(8, [])
    theirs = importlib.resources.files(chat_templates).joinpath(name + ".jinja").read_text()
    for conversation in ([{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}],
                         [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q"}]):
        for prompt in (False, True):
            assert tok.apply_chat_template(conversation, chat_template=TEMPLATES[name], tokenize=False,
                                           add_generation_prompt=prompt) == tok.apply_chat_template(
                conversation, chat_template=theirs, tokenize=False, add_generation_prompt=prompt)


def test_without_transformers_the_plan_says_what_to_install(models, monkeypatch):
    import sys

    from mergekit_lite.plan.planner import make_plan

    monkeypatch.setitem(sys.modules, "transformers", None)   # import transformers raises ImportError
    with pytest.raises(SpecError, match="need the transformers package") as info:
        make_plan(spec(models, "tokenizer_source: base"))
    assert "mergekit-lite[tokenizer]" in info.value.hint
