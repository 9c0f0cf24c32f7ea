"""Hostile inputs: shard index."""


from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

from .catalogue import INDEX, MODEL_FILE, Models, Scenario, case, linear_spec, run


def damaged_index(tmp: Path, models: Models, mutate: Callable[[Path, dict], Optional[dict]]) -> tuple[Path, Path]:
    bad = models.copy(models.sharded, tmp / "bad")
    index = json.loads((bad / INDEX).read_text())
    changed = mutate(bad, index)
    if changed is not None:
        (bad / INDEX).write_text(json.dumps(changed))
    return linear_spec(tmp, models.a, bad), bad


def index_error(bad: Path, what: str, hint: str) -> str:
    return f"error: {bad}/{INDEX}: models[1].model: {what}\nHint: {hint}\n"


def _first_shard(index: dict) -> tuple[str, str]:
    name, shard = sorted(index["weight_map"].items(), key=lambda kv: kv[1])[0]
    return name, shard


@case("shard index")
def index_not_json(tmp: Path, models: Models) -> Scenario:
    def mutate(folder: Path, index: dict) -> None:
        (folder / INDEX).write_text("{not json")
    spec, bad = damaged_index(tmp, models, mutate)
    return Scenario(run(tmp, spec), 1, index_error(
        bad, "the shard index is not valid JSON (Expecting property name enclosed in double quotes: line 1 column 2 "
        "(char 1))", "the index is corrupt; download it again"))


@case("shard index")
def index_without_weight_map(tmp: Path, models: Models) -> Scenario:
    spec, bad = damaged_index(tmp, models, lambda folder, index: {"weight_map": ["not", "a", "map"]})
    return Scenario(run(tmp, spec), 1, index_error(bad, "the index has no weight_map of tensor name -> shard file",
                                                   "the index is corrupt; download it again"))


@case("shard index")
def missing_shard(tmp: Path, models: Models) -> Scenario:
    shard = sorted(json.loads((models.sharded / INDEX).read_text())["weight_map"].values())[-1]
    spec, bad = damaged_index(tmp, models, lambda folder, index: (folder / shard).unlink())
    return Scenario(run(tmp, spec), 1, index_error(bad, f"the index names shard '{shard}', which does not exist",
                                                   "the download is incomplete; download the missing shard again"))


def _retarget(target: str) -> Callable[[Path, dict], dict]:
    def mutate(folder: Path, index: dict) -> dict:
        name, _ = _first_shard(index)
        index["weight_map"][name] = target
        return index
    return mutate


@case("shard index")
def shard_name_with_dotdot(tmp: Path, models: Models) -> Scenario:
    spec, bad = damaged_index(tmp, models, _retarget(f"../a/{MODEL_FILE}"))
    return Scenario(run(tmp, spec), 1, index_error(
        bad, f"shard name '../a/{MODEL_FILE}' points outside the model folder",
        "refusing it: shard names must be plain file names inside the folder"))


@case("shard index")
def shard_name_absolute(tmp: Path, models: Models) -> Scenario:
    target = str(models.a / MODEL_FILE)
    spec, bad = damaged_index(tmp, models, _retarget(target))
    return Scenario(run(tmp, spec), 1, index_error(
        bad, f"shard name '{target}' points outside the model folder",
        "refusing it: shard names must be plain file names inside the folder"))


@case("shard index")
def shard_name_with_nul(tmp: Path, models: Models) -> Scenario:
    spec, bad = damaged_index(tmp, models, _retarget("model\u0000.safetensors"))
    return Scenario(run(tmp, spec), 1, index_error(bad, "shard name 'model\\x00.safetensors' is not a file name",
                                                   "the index is corrupt; download it again"))


@case("shard index")
def shard_link_out_of_folder(tmp: Path, models: Models) -> Scenario:
    index = json.loads((models.sharded / INDEX).read_text())
    _, shard = _first_shard(index)

    def mutate(folder: Path, index: dict) -> None:
        (folder / shard).unlink()
        (folder / shard).symlink_to(models.a / MODEL_FILE)
    spec, bad = damaged_index(tmp, models, mutate)
    return Scenario(run(tmp, spec), 1, index_error(bad, f"shard '{shard}' is a link that leaves the model folder",
                                                   "refusing it: copy the real file into the folder"))


@case("shard index")
def tensor_absent_from_its_shard(tmp: Path, models: Models) -> Scenario:
    index = json.loads((models.sharded / INDEX).read_text())
    _, shard = _first_shard(index)

    def mutate(folder: Path, index: dict) -> dict:
        index["weight_map"]["model.ghost.weight"] = shard
        return index
    spec, bad = damaged_index(tmp, models, mutate)
    return Scenario(run(tmp, spec), 1, index_error(
        bad, f"the index lists tensor 'model.ghost.weight' in {shard}, but that shard does not have it",
        "the index and shards are from different versions"))


@case("shard index")
def tokenizer_link_out_of_folder(tmp: Path, models: Models) -> Scenario:
    """A tokenizer file linking to any file would be copied into the output (and perhaps published)."""
    secret = tmp / "secret.txt"
    secret.write_text("not for publishing")
    bad = models.copy(models.a, tmp / "bad")
    (bad / "tokenizer.json").unlink()
    (bad / "tokenizer.json").symlink_to(secret)
    spec = tmp / "spec.yaml"
    spec.write_text(f"merge_method: linear\nbase_model: {bad}\nparameters: {{weight: 0.5}}\nmodels:\n"
                    f"  - model: {models.b}\n")
    return Scenario(run(tmp, spec), 1, f"error: {bad}: tokenizer.json is a link that leaves the model folder\n"
                                       "Hint: refusing it: copy the real file into the folder\n")
