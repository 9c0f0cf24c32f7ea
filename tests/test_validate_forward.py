"""The forward check: losses equal transformers' own, identical-input merges equal their input, and the
inference-time LoRA reference (peft, unmerged) equals an independent fold."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from helpers.models import SHAPE, read_folder
from helpers.validation_specs import DEVICES, LINEAR

from mergekit_lite import run_merge, validate

pytest.importorskip("transformers")

TWINS = """
merge_method: linear
models:
  - model: {a}
    parameters: {{weight: 0.1}}
  - model: {b}
    parameters: {{weight: 0.2}}
parameters: {{normalize: {normalize}}}
"""


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def twins(models_f32, tmp_path_factory) -> tuple[Path, Path]:
    """ft-a and a byte-identical copy of it under another name."""
    copy = tmp_path_factory.mktemp("twins") / "ft-a-copy"
    shutil.copytree(models_f32 / "ft-a", copy)
    return models_f32 / "ft-a", copy


def hf_loss(folder, input_ids: torch.Tensor) -> float:
    """transformers' own causal-LM loss (its shift and cross-entropy), in float32."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.inference_mode():
        return float(model(input_ids=input_ids, labels=input_ids).loss)


def test_losses_are_transformers_losses(models_f32, tmp_path, device):
    out = tmp_path / "out"
    run_merge(LINEAR.format(root=models_f32), out, progress=False, validate=False)
    forward = validate(out, device=device).check("forward")
    numbers = forward.numbers
    assert forward.status == "passed" and numbers["token_source"] == "fixed_ids"  # the synthetic words are w0, w1..
    ids = torch.randint(0, SHAPE.vocab, (2, 16), generator=torch.Generator().manual_seed(0))
    assert numbers["prompts"] == 2 and numbers["tokens"] == 32 and numbers["logits_finite"] is True
    assert numbers["merged_loss"] == pytest.approx(hf_loss(out, ids), abs=1e-5)
    assert [entry["model"] for entry in numbers["inputs"]] == [f"{models_f32}/{n}" for n in ("ft-a", "ft-b", "ft-c")]
    for entry in numbers["inputs"]:
        assert entry["loss"] == pytest.approx(hf_loss(entry["model"], ids), abs=1e-5) and entry["note"] is None
    assert numbers["compared_with"] is None                    # different inputs: nothing to be equal to


def test_identical_inputs_give_the_input(twins, tmp_path, device):
    a, b = twins
    out = tmp_path / "out"
    run_merge(TWINS.format(a=a, b=b, normalize="true"), out, progress=False, validate=False)
    forward = validate(out, device=device).check("forward")
    numbers = forward.numbers
    assert forward.status == "passed" and numbers["compared_with"] == str(a)
    assert numbers["max_logit_diff"] <= numbers["logit_tolerance"]
    # The rule: rtol = max(8 eps(float32), 1e-4) = 1e-4, times max(1, max |reference logit|).
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, SHAPE.vocab, (4, 32), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        logits = AutoModelForCausalLM.from_pretrained(a, dtype=torch.float32)(input_ids=ids).logits
    assert numbers["logit_tolerance"] == pytest.approx(1e-4 * max(1.0, float(logits.abs().max())), rel=1e-6)
    merged, original = read_folder(out), read_folder(a)        # (0.1x + 0.2x) / 0.3 is x or a float32 ulp from it
    differ = [k for k in merged if not torch.equal(merged[k], original[k])]
    assert (numbers["max_logit_diff"] == 0.0) == (not differ)


def test_identical_inputs_with_a_broken_output_fail(twins, tmp_path):
    a, b = twins
    out = tmp_path / "out"
    run_merge(TWINS.format(a=a, b=b, normalize="true"), out, progress=False, validate=False, max_shard_size="60kB")
    from mergekit_lite.validation.folder import read_output

    info = read_output(str(out)).tensors["model.layers.1.input_layernorm.weight"]
    with open(info.path, "r+b") as f:                          # a norm weight of 3.0 instead of ~1.0
        f.seek(info.start)
        f.write(struct.pack("<f", 3.0) * 64)
    forward = validate(out, device="cpu").check("forward")
    assert forward.status == "failed"
    message = forward.failures[0].message
    assert message.startswith(f"logits differ from {a}'s by up to ") and message.endswith(
        ", though the merge should compute what that input computes")
    assert forward.numbers["max_logit_diff"] > forward.numbers["logit_tolerance"]


def test_no_comparison_when_the_merge_is_no_identity(twins, tmp_path):
    """With normalize: false and weights 1 + 1 the merge doubles every weight: not expected to equal the input."""
    a, b = twins
    doubled = TWINS.replace("0.1", "1.0").replace("0.2", "1.0")
    out = tmp_path / "out"
    run_merge(doubled.format(a=a, b=b, normalize="false"), out, progress=False, validate=False)
    forward = validate(out, device="cpu").check("forward")
    assert forward.status == "passed" and forward.numbers["compared_with"] is None


def test_a_single_input_is_compared_with_itself(models_f32, tmp_path):
    out = tmp_path / "out"
    spec = f"merge_method: linear\nmodels:\n  - model: {models_f32}/ft-b\n    parameters: {{weight: 1.0}}\n"
    run_merge(spec, out, progress=False, validate=False)
    numbers = validate(out, device="cpu").check("forward").numbers
    assert numbers["compared_with"] == f"{models_f32}/ft-b" and numbers["max_logit_diff"] == 0.0


def test_the_outputs_tokenizer_is_used_when_it_knows_the_prompts(tmp_path):
    import re

    from mergekit_lite.testing.synthetic import write_model
    from mergekit_lite.validation.inference import PROMPTS, make_batch

    folder = write_model(str(tmp_path / "m"), SHAPE, tokenizer=False)
    words = sorted({w for p in PROMPTS for w in re.findall(r"\w+|[^\w\s]+", p)})
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", "<pad>"] + words)}
    tokenizer = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [
        {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
         "special": True} for i, t in enumerate(["<unk>", "<s>", "</s>", "<pad>"])],
        "normalizer": None, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}}
    Path(folder, "tokenizer.json").write_text(json.dumps(tokenizer))
    Path(folder, "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>", "pad_token": "<pad>"}))
    batch = make_batch(folder, SHAPE.vocab)
    assert batch.source == "tokenizer"
    for row, prompt in enumerate(PROMPTS):                     # independent: look the words up by hand
        ids = [vocab[w] for w in re.findall(r"\w+|[^\w\s]+", prompt)]
        assert batch.input_ids[row, :len(ids)].tolist() == ids
        assert batch.attention_mask[row].tolist() == [1] * len(ids) + [0] * (batch.input_ids.shape[1] - len(ids))
    assert make_batch(folder, vocab_size=10).source == "fixed_ids"   # ids beyond the model's vocabulary


# ---------------------------------------------------------------------------------------------------------
# The LoRA reference: base + adapters applied at inference time by peft


def make_adapter(base: Path, folder: Path, seed: int, targets: list[str]) -> Path:
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(folder)
    return folder


def fold_by_hand(base: Path, adapters: list[tuple[Path, float]], out: Path) -> Path:
    """W + sum_i weight_i * (alpha/r) * B_i @ A_i in float32, written as a model folder."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(base, out)
    for path in out.glob("*.safetensors*"):
        path.unlink()
    tensors = read_folder(base)
    for folder, weight in adapters:
        config = json.loads((folder / "adapter_config.json").read_text())
        scale = config["lora_alpha"] / config["r"]
        lora = load_file(folder / "adapter_model.safetensors")
        for key, a in lora.items():
            if ".lora_A." in key:
                b = lora[key.replace(".lora_A.", ".lora_B.")]
                name = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
                tensors[name] = tensors[name] + weight * scale * (b @ a)
    save_file({k: v.contiguous() for k, v in tensors.items()}, out / "model.safetensors", metadata={"format": "pt"})
    return out


def max_logit_diff(first, second, device: torch.device) -> tuple[float, float]:
    from mergekit_lite.validation.inference import logits_of, make_batch

    batch = make_batch(str(first[0]), SHAPE.vocab)
    a = logits_of(first[1](), batch, device)
    b = logits_of(second(), batch, device)
    return float((a - b).abs().max()), float(b.abs().max())


def test_adapters_at_inference_time_equal_a_fold(models_f32, tmp_path, device):
    from mergekit_lite.validation.inference import load_model

    dev = torch.device(device)
    base = models_f32 / "base"
    one = make_adapter(base, tmp_path / "one", 1, ["q_proj", "v_proj", "down_proj"])
    two = make_adapter(base, tmp_path / "two", 2, ["k_proj", "up_proj", "down_proj"])
    cases = [([(one, 1.0)], "single"), ([(one, 0.5), (two, 2.0)], "weighted")]
    for adapters, label in cases:
        folded = fold_by_hand(base, adapters, tmp_path / f"folded-{label}")
        diff, scale = max_logit_diff((folded, lambda: load_model(str(folded), dev)),
                                     lambda: load_model(str(base), dev, [(str(f), w) for f, w in adapters]), dev)
        assert diff <= 1e-4 * max(1.0, scale), (label, diff)
        plain, _ = max_logit_diff((folded, lambda: load_model(str(folded), dev)),
                                  lambda: load_model(str(base), dev), dev)
        assert plain > 100 * max(diff, 1e-6), (label, plain)          # the adapters do change the logits
    wrong, scale = max_logit_diff((folded, lambda: load_model(str(folded), dev)),
                                  lambda: load_model(str(base), dev, [(str(one), 0.5), (str(two), 1.0)]), dev)
    assert wrong > 1e-4 * max(1.0, scale)
