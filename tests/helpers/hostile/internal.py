"""Hostile inputs that used to end in an internal error (a dependency's exception, a traceback) or in a silent
choice: float8 weights, zero-size tensors, null model references, absurd option values, devices that hold no
data or that this torch cannot drive, a local path with a revision, quantized inputs, inputs whose configs
disagree. Each is now a clear error before any tensor is read. (Hub failures need a Hub: tests/test_internal_errors.py.)"""


from __future__ import annotations

from pathlib import Path

import torch

from ..models import edit_config
from .catalogue import MODEL_FILE, Models, Scenario, case, linear_spec, run
from .spec import spec_case

GROUP = "internal errors"
NULL_HINT = "Hint: give a local folder or a Hub repo id such as org/name\n"
DEVICES = "Hint: use auto, cpu, cuda or cuda:N\n"


def _rewritten(tmp: Path, models: Models, name: str, change) -> Path:
    """A copy of model ``a`` whose tensors went through ``change`` ({name: tensor} -> {name: tensor})."""
    from safetensors.torch import load_file, save_file

    folder = models.copy(models.a, tmp / name)
    save_file(change(load_file(str(folder / MODEL_FILE))), str(folder / MODEL_FILE))
    return folder


def _configured(tmp: Path, models: Models, name: str, **changes) -> Path:
    """A copy of model ``b`` whose config.json has ``changes`` (None removes a key)."""
    return edit_config(models.copy(models.b, tmp / name), **changes)


@case(GROUP)
def float8_weights_without_an_output_dtype(tmp: Path, models: Models) -> Scenario:
    fp8 = _rewritten(tmp, models, "fp8", lambda t: {k: v.to(torch.float8_e4m3fn) for k, v in t.items()})
    spec = linear_spec(tmp, fp8, fp8)
    # save_file stores tensors by name, so lm_head is the first tensor of the plan
    return Scenario(run(tmp, spec), 1, f"error: {fp8}: tensor 'lm_head.weight': stored as float8_e4m3fn: float8 weights "
                                       "are read and merged in float32, but the output needs a dtype to be written in"
                                       "\nHint: set out_dtype: bfloat16 (or float16, float32) in the spec, or pass "
                                       "--out-dtype\n", preserved=(fp8,))


@case(GROUP)
def float8_output_dtype(tmp: Path, models: Models) -> Scenario:
    spec = linear_spec(tmp, models.a, models.b, extra="out_dtype: float8_e4m3fn\n")
    return Scenario(run(tmp, spec), 2, f"error: {spec}: out_dtype: 'float8_e4m3fn' is not a dtype to merge in or "
                                       "write: float8 inputs are read and merged in float32, but a merge does not "
                                       "compute the scales an fp8 checkpoint needs; use bfloat16, float16 or float32\n")


@case(GROUP)
def zero_size_dimension(tmp: Path, models: Models) -> Scenario:
    name = "model.layers.0.self_attn.k_proj.weight"
    empty = _rewritten(tmp, models, "empty", lambda t: {**t, name: torch.zeros(0, t[name].shape[1])})
    spec = linear_spec(tmp, empty, empty)
    return Scenario(run(tmp, spec), 1, f"error: {empty}: tensor '{name}': has a zero-size dimension (shape [0, 16]): "
                                       "it holds no values\nHint: the checkpoint is broken or was cut down; download "
                                       "it again, or merge a complete one\n", preserved=(empty,))


@case(GROUP)
def zero_size_integer_buffer(tmp: Path, models: Models) -> Scenario:
    name = "model.layers.0.self_attn._extra_state"
    empty = _rewritten(tmp, models, "empty", lambda t: {**t, name: torch.zeros(4, 0, dtype=torch.uint8)})
    spec = linear_spec(tmp, empty, empty)
    return Scenario(run(tmp, spec), 1, f"error: {empty}: tensor '{name}': has a zero-size dimension (shape [4, 0]): "
                                       "it holds no values\nHint: the checkpoint is broken or was cut down; download "
                                       "it again, or merge a complete one\n")


@case(GROUP)
def model_null(tmp: Path, models: Models) -> Scenario:
    args, path = spec_case(tmp, f"merge_method: linear\nmodels:\n  - model: ~\n  - model: {models.b}\n")
    return Scenario(args, 2, f"error: {path}: models[0].model: the model is empty (null)\n{NULL_HINT}")


@case(GROUP)
def slice_source_model_null(tmp: Path, models: Models) -> Scenario:
    args, path = spec_case(tmp, "merge_method: passthrough\nslices:\n  - sources:\n    - model:\n"
                                "      layer_range: [0, 1]\n")
    return Scenario(args, 2, f"error: {path}: slices[0].sources[0].model: the model is empty (null)\n{NULL_HINT}")


@case(GROUP)
def reference_path_null(tmp: Path, models: Models) -> Scenario:
    args, path = spec_case(tmp, f"merge_method: linear\nmodels:\n  - model: {{model: {{path: null}}}}\n"
                                f"  - model: {models.b}\n")
    return Scenario(args, 2, f"error: {path}: models[0].model.model.path: the path is empty\n{NULL_HINT}")


@case(GROUP)
def adapter_path_null(tmp: Path, models: Models) -> Scenario:
    args, path = spec_case(tmp, f"merge_method: linear\nmodels:\n  - model: {{model: {models.a}, lora: {{path: ~}}}}\n"
                                f"  - model: {models.b}\n")
    return Scenario(args, 2, f"error: {path}: models[0].model.lora.path: the path is empty\n{NULL_HINT}")


@case(GROUP)
def revision_empty(tmp: Path, models: Models) -> Scenario:
    args, path = spec_case(tmp, "merge_method: linear\nmodels:\n  - model: {model: {path: org/name, revision: ''}}\n"
                                f"  - model: {models.b}\n")
    return Scenario(args, 2, f"error: {path}: models[0].model.model.revision: revision must be a branch, tag or "
                             "commit, got ''\nHint: leave revision out for the default branch\n")


@case(GROUP)
def local_path_with_a_revision(tmp: Path, models: Models) -> Scenario:
    args, path = spec_case(tmp, f"merge_method: linear\nmodels:\n  - model: {models.a}\n  - model: ./ft-b@main\n")
    return Scenario(args, 2, f"error: {path}: models[1].model: no local folder './ft-b@main', and './ft-b' is not a "
                             "Hub repo id, so '@main' cannot be its revision\nHint: check the path (relative paths are "
                             "relative to the current directory); a revision is only for Hub repos: org/name@revision\n")


@case(GROUP)
def shard_size_beyond_any_file(tmp: Path, models: Models) -> Scenario:
    spec = linear_spec(tmp, models.a, models.b)
    return Scenario(run(tmp, spec, "--max-shard-size", "1e999GB"), 2,
                    "error: --max-shard-size: '1e999GB' is larger than any file can be (at most 9.22 EB); for a single "
                    "shard, give a size larger than the model, e.g. 1TB\n")


@case(GROUP)
def shard_size_below_one_byte(tmp: Path, models: Models) -> Scenario:
    spec = linear_spec(tmp, models.a, models.b)
    return Scenario(run(tmp, spec, "--max-shard-size", "1e-3"), 2,
                    "error: --max-shard-size: '1e-3' must be at least 1 byte\n")


@case(GROUP)
def device_meta(tmp: Path, models: Models) -> Scenario:
    spec = linear_spec(tmp, models.a, models.b)
    return Scenario(run(tmp, spec, "--device", "meta"), 2,
                    f"error: --device: the meta device holds no data, so nothing can be merged on it\n{DEVICES}")


@case(GROUP)
def device_this_torch_cannot_drive(tmp: Path, models: Models) -> Scenario:
    spec = linear_spec(tmp, models.a, models.b)
    return Scenario(run(tmp, spec, "--device", "xla"), 2,
                    f"error: --device: device 'xla' cannot be used by this PyTorch build\n{DEVICES}")


@case(GROUP)
def validate_on_the_meta_device(tmp: Path, models: Models) -> Scenario:
    return Scenario(["validate", str(models.a), "--device", "meta"], 2,
                    f"error: --device: the meta device holds no data, so nothing can be merged on it\n{DEVICES}")


@case(GROUP)
def quantized_input(tmp: Path, models: Models) -> Scenario:
    quantized = _configured(tmp, models, "fp8-quantized",
                            quantization_config={"quant_method": "fp8", "weight_block_size": [128, 128]})
    spec = linear_spec(tmp, models.a, quantized)
    return Scenario(run(tmp, spec), 1, f"error: {quantized}: models[1].model: is quantized (config.json has "
                                       "quantization_config, quant_method fp8): its stored values are not the weights, "
                                       "so merging them would give wrong numbers\nHint: merge the unquantized release "
                                       "of this model (e.g. its bfloat16 weights), or dequantize it first\n")


@case(GROUP)
def configs_disagree_on_behaviour(tmp: Path, models: Models) -> Scenario:
    other = _configured(tmp, models, "long-context", rope_theta=500000.0, rms_norm_eps=None)
    spec = linear_spec(tmp, models.a, other)
    return Scenario(run(tmp, spec), 1, f"error: {spec}: the models' config.json disagree on settings that change what "
                                       f"the model computes: rope_theta ({models.a}: 10000.0, {other}: 500000.0); "
                                       f"rms_norm_eps ({models.a}: 1e-05, {other}: not set); the output would silently "
                                       f"take {models.a}'s\nHint: merge models of one configuration; or, if that is "
                                       "intended, say whose config.json the output takes with --config-from MODEL "
                                       f"(config_from= in run_merge), e.g. --config-from {other}\n",
                    preserved=(other,))


@case(GROUP)
def config_from_names_no_merged_model(tmp: Path, models: Models) -> Scenario:
    spec = linear_spec(tmp, models.a, models.b)
    return Scenario(run(tmp, spec, "--config-from", f"{models.b}x"), 2,
                    f"error: --config-from: '{models.b}x' is not one of the models the spec merges. Did you mean "
                    f"'{models.b}'?\nHint: give one as the spec writes it: {models.a}, {models.b}\n")


@case(GROUP)
def fold_weight_not_a_number(tmp: Path, models: Models) -> Scenario:
    return Scenario(["fold", str(models.a), str(tmp / "adapter"), "-o", str(tmp / "out"), "--weight", "nan"], 2,
                    "error: --weight: weight nan of adapter 1 is not a finite float32 number\n"
                    "Hint: 1 applies the adapter's change as trained, 0.5 half of it\n", out=tmp / "out")


@case(GROUP)
def adapter_weight_beyond_float32(tmp: Path, models: Models) -> Scenario:
    args, path = spec_case(tmp, f"merge_method: linear\nmodels:\n  - model: {{model: {models.a}, lora: "
                                f"[{{path: {tmp}/adapter, weight: 1.0e+39}}]}}\n  - model: {models.b}\n")
    return Scenario(args, 2, f"error: {path}: models[0].model.lora[0].weight: weight must be a finite float32 number, "
                             "got 1e+39\nHint: 1 applies the adapter's change as trained, 0.5 half of it\n")
