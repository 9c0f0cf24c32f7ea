"""Hostile inputs: strict reading. A YAML key written twice, a folder with two readings of its weights, numbers
of thousands of digits, oversized JSON, and adapter-config regexes that peft would reject or that backtrack.

Inputs that would hang a run (a FIFO or device named like a model file) are in tests/test_strict_inputs.py,
which runs them with a timeout.
"""


from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import torch

from .catalogue import INDEX, MODEL_FILE, Models, Scenario, case, linear_spec, run
from .lora import edit_config, fold_case

GROUP = "strict inputs"
DIGITS = "1" * 5000
SPEC_TWICE_HINT = "YAML would silently keep only the last value: delete the one you do not mean"
CORRUPT = "the file is corrupt; download it again"


def spec_case(tmp: Path, models: Models, text: str) -> tuple[list[str], Path]:
    path = tmp / "spec.yaml"
    path.write_text(text.format(a=models.a, b=models.b))
    return run(tmp, path), path


@case(GROUP)
def spec_key_written_twice(tmp: Path, models: Models) -> Scenario:
    args, path = spec_case(tmp, models, "merge_method: ties\nbase_model: {a}\nmodels:\n  - model: {b}\n"
                                        "    parameters: {{weight: 1, density: 0.5}}\nmerge_method: task_arithmetic\n")
    return Scenario(args, 2, f"error: {path}: line 6, column 1: the key 'merge_method' is written twice in one "
                             f"mapping, at lines 1 and 6\nHint: {SPEC_TWICE_HINT}\n")


@case(GROUP)
def spec_key_twice_in_a_flow_mapping(tmp: Path, models: Models) -> Scenario:
    args, path = spec_case(tmp, models, "merge_method: linear\nmodels:\n  - model: {a}\n"
                                        "    parameters: {{weight: 0.5, weight: 2}}\n  - model: {b}\n"
                                        "    parameters: {{weight: 0.5}}\n")
    return Scenario(args, 2, f"error: {path}: line 4, column 31: the key 'weight' is written twice in one mapping, "
                             f"at line 4, columns 18 and 31\nHint: {SPEC_TWICE_HINT}\n")


@case(GROUP)
def spec_key_twice_in_a_nested_mapping(tmp: Path, models: Models) -> Scenario:
    args, path = spec_case(tmp, models, "merge_method: linear\nmodels:\n  - model: {a}\n    parameters:\n"
                                        "      weight: 0.5\n      weight: 2\n  - model: {b}\n")
    return Scenario(args, 2, f"error: {path}: line 6, column 7: the key 'weight' is written twice in one mapping, "
                             f"at lines 5 and 6\nHint: {SPEC_TWICE_HINT}\n")


@case(GROUP)
def spec_merge_key_written_twice(tmp: Path, models: Models) -> Scenario:
    args, path = spec_case(tmp, models, "defaults: &w {{weight: 0.5}}\nmore: &d {{density: 0.5}}\n"
                                        "merge_method: linear\nmodels:\n  - model: {a}\n    parameters:\n"
                                        "      <<: *w\n      <<: *d\n  - model: {b}\n")
    return Scenario(args, 2, f"error: {path}: line 8, column 7: the merge key '<<' is written twice in one mapping, "
                             "at lines 7 and 8\nHint: merge several mappings with one key: <<: [*first, *second]\n")


@case(GROUP)
def spec_key_set_by_two_merged_mappings(tmp: Path, models: Models) -> Scenario:
    args, path = spec_case(tmp, models, "half: &half {{weight: 0.5}}\ndouble: &double {{weight: 2}}\n"
                                        "merge_method: linear\nmodels:\n  - model: {a}\n"
                                        "    parameters: {{<<: [*half, *double]}}\n  - model: {b}\n")
    return Scenario(args, 2, f"error: {path}: line 6, column 18: the key 'weight' is set by two of the mappings "
                             "merged here, at lines 1 and 2, and YAML readers disagree on which one wins\n"
                             "Hint: set it in only one of them, or write it beside the << key, which overrides "
                             "both\n")


@case(GROUP)
def spec_integer_of_thousands_of_digits(tmp: Path, models: Models) -> Scenario:
    args, path = spec_case(tmp, models, "merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: "
                                        + DIGITS + "}}\n  - model: {b}\n")
    return Scenario(args, 2, f"error: {path}: line 4, column 26: the integer '{DIGITS[:37]}...' has 5,000 digits, "
                             "more than the 4,300 read\nHint: a merge parameter is a small number; check that line\n")


def _two_layouts(tmp: Path, models: Models) -> Path:
    """The sharded model, plus a model.safetensors (another fine-tune's) that its index does not list."""
    bad = models.copy(models.sharded, tmp / "bad")
    shutil.copyfile(models.b / MODEL_FILE, bad / MODEL_FILE)
    return bad


@case(GROUP)
def index_beside_another_model_safetensors(tmp: Path, models: Models) -> Scenario:
    bad = _two_layouts(tmp, models)
    shards = sorted(set(json.loads((bad / INDEX).read_text())["weight_map"].values()))
    listed = ", ".join(shards[:3]) + (", ..." if len(shards) > 3 else "")
    return Scenario(run(tmp, linear_spec(tmp, models.a, bad)), 1, (
        f"error: {bad}: models[1].model: the folder holds both {MODEL_FILE} and {INDEX} (shards {listed}): "
        f"transformers loads {MODEL_FILE}, other tools the index's shards, so which weights are meant is unclear\n"
        f"Hint: move away what is not the model: {MODEL_FILE}, or {INDEX} with its shards\n"), preserved=(bad,))


@case(GROUP)
def pickle_index_beside_another_pytorch_model_bin(tmp: Path, models: Models) -> Scenario:
    from safetensors.torch import load_file

    state = load_file(str(models.b / MODEL_FILE))
    names = sorted(state)
    bad = tmp / "pickled"
    bad.mkdir()
    torch.save({n: state[n] for n in names[:5]}, bad / "pytorch_model-00001-of-00002.bin")
    torch.save({n: state[n] for n in names[5:]}, bad / "pytorch_model-00002-of-00002.bin")
    torch.save(state, bad / "pytorch_model.bin")
    weight_map = {n: f"pytorch_model-0000{1 if i < 5 else 2}-of-00002.bin" for i, n in enumerate(names)}
    (bad / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return Scenario(run(tmp, linear_spec(tmp, models.a, bad), "--allow-pickle"), 1, (
        f"error: {bad}: models[1].model: the folder holds both pytorch_model.bin and pytorch_model.bin.index.json "
        "(shards pytorch_model-00001-of-00002.bin, pytorch_model-00002-of-00002.bin): transformers loads "
        "pytorch_model.bin, other tools the index's shards, so which weights are meant is unclear\n"
        "Hint: move away what is not the model: pytorch_model.bin, or pytorch_model.bin.index.json with its shards\n"))


@case(GROUP)
def integer_of_thousands_of_digits_in_a_header(tmp: Path, models: Models) -> Scenario:
    bad = models.copy(models.a, tmp / "bad")
    raw = (bad / MODEL_FILE).read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = raw[8:8 + length].replace(b'"__metadata__":', b'"n":' + DIGITS.encode() + b',"__metadata__":', 1)
    (bad / MODEL_FILE).write_bytes(struct.pack("<Q", len(header)) + header + raw[8 + length:])
    return Scenario(run(tmp, linear_spec(tmp, models.b, bad)), 1, (
        f"error: {bad / MODEL_FILE}: models[1].model: header is not valid JSON (holds an integer of 5,000 digits, "
        "more than the 4,300 read)\nHint: the file is corrupt or not safetensors; download it again\n"))


@case(GROUP)
def integer_of_thousands_of_digits_in_an_index(tmp: Path, models: Models) -> Scenario:
    bad = models.copy(models.sharded, tmp / "bad")
    text = (bad / INDEX).read_text()
    (bad / INDEX).write_text(text.replace('"metadata": {', '"metadata": {"n": ' + DIGITS + ", ", 1))
    return Scenario(run(tmp, linear_spec(tmp, models.a, bad)), 1, (
        f"error: {bad / INDEX}: models[1].model: the shard index is not valid JSON (holds an integer of 5,000 digits, "
        "more than the 4,300 read)\nHint: the index is corrupt; download it again\n"))


@case(GROUP)
def integer_of_thousands_of_digits_in_a_config(tmp: Path, models: Models) -> Scenario:
    bad = models.copy(models.a, tmp / "bad")
    (bad / "config.json").write_text('{"model_type": "llama", "vocab_size": ' + DIGITS + "}")
    return Scenario(run(tmp, linear_spec(tmp, models.b, bad)), 1, (
        f"error: {bad / 'config.json'}: models[1].model: cannot read config.json: holds an integer of 5,000 digits, "
        f"more than the 4,300 read\nHint: {CORRUPT}\n"))


@case(GROUP)
def config_larger_than_any_real_one(tmp: Path, models: Models) -> Scenario:
    bad = models.copy(models.a, tmp / "bad")
    with open(bad / "config.json", "r+b") as f:   # sparse: 17 MiB that take no disk
        f.truncate(17 << 20)
    return Scenario(run(tmp, linear_spec(tmp, models.b, bad)), 1, (
        f"error: {bad / 'config.json'}: models[1].model: cannot read config.json: is 17,825,792 bytes, more than the "
        f"16,777,216 allowed\nHint: {CORRUPT}\n"))


@case(GROUP)
def integer_of_thousands_of_digits_in_an_adapter_config(tmp: Path, models: Models) -> Scenario:
    def mutate(adapter: Path) -> None:
        path = adapter / "adapter_config.json"
        path.write_text(path.read_text().replace('"r": ', '"r": ' + DIGITS + ', "x": ', 1))
    args, adapter = fold_case(tmp, models, mutate)
    return Scenario(args, 1, f"error: {adapter}: cannot read adapter_config.json: holds an integer of 5,000 digits, "
                             "more than the 4,300 read\nHint: the file is corrupt; download the adapter again\n")


@case(GROUP)
def target_modules_not_a_regex(tmp: Path, models: Models) -> Scenario:
    args, adapter = fold_case(tmp, models, edit_config(target_modules="q_proj|(v_proj"))
    return Scenario(args, 1, f"error: {adapter}: target_modules 'q_proj|(v_proj' is not a valid regular expression "
                             "(missing ), unterminated subpattern at position 7)\nHint: peft reads it as a regular "
                             "expression; fix it in adapter_config.json\n")


@case(GROUP)
def target_modules_entry_not_a_string(tmp: Path, models: Models) -> Scenario:
    args, adapter = fold_case(tmp, models, edit_config(target_modules=["q_proj", 7]))
    return Scenario(args, 1, f"error: {adapter}: target_modules[1] is 7, not a module name\n"
                             "Hint: fix adapter_config.json\n")


@case(GROUP)
def target_modules_that_backtracks_forever(tmp: Path, models: Models) -> Scenario:
    args, adapter = fold_case(tmp, models, edit_config(target_modules="(.|.)*q"))
    return Scenario(args, 1, f"error: {adapter}: target_modules '(.|.)*q' takes more than 2 s to match the module "
                             "names (it backtracks exponentially)\nHint: peft matches it with Python's re, where it "
                             "could run for hours: use module names, or a pattern without a repeat of a repeat or of "
                             "overlapping alternatives, such as (a+)+ or (.|.)*\n")


@case(GROUP)
def alpha_pattern_that_compiles_to_gigabytes(tmp: Path, models: Models) -> Scenario:
    args, adapter = fold_case(tmp, models, edit_config(alpha_pattern={"((q{1000}){1000}){1000}": 4}))
    return Scenario(args, 1, f"error: {adapter}: alpha_pattern key '((q{{1000}}){{1000}}){{1000}}' repeats fixed counts "
                             "to more than 10,000 items\nHint: use module names, or a pattern without large nested "
                             "counts such as (a{100}){100}\n")


@case(GROUP)
def exclude_modules_not_a_regex(tmp: Path, models: Models) -> Scenario:
    args, adapter = fold_case(tmp, models, edit_config(exclude_modules="*proj"))
    return Scenario(args, 1, f"error: {adapter}: exclude_modules '*proj' is not a valid regular expression (nothing "
                             "to repeat at position 0)\nHint: peft reads it as a regular expression; fix it in "
                             "adapter_config.json\n")


@case(GROUP)
def config_naming_other_weights_for_transformers(tmp: Path, models: Models) -> Scenario:
    bad = models.copy(models.a, tmp / "bad")
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "transformers_weights": "consolidated.safetensors"}))
    shutil.copyfile(models.b / MODEL_FILE, bad / "consolidated.safetensors")
    return Scenario(run(tmp, linear_spec(tmp, models.b, bad)), 1, (
        f"error: {bad}: models[1].model: config.json names 'consolidated.safetensors' as the weights to load "
        f"(transformers_weights), but the folder's weights are {MODEL_FILE}\nHint: remove transformers_weights from "
        f"config.json, or keep only the weights it names, as {MODEL_FILE} or {INDEX} with its shards\n"))
