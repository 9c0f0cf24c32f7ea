"""A fold that cannot be faithful is refused before anything is written, with one clear message and exit code."""

from __future__ import annotations

import json
import shutil

import pytest
from helpers.models import SHAPE, write_spec

from mergekit_lite.testing.adapters import AdapterShape, write_adapter
from mergekit_lite.testing.synthetic import LlamaShape

WRONG_SIZE = LlamaShape(hidden=32, intermediate=64, layers=4, heads=4, kv_heads=2, vocab=256)
DEEPER = LlamaShape(hidden=64, intermediate=128, layers=8, heads=4, kv_heads=2, vocab=256)
SAME_BASE = "Hint: the adapter was made for another architecture; use the base it was trained on"


def adapter(folder, shape=SHAPE, base_model="base", **config):
    """A synthetic adapter, with ``config`` fields overriding its adapter_config.json."""
    write_adapter(str(folder), shape, AdapterShape(), base_model=base_model)
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    return folder


def check(result, code: int, expected: str, out):
    assert result.exit_code == code, result.output
    assert result.stderr == expected + "\n"
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()


def refused(cli, base, bad, tmp_path, message: str, *args: str):
    """``merge fold base bad`` exits 1 with ``error: <bad>: <message>`` and writes nothing."""
    check(cli("fold", base, bad, "-o", tmp_path / "out", *args), 1, f"error: {bad}: {message}", tmp_path / "out")


@pytest.fixture
def base(models_f32):
    return models_f32 / "base"


def test_adapter_for_another_model_size(cli, base, tmp_path):
    bad = adapter(tmp_path / "narrow", WRONG_SIZE)
    refused(cli, base, bad, tmp_path,
            "module 'model.layers.0.self_attn.q_proj': the adapter's factors [8, 32] x [32, 8] make a "
            "[32, 32] update, but the base's 'model.layers.0.self_attn.q_proj.weight' is [64, 64]\n"
            "Hint: the adapter was made for another model (or model size); use the base it was trained on")


def test_adapted_module_missing_in_base(cli, base, tmp_path):
    bad = adapter(tmp_path / "deep", DEEPER)
    refused(cli, base, bad, tmp_path,
            "adapts module 'model.layers.4.self_attn.q_proj', tensor "
            "'model.layers.4.self_attn.q_proj.weight', which the base model does not have\n"
            "Hint: the adapter was made for another architecture, or this base names its tensors differently; use the "
            "base the adapter was trained on")


def test_target_module_missing_in_base(cli, base, tmp_path):
    bad = adapter(tmp_path / "gpt2ish", target_modules=["q_proj", "c_attn"])
    refused(cli, base, bad, tmp_path,
            f"target module 'c_attn' is not in the base model\n{SAME_BASE}")


CONVERT = ("the adapter was trained on a base changed by its initialisation, so folding it into the original base "
           "would give another model\nHint: convert it to a plain LoRA first: load it with peft "
           "(PeftModel.from_pretrained(base, adapter)) and save it with save_pretrained(dir, "
           "path_initial_model_for_weight_conversion=<the adapter as saved before training>); the converted adapter "
           "(rank doubled) folds into the original base")
RESIDUAL = ("\nHint: fold it into the residual base saved when the adapter was initialised, after setting "
            "\"init_lora_weights\": true in adapter_config.json")
MUTATING = {
    "pissa": CONVERT, "pissa_niter_4": CONVERT, "olora": CONVERT, "corda": CONVERT,
    "loftq": "LoftQ trains against a quantised residual of the base, which the adapter does not record" + RESIDUAL,
    "lora_ga": "LoRA-GA subtracts its initial adapter from the base, and even peft does not redo that on load"
               + RESIDUAL,
}


@pytest.mark.parametrize("init", MUTATING)
def test_base_mutating_init_refused_with_what_to_do(cli, base, tmp_path, init):
    bad = adapter(tmp_path / init, init_lora_weights=init)
    refused(cli, base, bad, tmp_path,
            f"init_lora_weights is '{init}': {MUTATING[init]}")


def test_other_peft_types_and_variants_refused(cli, base, tmp_path):
    loha = adapter(tmp_path / "loha", peft_type="LOHA")
    refused(cli, base, loha, tmp_path,
            "peft_type is LOHA; only LoRA adapters (peft_type LORA) can be folded\n"
            "Hint: LOHA adapters use other math; merge them with peft's merge_and_unload()")
    tokens = adapter(tmp_path / "tokens", trainable_token_indices=[1, 2])
    refused(cli, base, tokens, tmp_path,
            "the adapter uses trainable tokens (trainable_token_indices), which cannot be folded here\n"
            "Hint: fold it with peft's merge_and_unload(), where peft supports merging it")


def test_rank_disagrees_with_config(cli, base, tmp_path):
    bad = adapter(tmp_path / "rank", r=4)
    refused(cli, base, bad, tmp_path,
            "module 'model.layers.0.self_attn.q_proj' has rank 8 (lora_A) / 8 (lora_B) but the config "
            "says r=4\nHint: adapter_config.json and the tensors disagree (check r and rank_pattern)")


def test_dora_config_without_magnitudes(cli, base, tmp_path):
    bad = adapter(tmp_path / "dora", use_dora=True)
    refused(cli, base, bad, tmp_path,
            "use_dora is true but module 'model.layers.0.self_attn.q_proj' has no lora_magnitude_vector\n"
            "Hint: the adapter file is incomplete; save it again with peft")


def test_base_named_differently_on_the_hub(cli, base, tmp_path):
    """A base inside the Hub cache is known by its repo id, so a different adapter base is an error."""
    cached = tmp_path / "hub" / "models--org--base" / "snapshots" / "abc123"
    shutil.copytree(base, cached)
    other = adapter(tmp_path / "other", base_model="org/other")
    check(cli("fold", cached, other, "-o", tmp_path / "out"), 1,
          f"error: {other}: the adapter was made for 'org/other', but the base is 'org/base'\n"
          "Hint: use the base it was trained on; if you mean this base (same shapes, e.g. a fine-tune of it), set "
          "check_base: false on the adapter (merge fold: --no-check-base)", tmp_path / "out")
    assert cli("fold", cached, other, "-o", tmp_path / "out", "--no-check-base", "--quiet").exit_code == 0
    same = adapter(tmp_path / "same", base_model="Org/Base")
    assert cli("fold", cached, same, "-o", tmp_path / "out2", "--quiet").exit_code == 0


def test_base_that_cannot_be_compared_is_a_warning(cli, base, tmp_path):
    elsewhere = adapter(tmp_path / "elsewhere", base_model="/training/box/other-model")
    result = cli("fold", base, elsewhere, "-o", tmp_path / "out")
    assert result.exit_code == 0
    assert (f"warning: {elsewhere}: the adapter names '/training/box/other-model' as its base and the base given is "
            f"'{base}'; one is a local path, so they cannot be compared. Shapes match, so it is folded; check that "
            "this is the base it was trained on\n") in result.stderr


def test_pickle_adapter_refused(cli, base, tmp_path):
    folder = adapter(tmp_path / "pickled")
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    refused(cli, base, folder, tmp_path,
            "only a pickle adapter (adapter_model.bin) found; it is refused because loading a pickle "
            "can run arbitrary code\n"
            "Hint: convert it (load it with peft, save_pretrained(dir, safe_serialization=True)), or, if you trust its "
            "source, pass --allow-pickle (tensors only, torch.load(weights_only=True))")


def test_base_and_adapter_swapped(cli, base, tmp_path):
    folder = adapter(tmp_path / "chat")
    check(cli("fold", folder, base, "-o", tmp_path / "out"), 1,
          f"error: {folder}: this is a PEFT adapter folder, not a model\n"
          "Hint: fold it into its base: write the model as base+adapter (e.g. ./base+./adapter)", tmp_path / "out")


def test_usage_errors(cli, base, tmp_path):
    folder = adapter(tmp_path / "chat")
    check(cli("fold", base, folder, "-o", tmp_path / "out", "--weight", "1", "--weight", "2"), 2,
          "error: --weight: 2 weight(s) for 1 adapter(s)\n"
          "Hint: give one weight per adapter, in the same order, or none (all 1)", tmp_path / "out")
    check(cli("fold", base, tmp_path / "nope", "-o", tmp_path / "out"), 2,
          f"error: adapter folder '{tmp_path}/nope' not found\n"
          "Hint: check the path (relative paths are relative to the current directory)", tmp_path / "out")
    check(cli("fold", base, folder, "-o", folder / "inside"), 2,
          f"error: {folder}/inside: the output folder is inside input model folder {folder}\n"
          "Hint: write the merged model somewhere else: inputs are never written to", folder / "inside")


def test_spec_errors_in_the_adapter_form(cli, base, tmp_path):
    folder = adapter(tmp_path / "chat")
    spec = write_spec(tmp_path / "spec.yaml", f"merge_method: linear\nmodels:\n  - model:\n      model: {base}\n"
                                              f"      lora: [{{path: {folder}, wieght: 2}}]\n"
                                              "    parameters: {weight: 1}\n")
    check(cli("run", spec, "-o", tmp_path / "out"), 2,
          f"error: {spec}: models[0].model.lora[0]: unknown key 'wieght' in an adapter. Did you mean 'weight'?\n"
          "Hint: an adapter has: path, revision, weight, check_base", tmp_path / "out")
    spec = write_spec(tmp_path / "spec.yaml", f"merge_method: linear\nmodels:\n  - model:\n      model: {base}\n"
                                              f"      lora: {folder}\n      tied_embeddings: both\n"
                                              "    parameters: {weight: 1}\n")
    check(cli("run", spec, "-o", tmp_path / "out"), 2,
          f"error: {spec}: models[0].model.tied_embeddings: tied_embeddings must be one of untie, shared, got 'both'\n"
          "Hint: untie: write lm_head separately (the output computes what base+adapter computed); shared: fold into "
          "the one shared tensor, as peft does", tmp_path / "out")
    narrow = adapter(tmp_path / "narrow", WRONG_SIZE)
    spec = write_spec(tmp_path / "spec.yaml", f"merge_method: linear\nmodels:\n  - model: {base}+{narrow}\n"
                                              "    parameters: {weight: 1}\n")
    result = cli("run", spec, "-o", tmp_path / "out")
    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: {narrow}: models[0].model: module 'model.layers.0.self_attn.q_proj': ")
