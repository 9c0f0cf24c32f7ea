"""Hostile inputs: pickle checkpoints."""


from __future__ import annotations

from pathlib import Path

import torch

from .catalogue import Models, PlantedCode, Scenario, case, hostile_pickle, linear_spec, run


@case("pickle", "code")
def pickle_refused_by_default(tmp: Path, models: Models) -> Scenario:
    marker = tmp / "pwned"
    hostile_pickle(tmp / "pickled", marker)
    spec = linear_spec(tmp, models.a, tmp / "pickled")
    return Scenario(run(tmp, spec), 1, (
        f"error: {tmp / 'pickled'}: models[1].model: only pickle checkpoints found (pytorch_model.bin); they are "
        "refused because loading a pickle can run arbitrary code\nHint: use a safetensors version of the model, or, "
        "if you trust its source, pass --allow-pickle (loads tensors only, with torch.load(weights_only=True), which "
        "refuses code)\n"), marker=marker)


PICKLE_REFUSED = ("the file asks for more than tensors and plain containers, so it is refused even with "
                  "--allow-pickle; get a safetensors version of the model")


@case("pickle", "code")
def pickle_with_code_refused_with_opt_in(tmp: Path, models: Models) -> Scenario:
    marker = tmp / "pwned"
    hostile_pickle(tmp / "pickled", marker)
    spec = linear_spec(tmp, models.a, tmp / "pickled")
    return Scenario(run(tmp, spec, "--allow-pickle"), 1, (
        f"error: {tmp / 'pickled'}/pytorch_model.bin: models[1].model: refused by torch.load(weights_only=True): "
        f"Unsupported global: GLOBAL exec\nHint: {PICKLE_REFUSED}\n"), marker=marker)


@case("pickle", "code")
def raw_pickle_with_code_refused_with_opt_in(tmp: Path, models: Models) -> Scenario:
    """Not torch.save's zip format: a bare pickle stream whose first opcode runs the payload."""
    import pickle

    marker = tmp / "pwned"
    (tmp / "pickled").mkdir()
    with open(tmp / "pickled" / "pytorch_model.bin", "wb") as f:
        pickle.dump(PlantedCode(f"open({str(marker)!r}, 'w').write('code ran')"), f, protocol=2)
    spec = linear_spec(tmp, models.a, tmp / "pickled")
    return Scenario(run(tmp, spec, "--allow-pickle"), 1, (
        f"error: {tmp / 'pickled'}/pytorch_model.bin: models[1].model: refused by torch.load(weights_only=True): "
        f"Unsupported global: GLOBAL exec\nHint: {PICKLE_REFUSED}\n"), marker=marker)


@case("pickle")
def pickle_not_a_state_dict(tmp: Path, models: Models) -> Scenario:
    (tmp / "pickled").mkdir()
    torch.save([torch.zeros(2)], tmp / "pickled" / "pytorch_model.bin")
    spec = linear_spec(tmp, models.a, tmp / "pickled")
    return Scenario(run(tmp, spec, "--allow-pickle"), 1, (
        f"error: {tmp / 'pickled'}/pytorch_model.bin: models[1].model: holds a list, not a state dict of tensors\n"
        "Hint: save the model's state_dict() (or convert it to safetensors)\n"))


@case("pickle")
def pickle_garbage(tmp: Path, models: Models) -> Scenario:
    (tmp / "pickled").mkdir()
    (tmp / "pickled" / "pytorch_model.bin").write_bytes(b"PK\x03\x04 this is not a checkpoint")
    spec = linear_spec(tmp, models.a, tmp / "pickled")
    return Scenario(run(tmp, spec, "--allow-pickle"), 1, (
        f"error: {tmp / 'pickled'}/pytorch_model.bin: models[1].model: cannot be read as a torch checkpoint "
        "(PytorchStreamReader failed reading zip archive: failed finding central directory)\n"
        "Hint: the file is corrupt or not a torch checkpoint; download it again\n"))
