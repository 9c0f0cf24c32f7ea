"""Hostile inputs: models."""


from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from mergekit_lite.testing.synthetic import LlamaShape, write_model

from .catalogue import EMBED, MODEL_FILE, TINY, Models, Scenario, case, linear_spec, run, split_file
from .spec import spec_case


@case("models")
def adapter_folder_as_model(tmp: Path, models: Models) -> Scenario:
    adapter = tmp / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    spec = linear_spec(tmp, models.a, adapter)
    return Scenario(run(tmp, spec), 1, f"error: {adapter}: models[1].model: this is a PEFT adapter folder, not a "
                                       "model\nHint: fold it into its base: write the model as base+adapter "
                                       "(e.g. ./base+./adapter)\n")


def _poisoned(tmp: Path, models: Models, value: float) -> Path:
    bad = models.copy(models.a, tmp / "bad")
    header, data = split_file(bad / MODEL_FILE)
    begin = 8 + struct.unpack("<Q", (bad / MODEL_FILE).read_bytes()[:8])[0] + header[EMBED]["data_offsets"][0]
    raw = bytearray((bad / MODEL_FILE).read_bytes())
    index = 1 * TINY.hidden + 3            # element [1, 3]
    raw[begin + 4 * index:begin + 4 * index + 4] = struct.pack("<f", value)
    (bad / MODEL_FILE).write_bytes(bytes(raw))
    return bad


NONFINITE_HINT = ("the checkpoint is corrupt or its training diverged: download it again or leave it out; or pass "
                  "--allow-nonfinite to merge anyway (NaN and Inf then spread into the output)")


@case("models")
def nan_in_an_input(tmp: Path, models: Models) -> Scenario:
    bad = _poisoned(tmp, models, float("nan"))
    spec = linear_spec(tmp, models.b, bad)
    return Scenario(run(tmp, spec), 1, f"error: {bad}: tensor '{EMBED}': the input already holds 1 NaN value, the "
                                       f"first at [1, 3]\nHint: {NONFINITE_HINT}\n")


@case("models")
def inf_in_an_input(tmp: Path, models: Models) -> Scenario:
    bad = _poisoned(tmp, models, float("-inf"))
    spec = linear_spec(tmp, models.b, bad)
    return Scenario(run(tmp, spec), 1, f"error: {bad}: tensor '{EMBED}': the input already holds 1 Inf value, the "
                                       f"first at [1, 3]\nHint: {NONFINITE_HINT}\n")


@case("models")
def overflow_in_float32(tmp: Path, models: Models) -> Scenario:
    args, path = spec_case(tmp, f"merge_method: linear\nparameters: {{normalize: false}}\nmodels:\n"
                                f"  - model: {models.a}\n    parameters: {{weight: 3.0e+38}}\n"
                                f"  - model: {models.b}\n    parameters: {{weight: 3.0e+38}}\n")
    # Embeddings (~0.02) times 3e38 stay finite in float32; the first norm (~1.0) overflows.
    return Scenario(args, 1, f"error: tensor 'model.layers.0.input_layernorm.weight': linear made {TINY.hidden} Inf "
                             "values from finite inputs, the first at [0] (weight=(3e+38, 3e+38), normalize=false)\n"
                             "Hint: the "
                             "parameters make float32 overflow or divide by zero for this tensor; use smaller weights, "
                             "or check the values set for it\n")


@case("models")
def overflow_of_the_output_dtype(tmp: Path, models: Models) -> Scenario:
    args, path = spec_case(tmp, f"merge_method: linear\nout_dtype: float16\nparameters: {{normalize: false}}\nmodels:\n"
                                f"  - model: {models.a}\n    parameters: {{weight: 1.0e+7}}\n"
                                f"  - model: {models.b}\n    parameters: {{weight: 1.0e+7}}\n")
    from safetensors.torch import load_file

    # The expected numbers, computed independently: linear's float32 sum, then the cast to float16.
    merged = load_file(str(models.a / MODEL_FILE))[EMBED] * 1e7 + load_file(str(models.b / MODEL_FILE))[EMBED] * 1e7
    infinite = ~torch.isfinite(merged.to(torch.float16))
    first = int(torch.nonzero(infinite.reshape(-1))[0])
    return Scenario(args, 1, f"error: tensor '{EMBED}': merged values up to {float(merged.abs().max()):.4g} do not fit "
                             f"float16 (largest 6.55e+04): {int(infinite.sum())} Inf values after the cast, the first "
                             f"at [{first // TINY.hidden}, {first % TINY.hidden}]\n"
                             "Hint: write a wider dtype (out_dtype: "
                             "bfloat16 or float32), or use smaller weights\n")


@case("models")
def vocabulary_sizes_differ(tmp: Path, models: Models) -> Scenario:
    wide = tmp / "wide"
    write_model(str(wide), LlamaShape(**{**TINY.__dict__, "vocab": 40}), seed=0, delta_seed=4)
    spec = linear_spec(tmp, models.a, wide)
    return Scenario(run(tmp, spec), 1, (
        f"error: {wide}: tensor '{EMBED}': shape [40, {TINY.hidden}] != [{TINY.vocab}, {TINY.hidden}] in {models.a}\n"
        f"Hint: the vocabularies differ (40 vs {TINY.vocab} tokens) and embeddings are merged row by row. Add "
        "tokenizer_source: union (or base, or a model) to line the rows up by token text, as mergekit does; or "
        "merge models that share a tokenizer\n"))


@case("models")
def dtypes_differ(tmp: Path, models: Models) -> Scenario:
    half = tmp / "half"
    write_model(str(half), TINY, dtype=torch.bfloat16, seed=0, delta_seed=5)
    spec = linear_spec(tmp, models.a, half)
    return Scenario(run(tmp, spec), 1, f"error: tensor '{EMBED}': models store this tensor as bfloat16 and float32\n"
                                       "Hint: set dtype: (e.g. dtype: bfloat16) in the spec to say which precision "
                                       "to merge in\n")
