"""The catalogue of hostile and broken inputs: each case builds its input, runs `merge ...`, and expects one
exact error and exit code. tests/test_hostile_inputs.py runs every case through click's CliRunner;
scripts/hostile_report.py runs them as real processes and fills the README table.

A case that plants code (a pickle or a YAML tag that would write a file) names the file it would write, so
a runner can check that nothing ran. Every case starts from copies of tiny synthetic models, so the inputs
it damages are its own, and a runner can hash the shared inputs before and after.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from mergekit_lite.testing.synthetic import LlamaShape, write_model

TINY = LlamaShape(hidden=16, intermediate=32, layers=2, heads=2, kv_heads=1, vocab=32)
TINY_SHARD = 3_000     # bytes: the sharded model has several shards
MODEL_FILE = "model.safetensors"
INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class Models:
    """Good inputs every case may reference (never modified) and copy (then damage its copy)."""

    root: Path
    a: Path            # single file
    b: Path            # single file, another fine-tune
    sharded: Path      # several shards and an index

    def copy(self, source: Path, dest: Path) -> Path:
        shutil.copytree(source, dest)
        return dest


def build_models(root: Path) -> Models:
    write_model(str(root / "a"), TINY, seed=0, delta_seed=1)
    write_model(str(root / "b"), TINY, seed=0, delta_seed=2)
    write_model(str(root / "sharded"), TINY, seed=0, delta_seed=3, max_shard_size=TINY_SHARD)
    return Models(root, root / "a", root / "b", root / "sharded")


@dataclass
class Scenario:
    args: list[str]                      # after `merge`
    code: int                            # expected exit code
    stderr: str                          # expected stderr, exactly
    marker: Optional[Path] = None        # a file the planted code would write: it must never exist
    out: Optional[Path] = None           # the -o folder: must not exist after a refused run


@dataclass(frozen=True)
class Case:
    group: str
    name: str
    build: Callable[[Path, Models], Scenario]
    tags: tuple[str, ...] = field(default=())


CASES: list[Case] = []


def case(group: str, *tags: str):
    def register(fn: Callable[[Path, Models], Scenario]) -> Callable[[Path, Models], Scenario]:
        CASES.append(Case(group, fn.__name__, fn, tags))
        return fn
    return register


# ---------------------------------------------------------------- helpers

def linear_spec(tmp: Path, *models: Path, extra: str = "", name: str = "spec.yaml") -> Path:
    lines = ["merge_method: linear", "models:"] + [f"  - model: {m}\n    parameters: {{weight: 0.5}}" for m in models]
    path = tmp / name
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


def run(tmp: Path, spec: Path, *extra: str) -> list[str]:
    return ["run", str(spec), "-o", str(tmp / "out"), "--no-validate", "--quiet", *extra]


def split_file(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + length]), raw[8 + length:]


def join_file(path: Path, header: dict, data: bytes) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def damaged(tmp: Path, models: Models, mutate: Callable[[Path], None]) -> tuple[Path, Path, Path]:
    """(spec, damaged folder, its model.safetensors): a copy of ``a`` with its file mutated, merged with ``b``."""
    bad = models.copy(models.a, tmp / "bad")
    mutate(bad / MODEL_FILE)
    return linear_spec(tmp, models.b, bad), bad, bad / MODEL_FILE


def model_error(bad: Path, where: str, what: str, hint: str) -> str:
    return f"error: {bad}: models[1].model: {where}{what}\nHint: {hint}\n"


class PlantedCode:
    """Unpickling this runs ``exec`` of its code: the payload of a hostile pickle."""

    def __init__(self, code: str):
        self.code = code

    def __reduce__(self):
        return exec, (self.code,)


def hostile_pickle(folder: Path, marker: Path) -> None:
    folder.mkdir(parents=True)
    state = {"model.embed_tokens.weight": torch.zeros(2, 2),
             "payload": PlantedCode(f"open({str(marker)!r}, 'w').write('code ran')")}
    torch.save(state, folder / "pytorch_model.bin")


def leftover_problems(out: Path) -> list[str]:
    """What a failed run left that could pass for a finished output; [] when nothing did.

    Allowed: no OUT, no lock file, and an OUT.partial without index or config.json (they are written after the
    last tensor) whose shards are each either finished (every tensor written, none left zero-filled) or
    unloadable (the shard being written when the run stopped has no header yet)."""
    from safetensors import SafetensorError, safe_open

    problems = [f"{p} exists" for p in (out, Path(f"{out}.lock")) if os.path.lexists(p)]
    partial = Path(f"{out}.partial")
    problems += [f"{partial / n} exists" for n in (INDEX, "config.json") if (partial / n).exists()]
    for shard in sorted(partial.glob("*.safetensors")):
        try:
            with safe_open(str(shard), framework="pt") as f:
                problems += [f"{shard}: '{k}' is all zeros" for k in f.keys() if not f.get_tensor(k).abs().sum() > 0]
        except SafetensorError:
            pass
    return problems


CORRUPT = "the file is corrupt; download it again"
CRAFTED = "the file is corrupt or was crafted; download it again"
EMBED = "model.embed_tokens.weight"


# ---------------------------------------------------------------- safetensors files

@case("safetensors file")
def truncated(tmp: Path, models: Models) -> Scenario:
    spec, bad, file = damaged(tmp, models, lambda p: p.write_bytes(p.read_bytes()[:-10]))
    header, data = split_file(models.a / MODEL_FILE)
    last = max(header.items(), key=lambda kv: kv[1]["data_offsets"][1] if kv[0] != "__metadata__" else -1)
    size = file.stat().st_size
    return Scenario(run(tmp, spec), 1, model_error(
        file, f"tensor '{last[0]}': ", f"data_offsets {last[1]['data_offsets']} end 10 bytes beyond the end of the "
        f"file ({size} bytes)", "the file is truncated; download it again"))


@case("safetensors file")
def zero_length(tmp: Path, models: Models) -> Scenario:
    spec, bad, file = damaged(tmp, models, lambda p: p.write_bytes(b""))
    return Scenario(run(tmp, spec), 1, model_error(file, "", "file is 0 bytes, too short to be safetensors",
                                                   "the file is truncated or empty; download or copy it again"))


@case("safetensors file")
def header_longer_than_file(tmp: Path, models: Models) -> Scenario:
    def mutate(p: Path) -> None:
        raw = p.read_bytes()
        p.write_bytes(struct.pack("<Q", len(raw) + 100) + raw[8:])
    spec, bad, file = damaged(tmp, models, mutate)
    size = file.stat().st_size
    return Scenario(run(tmp, spec), 1, model_error(
        file, "", f"header length {size + 100} does not fit in a file of {size} bytes",
        "the file is truncated or not safetensors; download it again"))


@case("safetensors file")
def header_not_json(tmp: Path, models: Models) -> Scenario:
    def mutate(p: Path) -> None:
        raw = bytearray(p.read_bytes())
        raw[8:12] = b"\xff{{["
        p.write_bytes(bytes(raw))
    spec, bad, file = damaged(tmp, models, mutate)
    return Scenario(run(tmp, spec), 1, model_error(
        file, "", "header is not valid JSON ('utf-8' codec can't decode byte 0xff in position 0: invalid start byte)",
        "the file is corrupt or not safetensors; download it again"))


@case("safetensors file")
def header_nested_too_deeply(tmp: Path, models: Models) -> Scenario:
    def mutate(p: Path) -> None:
        text = b"[" * 200_000
        p.write_bytes(struct.pack("<Q", len(text)) + text)
    spec, bad, file = damaged(tmp, models, mutate)
    return Scenario(run(tmp, spec), 1, model_error(file, "", "header JSON is nested too deeply", CRAFTED))


@case("safetensors file")
def duplicate_tensor_name(tmp: Path, models: Models) -> Scenario:
    def mutate(p: Path) -> None:
        raw = p.read_bytes()
        (length,) = struct.unpack("<Q", raw[:8])
        text = raw[8:8 + length].decode()
        entry = text[text.index(f'"{EMBED}"'):text.index("}", text.index(f'"{EMBED}"')) + 1]
        text = text.replace(entry, entry + "," + entry, 1).encode()
        p.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + length:])
    spec, bad, file = damaged(tmp, models, mutate)
    return Scenario(run(tmp, spec), 1, model_error(file, "", f"header lists tensor '{EMBED}' twice", CRAFTED))


def _second_tensor(header: dict) -> str:
    ordered = sorted((v["data_offsets"][0], k) for k, v in header.items() if k != "__metadata__")
    return ordered[1][1], ordered[0][1]


@case("safetensors file")
def offsets_overlap(tmp: Path, models: Models) -> Scenario:
    header, data = split_file(models.a / MODEL_FILE)
    second, first = _second_tensor(header)

    def mutate(p: Path) -> None:
        begin, end = header[second]["data_offsets"]
        header[second]["data_offsets"] = [begin - 4, end - 4]
        join_file(p, header, data)
    spec, bad, file = damaged(tmp, models, mutate)
    return Scenario(run(tmp, spec), 1, model_error(file, f"tensor '{second}': ", f"data overlaps tensor '{first}'",
                                                   CRAFTED))


@case("safetensors file")
def offsets_outside_file(tmp: Path, models: Models) -> Scenario:
    header, data = split_file(models.a / MODEL_FILE)
    second, _ = _second_tensor(header)
    begin, end = header[second]["data_offsets"]
    far = [begin + 10**12, end + 10**12]

    def mutate(p: Path) -> None:
        header[second]["data_offsets"] = far
        join_file(p, header, data)
    spec, bad, file = damaged(tmp, models, mutate)
    size = file.stat().st_size
    beyond = 8 + len(json.dumps(header).encode()) + far[1] - size
    return Scenario(run(tmp, spec), 1, model_error(
        file, f"tensor '{second}': ",
        f"data_offsets {far} end {beyond} bytes beyond the end of the file ({size} bytes)",
        "the file is truncated; download it again"))


@case("safetensors file")
def unknown_dtype(tmp: Path, models: Models) -> Scenario:
    header, data = split_file(models.a / MODEL_FILE)

    def mutate(p: Path) -> None:
        header[EMBED]["dtype"] = "Q4_K"
        join_file(p, header, data)
    spec, bad, file = damaged(tmp, models, mutate)
    return Scenario(run(tmp, spec), 1, model_error(
        file, f"tensor '{EMBED}': ", "dtype 'Q4_K' is not supported",
        "supported: F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL, F8_E4M3, F8_E5M2, U16, U32, U64"))


@case("safetensors file")
def shape_does_not_match_offsets(tmp: Path, models: Models) -> Scenario:
    header, data = split_file(models.a / MODEL_FILE)
    begin, end = header[EMBED]["data_offsets"]

    def mutate(p: Path) -> None:
        header[EMBED]["shape"] = [TINY.vocab * 2, TINY.hidden]
        join_file(p, header, data)
    spec, bad, file = damaged(tmp, models, mutate)
    return Scenario(run(tmp, spec), 1, model_error(
        file, f"tensor '{EMBED}': ", f"shape [{TINY.vocab * 2}, {TINY.hidden}] of F32 needs "
        f"{TINY.vocab * 2 * TINY.hidden * 4} bytes but data_offsets span {end - begin}", CORRUPT))


@case("safetensors file")
def shape_bomb(tmp: Path, models: Models) -> Scenario:
    """A million dimensions of 2**52: multiplying them out would take minutes; refused at once."""
    header, data = split_file(models.a / MODEL_FILE)
    begin, end = header[EMBED]["data_offsets"]

    def mutate(p: Path) -> None:
        header[EMBED]["shape"] = [2**52] * 1_000_000
        join_file(p, header, data)
    spec, bad, file = damaged(tmp, models, mutate)
    shape = repr([2**52] * 1_000_000)[:77] + "..."
    return Scenario(run(tmp, spec), 1, model_error(
        file, f"tensor '{EMBED}': ", f"shape {shape} of F32 needs more bytes than the file has but data_offsets span "
        f"{end - begin}", CORRUPT))


@case("safetensors file")
def not_a_regular_file(tmp: Path, models: Models) -> Scenario:
    def mutate(p: Path) -> None:
        p.unlink()
        os.mkfifo(p)   # reading it would block forever
    spec, bad, file = damaged(tmp, models, mutate)
    return Scenario(run(tmp, spec), 1, model_error(file, "", "is not a regular file",
                                                   "give the model's safetensors files themselves"))


@case("safetensors file")
def weights_link_out_of_folder(tmp: Path, models: Models) -> Scenario:
    def mutate(p: Path) -> None:
        p.unlink()
        p.symlink_to(models.b / MODEL_FILE)
    spec, bad, file = damaged(tmp, models, mutate)
    return Scenario(run(tmp, spec), 1, f"error: {bad}: models[1].model: {MODEL_FILE} is a link that leaves the model "
                                       "folder\nHint: refusing it: copy the real file into the folder\n")


# ---------------------------------------------------------------- shard index

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


# ---------------------------------------------------------------- pickle checkpoints

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


# ---------------------------------------------------------------- the spec

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


# ---------------------------------------------------------------- models

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
        f"Hint: the vocabularies differ (40 vs {TINY.vocab} tokens) and embeddings are merged row by row. Merge "
        f"models that share a tokenizer; or, if the first {TINY.vocab} tokens are the same in both (the extra rows "
        f"are tokens added at the end), truncate the larger model's embeddings and lm_head to {TINY.vocab} rows "
        "first. tokenizer_source only chooses which tokenizer is copied: remapping tokens by their text "
        "(mergekit's tokenizer_source: union) is not supported\n"))


@case("models")
def dtypes_differ(tmp: Path, models: Models) -> Scenario:
    half = tmp / "half"
    write_model(str(half), TINY, dtype=torch.bfloat16, seed=0, delta_seed=5)
    spec = linear_spec(tmp, models.a, half)
    return Scenario(run(tmp, spec), 1, f"error: tensor '{EMBED}': models store this tensor as bfloat16 and float32\n"
                                       "Hint: set dtype: (e.g. dtype: bfloat16) in the spec to say which precision "
                                       "to merge in\n")


@case("models")
def tokenizer_from_a_larger_vocabulary(tmp: Path, models: Models) -> Scenario:
    wide = tmp / "wide"
    write_model(str(wide), LlamaShape(**{**TINY.__dict__, "vocab": 40}), seed=0, delta_seed=4)
    args, path = spec_case(tmp, f"merge_method: linear\ntokenizer_source: {wide}\nmodels:\n"
                                f"  - model: {models.a}\n    parameters: {{weight: 0.5}}\n"
                                f"  - model: {models.b}\n    parameters: {{weight: 0.5}}\n")
    return Scenario(args, 2, f"error: {path}: tokenizer_source: {wide} has 40 token embeddings but the merged model "
                             f"has {TINY.vocab}, so its tokenizer can produce ids the merged model cannot embed\n"
                             "Hint: use the tokenizer of a model with the merged models' vocabulary (tokenizer_source: "
                             "base, or one of them)\n")


# ---------------------------------------------------------------- LoRA adapters (merge fold, base+adapter)

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
    args, adapter = fold_case(tmp, models, edit_config(rank_pattern={"(.*a)+$x": 4}))
    return Scenario(args, 1, f"error: {adapter}: rank_pattern / alpha_pattern key '(.*a)+$x' is a pattern that could "
                             "take exponential time to match\nHint: use a plain module name or path, or a pattern "
                             "without nested repeats\n")


@case("lora adapter")
def rank_pattern_not_a_regex(tmp: Path, models: Models) -> Scenario:
    args, adapter = fold_case(tmp, models, edit_config(alpha_pattern={"q_proj[": 4}))
    return Scenario(args, 1, f"error: {adapter}: rank_pattern / alpha_pattern key 'q_proj[' is not a valid regular "
                             "expression (unterminated character set at position 6)\nHint: peft reads these keys as "
                             "regular expressions; fix it in adapter_config.json\n")


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
