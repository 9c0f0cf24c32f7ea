"""Fuzz targets for the input parsers: the safetensors header, the shard index, the spec's YAML.

Each target takes generated input, runs our parser on it and checks the only two allowed outcomes: our own
error (a MergeError subclass), or a result that is consistent with the bytes (every tensor inside the file,
the data block tiled exactly, every shard inside the model folder). Anything else (another exception, a
hang, a result pointing outside the file) is a bug. tests/test_fuzz_parsers.py runs them for a few seconds
in CI; scripts/fuzz_headers.py runs them for as long as you like and counts outcomes.
"""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
from collections import Counter
from typing import Any

from hypothesis import strategies as st

from mergekit_lite.dtypes import SAFETENSORS_TO_TORCH, itemsize
from mergekit_lite.errors import MergeError, SpecError
from mergekit_lite.safetensors_format import read_header
from mergekit_lite.sources.opener import open_checkpoint
from mergekit_lite.spec.schema import load_spec

DTYPES = list(SAFETENSORS_TO_TORCH) + ["Q4_K", "F4", "", "f32", "BF 16"]
ODD_VALUES = st.one_of(st.none(), st.booleans(), st.floats(allow_nan=True), st.text(max_size=4),
                       st.integers(-2**70, 2**70))


class Outcomes(Counter):
    """How many inputs were accepted, and how many were refused with which message (first words)."""

    def refused(self, exc: MergeError) -> None:
        self["refused: " + " ".join(exc.what.split()[:4])] += 1


# ---------------------------------------------------------------- safetensors header

@st.composite
def header_files(draw) -> bytes:
    """A safetensors file: a plausible header (often valid, often subtly wrong) and a data block."""
    entries: dict[str, Any] = {}
    offset = 0
    for i in range(draw(st.integers(0, 5))):
        code = draw(st.sampled_from(DTYPES))
        shape = draw(st.lists(st.integers(0, 6), max_size=3)) if draw(st.integers(0, 9)) else \
            draw(st.lists(ODD_VALUES, max_size=3))
        plain = all(type(d) is int and 0 <= d <= 6 for d in shape)
        size = math.prod(shape) * (itemsize(SAFETENSORS_TO_TORCH[code]) if code in SAFETENSORS_TO_TORCH else 1) \
            if plain else 0
        begin, end = offset, offset + size
        if not draw(st.integers(0, 4)):   # damage the offsets now and then
            begin, end = draw(st.integers(-2, 300)), draw(st.integers(-2, 300))
        entry: dict[str, Any] = {"dtype": code, "shape": shape, "data_offsets": [begin, end]}
        if not draw(st.integers(0, 9)):
            entry = draw(st.sampled_from([{}, [], "x", {**entry, "extra": 1}, {"dtype": code}]))
        entries[draw(st.text(max_size=6)) + str(i)] = entry
        offset = max(offset, end if isinstance(end, int) else offset)
    if draw(st.booleans()):
        entries["__metadata__"] = draw(st.one_of(st.just({"format": "pt"}), ODD_VALUES))
    text = json.dumps(entries).encode()
    if not draw(st.integers(0, 6)):
        text = draw(st.sampled_from([b"[" * 50_000, b"{", b"\xff\xfe", b"null", b"[]", text[: len(text) // 2]]))
    data = b"\0" * max(0, offset + draw(st.integers(-4, 4)))
    length = len(text) if draw(st.integers(0, 5)) else draw(st.integers(0, 2**64 - 1))
    return struct.pack("<Q", length) + text + data


def mutated(data: bytes, edits: list[tuple[int, int]], cut: int) -> bytes:
    """``data`` with some bytes replaced and possibly cut short: raw corruption of a valid file."""
    raw = bytearray(data)
    for position, value in edits:
        if raw:
            raw[position % len(raw)] = value
    return bytes(raw[:cut]) if 0 <= cut < len(raw) else bytes(raw)


def check_header(data: bytes, outcomes: Outcomes) -> None:
    """read_header on ``data``: our error, or tensors that tile the file's data block exactly."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.safetensors")
        with open(path, "wb") as f:
            f.write(data)
        try:
            tensors, metadata = read_header(path)
        except MergeError as exc:
            outcomes.refused(exc)
            return
    (length,) = struct.unpack("<Q", data[:8])
    end = 8 + length
    for info in sorted(tensors.values(), key=lambda t: (t.start, t.nbytes)):
        assert info.start == end and info.nbytes == math.prod(info.shape) * itemsize(info.dtype), info
        end += info.nbytes
    assert end == len(data) and isinstance(metadata, dict)
    outcomes["accepted"] += 1


# ---------------------------------------------------------------- shard index

SHARD_NAMES = st.one_of(
    st.sampled_from(["a.safetensors", "b.safetensors", "../a.safetensors", "/etc/hostname", "sub/../a.safetensors",
                     "link.safetensors", "missing.safetensors", "", ".", "a.safetensors\0", "..\\a.safetensors",
                     "dir/a.safetensors"]),
    st.text(max_size=12))


@st.composite
def indexes(draw) -> tuple[Any, bool]:
    """(the index JSON value, whether the folder also has a link that leaves it)."""
    weight_map = draw(st.dictionaries(st.sampled_from(["w0", "w1", "w2", "ghost"]), SHARD_NAMES, max_size=4))
    index: Any = {"weight_map": weight_map, "metadata": {"total_size": 0}}
    if not draw(st.integers(0, 6)):
        index = draw(st.one_of(ODD_VALUES, st.just({"weight_map": [1]}), st.just([index])))
    return index, draw(st.booleans())


def _tiny_file(names: list[str]) -> bytes:
    header = {name: {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]} for i, name in enumerate(names)}
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + b"\0" * (4 * len(names))


def check_index(index: Any, link: bool, outcomes: Outcomes) -> None:
    """open_checkpoint on a folder with ``index``: our error, or every tensor read from a file inside it."""
    with tempfile.TemporaryDirectory() as root:
        folder = os.path.join(root, "model")
        os.makedirs(os.path.join(folder, "dir"))
        outside = os.path.join(root, "a.safetensors")
        for path, names in ((os.path.join(folder, "a.safetensors"), ["w0", "w1"]),
                            (os.path.join(folder, "b.safetensors"), ["w2"]),
                            (os.path.join(folder, "dir", "a.safetensors"), ["w0"]), (outside, ["w0", "w1", "w2"])):
            with open(path, "wb") as f:
                f.write(_tiny_file(names))
        os.symlink(outside if link else os.path.join(folder, "b.safetensors"), os.path.join(folder, "link.safetensors"))
        with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
            f.write(json.dumps(index))
        try:
            checkpoint = open_checkpoint(folder)
        except MergeError as exc:
            outcomes.refused(exc)
            return
        real = os.path.realpath(folder)
        for info in checkpoint.tensors.values():
            assert os.path.commonpath([os.path.realpath(info.path), real]) == real, info.path
            assert checkpoint.read(info.name).numel() == math.prod(info.shape)
        checkpoint.close()
    outcomes["accepted"] += 1


# ---------------------------------------------------------------- spec YAML

YAML_PIECES = st.sampled_from([
    "merge_method: linear\n", "models:\n", "  - model: ./m\n", "    parameters: {weight: 0.5}\n", "&a [1, 2]", "*a",
    "!!python/object/apply:os.system ['true']", "!!binary aGk=", "!!set {a, b}", "!!timestamp 2001-12-14",
    "- ", "[", "]", "{", "}", ": ", "\n", "  ", "\t", "'", '"', "#", "---\n", "...\n", "? ", "|\n", "%YAML 1.1\n",
    "parameters: ", "weight: ", ".nan", ".inf", "1e999", "-0", "~", "slices:\n", "  - sources:\n",
    "layer_range: [0, 2]",
    "dtype: ", "bfloat16", "name: ", "<<: *a", "&b {x: *b}", "\u0000", "\ufeff", "é"])


SOUND_SPEC = "merge_method: linear\nmodels:\n  - model: ./m\n    parameters: {weight: 0.5}\n"
YAML_TEXTS = st.one_of(st.lists(YAML_PIECES, max_size=12).map("".join),
                       st.lists(YAML_PIECES, max_size=4).map(lambda pieces: SOUND_SPEC + "".join(pieces)))


def check_yaml(text: str, outcomes: Outcomes) -> None:
    """load_spec on ``text``: a SpecError, or a Spec (which later steps check further)."""
    try:
        load_spec(text if "\n" in text else text + "\n")
    except SpecError as exc:
        outcomes.refused(exc)
        return
    outcomes["accepted"] += 1
