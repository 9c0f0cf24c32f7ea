"""The forward check after a tokenizer merge that grew or reordered the vocabulary (validation/vocab_forward.py):
each input runs the batch on its own ids of the same tokens, and its logits at the shared tokens are compared
with the merged model's there. Tiny Llama models with tokenizers built in code (as tests/test_tokenizer_merge.py).

The reference is computed independently: the input model run by transformers on the ids its own tokenizer gives
the same token texts, read at those tokens' ids."""

from __future__ import annotations

import pytest
import torch
from helpers.models import read_folder
from safetensors.torch import load_file, save_file
from test_tokenizer_merge import SHAPE, make_model, make_tokenizer

from mergekit_lite import run_merge
from mergekit_lite.testing.synthetic import LlamaShape, write_model
from mergekit_lite.validation import validate

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

ORDER = [0, 1, 2] + list(range(63, 2, -1))   # the permuted model's row r holds the base's token ORDER[r]


def make_permuted(folder, base) -> None:
    """The base model with its vocabulary rows and its tokenizer's ids reversed (special tokens kept): the same
    model, text for text, under other ids."""
    write_model(str(folder), LlamaShape(vocab=64, **SHAPE), seed=0, tokenizer=False)
    weights = read_folder(base)
    tensors = {}
    for file in folder.glob("*.safetensors"):
        tensors = load_file(str(file))
        for name in tensors:
            tensors[name] = weights[name][ORDER].clone() if "embed" in name or "lm_head" in name else weights[name]
        save_file(tensors, str(file), metadata={"format": "pt"})
    names = {i: tok for tok, i in make_tokenizer(64, []).get_vocab().items()}
    vocab = {names[old]: new for new, old in enumerate(ORDER)}
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                         unk_token="<unk>").save_pretrained(str(folder))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("vocab_forward")
    make_model(root / "base", 64, 0, [])
    make_model(root / "chatml", 66, 1, ["<|im_start|>", "<|im_end|>"])
    make_permuted(root / "permuted", root / "base")
    return root


def forward_check(spec: str, out):
    run_merge(spec, out, progress=False, validate=False)
    return validate(out, device="cpu").check("forward")


def test_grown_vocabulary_is_compared_on_the_shared_tokens(models, tmp_path):
    """One input under a tokenizer with two more tokens: the merge must compute what the base computes on its
    64 tokens (it was NOT CHECKED: the base cannot run ids 64 and 65)."""
    spec = (f"merge_method: linear\ndtype: float32\nmodels:\n  - model: {models}/base\n    parameters: {{weight: 1.0}}\n"
            f"tokenizer:\n  source: {models}/chatml\n")
    forward = forward_check(spec, tmp_path / "out")
    assert forward.status == "passed", forward.summary
    numbers = forward.numbers
    assert numbers["compared_with"] == f"{models}/base" and numbers["max_logit_diff"] == 0
    assert "64 tokens" in numbers["inputs"][0]["note"] and numbers["inputs"][0]["loss"] is not None


def test_reordered_vocabulary_against_the_input_run_on_its_own_ids(models, tmp_path):
    """The permuted model merged alone under the base's tokenizer: rows move back to the base's order. The check
    passes, and its reference is the permuted model itself run on its own ids (computed here independently)."""
    spec = (f"merge_method: linear\ndtype: float32\nmodels:\n  - model: {models}/permuted\n"
            f"    parameters: {{weight: 1.0}}\ntokenizer:\n  source: {models}/base\n")
    out = tmp_path / "out"
    forward = forward_check(spec, out)
    assert forward.status == "passed", forward.summary
    assert forward.numbers["max_logit_diff"] <= forward.numbers["logit_tolerance"]
    merged = read_folder(out)
    assert torch.equal(merged["model.embed_tokens.weight"], read_folder(models / "base")["model.embed_tokens.weight"])
    # independently: the text's ids under each tokenizer, each model on its own ids, logits read per token text
    ids = torch.tensor([[5, 9, 40, 3, 63, 17, 2, 30]])
    own = torch.tensor([ORDER.index(i) for i in range(64)])   # base id -> permuted id
    with torch.inference_mode():
        a = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)(ids).logits
        b = transformers.AutoModelForCausalLM.from_pretrained(str(models / "permuted"),
                                                              dtype=torch.float32)(own[ids]).logits
    assert float((a - b[..., own]).abs().max()) <= 1e-5


def test_fewer_rows_than_the_input(models, tmp_path):
    """chatml (66 rows) merged alone under the base's 64-token tokenizer: the same ids, but 66 logits against 64
    (the check crashed on the shapes); compared on the 64 tokens."""
    spec = (f"merge_method: linear\ndtype: float32\nmodels:\n  - model: {models}/chatml\n"
            f"    parameters: {{weight: 1.0}}\ntokenizer:\n  source: {models}/base\n")
    forward = forward_check(spec, tmp_path / "out")
    assert forward.status == "passed", forward.summary
    assert forward.numbers["compared_with"] == f"{models}/chatml" and forward.numbers["max_logit_diff"] == 0


def test_a_wrong_row_of_a_shared_token_fails(models, tmp_path):
    """lm_head's row of a shared token changed after the merge: the merge no longer computes what its input
    computes on the shared tokens, and the check fails (before: NOT CHECKED)."""
    spec = (f"merge_method: linear\ndtype: float32\nmodels:\n  - model: {models}/base\n    parameters: {{weight: 1.0}}\n"
            f"tokenizer:\n  source: {models}/chatml\n")
    out = tmp_path / "out"
    run_merge(spec, out, progress=False, validate=False)
    for file in out.glob("*.safetensors"):
        tensors = load_file(str(file))
        if "lm_head.weight" in tensors:
            tensors["lm_head.weight"][7] += 0.5
            save_file(tensors, str(file), metadata={"format": "pt"})
    forward = validate(out, device="cpu").check("forward")
    assert forward.status == "failed"
    assert f"logits differ from {models}/base's" in forward.failures[0].message


def test_different_inputs_are_context(models, tmp_path):
    """base and chatml averaged under the union tokenizer: the merge need not equal either, so both inputs run on
    their own ids for their losses, and nothing is compared."""
    spec = (f"merge_method: linear\ndtype: float32\nbase_model: {models}/base\nmodels:\n"
            f"  - model: {models}/base\n    parameters: {{weight: 0.5}}\n"
            f"  - model: {models}/chatml\n    parameters: {{weight: 0.5}}\ntokenizer_source: union\n")
    forward = forward_check(spec, tmp_path / "out")
    assert forward.status == "passed", forward.summary
    assert forward.numbers["compared_with"] is None
    assert all(entry["loss"] is not None for entry in forward.numbers["inputs"])
