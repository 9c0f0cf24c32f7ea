"""Hostile inputs: safetensors files."""


from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from .catalogue import (
    CORRUPT,
    CRAFTED,
    EMBED,
    MODEL_FILE,
    TINY,
    Models,
    Scenario,
    case,
    damaged,
    join_file,
    model_error,
    run,
    split_file,
)


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
        "supported: F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL, F8_E4M3, F8_E5M2, F8_E4M3FNUZ, F8_E5M2FNUZ, U16, "
        "U32, U64"))


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
