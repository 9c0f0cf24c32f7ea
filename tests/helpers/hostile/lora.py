"""Hostile inputs: LoRA adapters (merge fold, base+adapter)."""


from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Callable

import torch

from .catalogue import TINY, Models, PlantedCode, Scenario, case, run
from .models import NONFINITE_HINT
from .pickles import PICKLE_REFUSED


def fold_case(tmp: Path, models: Models, mutate: Callable[[Path], None], *extra: str) -> tuple[list[str], Path]:
    """``merge fold a <adapter> -o out``, the adapter written for ``a`` and then damaged by ``mutate``."""
    from mergekit_lite.testing.adapters import write_adapter

    adapter = tmp / "adapter"
    write_adapter(str(adapter), TINY)
    mutate(adapter)
    return ["fold", str(models.a), str(adapter), "-o", str(tmp / "out"), "--no-check-base", "--quiet", *extra], adapter


def edit_config(**fields) -> Callable[[Path], None]:
    def mutate(adapter: Path) -> None:
        path = adapter / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))
    return mutate


ADAPTER_WEIGHTS = "adapter_model.safetensors"
Q_PROJ = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


@case("lora adapter")
def adapter_config_not_json(tmp: Path, models: Models) -> Scenario:
    args, adapter = fold_case(tmp, models, lambda a: (a / "adapter_config.json").write_text("{'r': 8}"))
    return Scenario(args, 1, f"error: {adapter}: cannot read adapter_config.json: Expecting property name enclosed in "
                             "double quotes: line 1 column 2 (char 1)\nHint: the file is corrupt; download the adapter "
                             "again\n")


@case("lora adapter")
def adapter_config_nested_too_deeply(tmp: Path, models: Models) -> Scenario:
    args, adapter = fold_case(tmp, models, lambda a: (a / "adapter_config.json").write_text("[" * 100_000))
    return Scenario(args, 1, f"error: {adapter}: cannot read adapter_config.json: it is nested too deeply\n"
                             "Hint: the file is corrupt; download the adapter again\n")


@case("lora adapter")
def adapter_config_link_out_of_folder(tmp: Path, models: Models) -> Scenario:
    def mutate(adapter: Path) -> None:
        outside = tmp / "elsewhere.json"
        outside.write_text((adapter / "adapter_config.json").read_text())
        (adapter / "adapter_config.json").unlink()
        (adapter / "adapter_config.json").symlink_to(outside)
    args, adapter = fold_case(tmp, models, mutate)
    return Scenario(args, 1, f"error: {adapter}: adapter_config.json is a link that leaves the model folder\n"
                             "Hint: refusing it: copy the real file into the folder\n")


@case("lora adapter")
def lora_alpha_nan(tmp: Path, models: Models) -> Scenario:
    args, adapter = fold_case(tmp, models, edit_config(lora_alpha=float("nan")))
    return Scenario(args, 1, f"error: {adapter}: r=8, lora_alpha=nan are not a positive rank and a finite number\n"
                             "Hint: fix adapter_config.json\n")


@case("lora adapter")
def lora_alpha_huge(tmp: Path, models: Models) -> Scenario:
    args, adapter = fold_case(tmp, models, edit_config(lora_alpha=1e300))
    return Scenario(args, 1, f"error: {adapter}: r=8, lora_alpha=1e+300 are not a positive rank and a finite number\n"
                             "Hint: fix adapter_config.json\n")


@case("lora adapter")
def rank_pattern_that_backtracks_forever(tmp: Path, models: Models) -> Scenario:
    args, adapter = fold_case(tmp, models, edit_config(rank_pattern={"(.|.)*q": 4}))
    return Scenario(args, 1, f"error: {adapter}: rank_pattern key '(.|.)*q' takes more than 2 s to match the module "
                             "names (it backtracks exponentially)\nHint: peft matches it with Python's re, where it "
                             "could run for hours: use module names, or a pattern without a repeat of a repeat or of "
                             "overlapping alternatives, such as (a+)+ or (.|.)*\n")


@case("lora adapter")
def rank_pattern_not_a_regex(tmp: Path, models: Models) -> Scenario:
    args, adapter = fold_case(tmp, models, edit_config(alpha_pattern={"q_proj[": 4}))
    return Scenario(args, 1, f"error: {adapter}: alpha_pattern key 'q_proj[' is not a valid regular expression "
                             "(unterminated character set at position 6)\nHint: peft reads it as a regular expression; "
                             "fix it in adapter_config.json\n")


@case("lora adapter")
def adapter_weights_truncated(tmp: Path, models: Models) -> Scenario:
    def mutate(adapter: Path) -> None:
        path = adapter / ADAPTER_WEIGHTS
        path.write_bytes(path.read_bytes()[:-3])
    args, adapter = fold_case(tmp, models, mutate)
    raw = (adapter / ADAPTER_WEIGHTS).read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    entries = json.loads(raw[8:8 + length])
    last = max((k for k in entries if k != "__metadata__"), key=lambda k: entries[k]["data_offsets"][1])
    return Scenario(args, 1, f"error: {adapter / ADAPTER_WEIGHTS}: tensor '{last}': data_offsets "
                             f"{entries[last]['data_offsets']} end 3 bytes beyond the end of the file ({len(raw)} "
                             "bytes)\nHint: the file is truncated; download it again\n")


@case("lora adapter")
def adapter_weights_link_out_of_folder(tmp: Path, models: Models) -> Scenario:
    def mutate(adapter: Path) -> None:
        outside = tmp / "elsewhere.safetensors"
        outside.write_bytes((adapter / ADAPTER_WEIGHTS).read_bytes())
        (adapter / ADAPTER_WEIGHTS).unlink()
        (adapter / ADAPTER_WEIGHTS).symlink_to(outside)
    args, adapter = fold_case(tmp, models, mutate)
    return Scenario(args, 1, f"error: {adapter}: {ADAPTER_WEIGHTS} is a link that leaves the model folder\n"
                             "Hint: refusing it: copy the real file into the folder\n")


@case("lora adapter")
def nan_in_an_adapter(tmp: Path, models: Models) -> Scenario:
    def mutate(adapter: Path) -> None:
        path = adapter / ADAPTER_WEIGHTS
        raw = bytearray(path.read_bytes())
        (length,) = struct.unpack("<Q", raw[:8])
        begin = 8 + length + json.loads(raw[8:8 + length])[Q_PROJ]["data_offsets"][0]
        raw[begin:begin + 4] = struct.pack("<f", float("nan"))    # lora_A[0, 0]: column 0 of B @ A, every row
        path.write_bytes(bytes(raw))
    args, adapter = fold_case(tmp, models, mutate)
    return Scenario(args, 1, f"error: {models.a}+{adapter}: tensor 'model.layers.0.self_attn.q_proj.weight': the input "
                             f"already holds {TINY.hidden} NaN values, the first at [0, 0]\nHint: {NONFINITE_HINT}\n")


def hostile_adapter_pickle(adapter: Path, marker: Path) -> None:
    (adapter / ADAPTER_WEIGHTS).unlink()
    torch.save({Q_PROJ: torch.zeros(8, TINY.hidden),
                "payload": PlantedCode(f"open({str(marker)!r}, 'w').write('code ran')")}, adapter / "adapter_model.bin")


@case("lora adapter", "code")
def adapter_pickle_refused_by_default(tmp: Path, models: Models) -> Scenario:
    marker = tmp / "pwned"
    args, adapter = fold_case(tmp, models, lambda a: hostile_adapter_pickle(a, marker))
    return Scenario(args, 1, f"error: {adapter}: only a pickle adapter (adapter_model.bin) found; it is refused "
                             "because "
                             "loading a pickle can run arbitrary code\nHint: convert it (load it with peft, "
                             "save_pretrained(dir, safe_serialization=True)), or, if you trust its source, pass "
                             "--allow-pickle (tensors only, torch.load(weights_only=True))\n", marker=marker)


@case("lora adapter", "code")
def adapter_pickle_with_code_refused_with_opt_in(tmp: Path, models: Models) -> Scenario:
    marker = tmp / "pwned"
    args, adapter = fold_case(tmp, models, lambda a: hostile_adapter_pickle(a, marker), "--allow-pickle")
    return Scenario(args, 1, f"error: {adapter}/adapter_model.bin: refused by torch.load(weights_only=True): "
                             f"Unsupported global: GLOBAL exec\nHint: {PICKLE_REFUSED}\n", marker=marker)


@case("lora adapter", "code")
def adapter_pickle_in_a_spec_reference(tmp: Path, models: Models) -> Scenario:
    """The same hostile adapter reached through `merge run` and a base+adapter reference."""
    marker = tmp / "pwned"
    _, adapter = fold_case(tmp, models, lambda a: hostile_adapter_pickle(a, marker))
    spec = tmp / "spec.yaml"
    spec.write_text(f"merge_method: linear\nmodels:\n  - model: {models.a}+{adapter}\n    parameters: {{weight: 1}}\n")
    return Scenario(run(tmp, spec, "--allow-pickle"), 1, (
        f"error: {adapter}/adapter_model.bin: models[0].model: refused by torch.load(weights_only=True): "
        f"Unsupported global: GLOBAL exec\nHint: {PICKLE_REFUSED}\n"), marker=marker)
