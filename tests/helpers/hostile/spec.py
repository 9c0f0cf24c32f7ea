"""Hostile inputs: the spec."""


from __future__ import annotations

from pathlib import Path

from .catalogue import EMBED, Models, Scenario, case, run


def spec_case(tmp: Path, text: str, *extra: str) -> tuple[list[str], Path]:
    path = tmp / "spec.yaml"
    path.write_text(text)
    return run(tmp, path, *extra), path


SPEC_HINT = "a spec holds plain values: strings, numbers, booleans, lists and mappings"
ALIAS_HINT = "anchors and aliases (&name, *name) may repeat a value, but not expand without bound"


@case("spec")
def spec_not_a_mapping(tmp: Path, models: Models) -> Scenario:
    args, path = spec_case(tmp, "just a string\n")
    return Scenario(args, 2, f"error: {path}: the spec must be a YAML mapping, got str\n"
                             "Hint: start from an example in merge_configs/\n")


@case("spec")
def billion_laughs(tmp: Path, models: Models) -> Scenario:
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 10)]
    args, path = spec_case(tmp, "\n".join(lines) + f"\nmerge_method: linear\nname: *a9\nmodels: [{models.a}]\n")
    return Scenario(args, 2, f"error: {path}: line 5, column 5: the YAML expands to more than 100,000 values through "
                             f"aliases\nHint: {ALIAS_HINT}\n")


@case("spec")
def alias_containing_itself(tmp: Path, models: Models) -> Scenario:
    args, path = spec_case(tmp, f"merge_method: linear\nname: &x [a, *x]\nmodels: [{models.a}]\n")
    return Scenario(args, 2, f"error: {path}: line 2, column 7: an alias refers to a value that contains it (a cycle)"
                             f"\nHint: {ALIAS_HINT}\n")


@case("spec")
def nested_too_deeply(tmp: Path, models: Models) -> Scenario:
    args, path = spec_case(tmp, "merge_method: linear\nname: " + "[" * 5000 + "]" * 5000 + "\n")
    return Scenario(args, 2, f"error: {path}: line 2, column 38: the YAML is nested more than 32 levels deep\n"
                             f"Hint: {SPEC_HINT}\n")


@case("spec", "code")
def python_object_tag(tmp: Path, models: Models) -> Scenario:
    marker = tmp / "pwned"
    args, path = spec_case(tmp, f"merge_method: !!python/object/apply:os.system ['touch {marker}']\n"
                                f"models: [{models.a}]\n")
    return Scenario(args, 2, f"error: {path}: line 1, column 15: YAML tag '!!python/object/apply:os.system' is not "
                             f"allowed\nHint: {SPEC_HINT}; tags that build Python objects are refused\n", marker=marker)


@case("spec")
def spec_not_utf8(tmp: Path, models: Models) -> Scenario:
    path = tmp / "spec.yaml"
    path.write_bytes(b"merge_method: linear\n\xff\xfe\x00")
    return Scenario(run(tmp, path), 2, f"error: {path}: the spec is not UTF-8 text (byte 21)\n"
                                       "Hint: check that this is the YAML file of the merge\n")


@case("spec")
def spec_too_large(tmp: Path, models: Models) -> Scenario:
    args, path = spec_case(tmp, "merge_method: linear\n" + "#" * (5 << 20) + "\n")
    return Scenario(args, 2, f"error: {path}: the spec is 4,194,305 characters long, more than the 4,194,304 allowed\n"
                             "Hint: a merge spec is a few kilobytes; check that this is the right file\n")


def weight_case(tmp: Path, models: Models, weight: str, method: str = "linear") -> tuple[list[str], Path]:
    return spec_case(tmp, f"merge_method: {method}\nmodels:\n  - model: {models.a}\n"
                          f"    parameters: {{weight: {weight}}}"
                          f"\n  - model: {models.b}\n    parameters: {{weight: 0.5}}\n")


@case("spec")
def huge_integer_weight(tmp: Path, models: Models) -> Scenario:
    args, path = weight_case(tmp, models, "1" + "0" * 400)
    return Scenario(args, 2, f"error: {path}: models[0].parameters.weight: weight must be a finite number, got "
                             f"{('1' + '0' * 400)[:57]}...\n")


@case("spec")
def weight_beyond_float32(tmp: Path, models: Models) -> Scenario:
    args, path = weight_case(tmp, models, "1.0e+39")
    return Scenario(args, 2, f"error: {path}: models[0].parameters.weight: weight = 1e+39 is beyond float32's range "
                             "(+-3.403e+38)\nHint: merges compute in float32, where this value would be infinite\n")


@case("spec")
def infinite_weight(tmp: Path, models: Models) -> Scenario:
    args, path = weight_case(tmp, models, ".inf")
    return Scenario(args, 2, f"error: {path}: models[0].parameters.weight: weight must be a finite number, got inf\n")


@case("spec")
def nan_weight(tmp: Path, models: Models) -> Scenario:
    args, path = weight_case(tmp, models, ".nan")
    return Scenario(args, 2, f"error: {path}: models[0].parameters.weight: weight must be a finite number, got nan\n")


@case("spec")
def negative_concat_weight(tmp: Path, models: Models) -> Scenario:
    args, path = weight_case(tmp, models, "-0.5", method="concat")
    return Scenario(args, 2, f"error: {path}: models[0].parameters.weight: weight = -0.5 is outside [0, inf]\n"
                             "Hint: this model's share of each widened layer's output\n")


@case("spec")
def weights_sum_to_zero(tmp: Path, models: Models) -> Scenario:
    args, path = weight_case(tmp, models, "-0.5")
    return Scenario(args, 2, f"error: {path}: models[0].parameters.weight, models[1].parameters.weight, normalize "
                             f"(default true): for tensor '{EMBED}', the weights sum to 0 (-0.5 + 0.5), so normalize "
                             "cannot divide by them\nHint: change a weight, or set normalize: false\n")


@case("spec")
def weights_sum_to_zero_for_some_tensors(tmp: Path, models: Models) -> Scenario:
    args, path = spec_case(tmp, f"""merge_method: task_arithmetic
base_model: {models.a}
parameters: {{normalize: true}}
models:
  - model: {models.b}
    parameters:
      weight: [{{filter: mlp, value: 0.5}}, {{value: 1.0}}]
  - model: {models.sharded}
    parameters:
      weight: [{{filter: up_proj, value: -0.5}}, {{value: 1.0}}]
""")
    return Scenario(args, 2, f"error: {path}: models[0].parameters.weight[0].value, models[1].parameters.weight[0]."
                             "value, parameters.normalize: for tensor 'model.layers.0.mlp.up_proj.weight', the weights "
                             "sum to 0 (0.5 + -0.5), so normalize cannot divide by them\n"
                             "Hint: change a weight, or set normalize: false\n")


@case("spec")
def density_outside_its_range(tmp: Path, models: Models) -> Scenario:
    args, path = spec_case(tmp, f"merge_method: ties\nbase_model: {models.a}\nmodels:\n  - model: {models.b}\n"
                                "    parameters: {weight: 1, density: 1.5}\n")
    return Scenario(args, 2, f"error: {path}: models[0].parameters.density: density = 1.5 is outside [0, 1]\n"
                             "Hint: fraction of this model's task vector entries kept\n")


@case("spec")
def della_probabilities_outside_0_1(tmp: Path, models: Models) -> Scenario:
    args, path = spec_case(tmp, f"merge_method: della\nbase_model: {models.a}\nmodels:\n  - model: {models.b}\n"
                                "    parameters: {weight: 1, density: 0.9, epsilon: 0.2}\n")
    return Scenario(args, 2, f"error: {path}: models[0].parameters.epsilon: density +/- epsilon must lie strictly "
                             f"inside (0, 1), got density 0.9 and epsilon 0.2 for tensor '{EMBED}' of models[0] "
                             f"({models.b})\nHint: see `merge methods della`\n")


@case("spec")
def dare_weights_sum_to_zero(tmp: Path, models: Models) -> Scenario:
    args, path = spec_case(tmp, f"merge_method: dare_linear\nbase_model: {models.a}\nparameters: {{normalize: true}}\n"
                                f"models:\n  - model: {models.b}\n    parameters: {{weight: 1, density: 0.5}}\n"
                                f"  - model: {models.sharded}\n    parameters: {{weight: -1, density: 0.5}}\n")
    return Scenario(args, 2, f"error: {path}: models[0].parameters.weight, models[1].parameters.weight, "
                             f"parameters.normalize: for tensor '{EMBED}', the weights sum to 0 (1 + -1), so normalize "
                             "cannot divide by them\nHint: change a weight, or set normalize: false\n")


@case("spec")
def slerp_t_nan(tmp: Path, models: Models) -> Scenario:
    args, path = spec_case(tmp, f"merge_method: slerp\nbase_model: {models.a}\nparameters: {{t: .nan}}\n"
                                f"models:\n  - model: {models.b}\n")
    return Scenario(args, 2, f"error: {path}: parameters.t: t must be a finite number, got nan\n")


@case("spec")
def dtype_not_a_name(tmp: Path, models: Models) -> Scenario:
    args, path = spec_case(tmp, f"merge_method: linear\ndtype: [bfloat16]\nmodels: [{models.a}]\n")
    return Scenario(args, 2, f"error: {path}: dtype: dtype must be a name such as bfloat16, got list\n")
