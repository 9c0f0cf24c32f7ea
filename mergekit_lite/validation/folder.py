"""An output folder as a loader would see it, read leniently: every problem becomes a finding, not an error.

The strict reader (``checkpoint.open_checkpoint``) stops at the first problem, which is right for an input.
A validation should list every problem of an output at once and still check the tensors it can reach, so
it parses each shard header with the same strict ``read_header`` but collects what it finds.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional

from ..errors import ModelError
from ..safetensors_format import TensorInfo, read_header
from ..sources.checkpoint import INDEX_FILE, PICKLE_SUFFIXES, SINGLE_FILE, read_config
from ..sources.user_files import INDEX_LIMIT, parse_json_file
from .report import Finding


@dataclass
class OutputFolder:
    path: str                                       # absolute
    shards: dict[str, dict[str, TensorInfo]]        # readable shard file name -> its tensors
    tensors: dict[str, TensorInfo]                  # what a loader sees: name -> where its bytes are
    config: dict[str, Any]
    findings: list[Finding] = field(default_factory=list)
    indexed: bool = False                           # the folder has a shard index
    pickles: list[str] = field(default_factory=list)   # pickle weight files, when there are no safetensors ones

    @property
    def pickle_only(self) -> bool:
        """The weights are pickle files only: validation reads safetensors, and loading a pickle can run code."""
        return bool(self.pickles)

    def stored(self) -> list[TensorInfo]:
        """Every tensor in every readable shard, listed in the index or not (some loaders read whole files)."""
        return [info for held in self.shards.values() for info in held.values()]

    @property
    def total_bytes(self) -> int:
        return sum(info.nbytes for info in self.tensors.values())

    def file_of(self, info: TensorInfo) -> str:
        return os.path.basename(info.path)


def read_output(path: str) -> OutputFolder:
    """Read the headers, index and config of an output folder. Raises ModelError only if it is no folder."""
    folder = os.path.abspath(path)
    if not os.path.isdir(folder):
        what = "is a file, not a model folder" if os.path.exists(folder) else "output folder not found"
        raise ModelError(what, file=path, hint="give the folder `merge run` wrote (it holds config.json)")
    findings: list[Finding] = []
    present = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
    shards: dict[str, dict[str, TensorInfo]] = {}
    for name in present:
        try:
            shards[name], _ = read_header(os.path.join(folder, name))
        except ModelError as exc:
            findings.append(Finding(_what(exc), tensor=_tensor_of(exc), file=name))
    index_path = os.path.join(folder, INDEX_FILE)
    indexed = os.path.exists(index_path)
    # Pickle weights alone are no finding: a plain model folder may hold them (structure says what it read).
    pickles = [] if present or indexed else sorted(n for n in os.listdir(folder) if n.endswith(PICKLE_SUFFIXES))
    if indexed:
        tensors = _from_index(index_path, present, shards, findings)
    elif pickles:
        tensors = {}
    else:
        tensors = _single_file(present, shards, findings)
    config = _read_config(folder, findings)
    return OutputFolder(folder, shards, tensors, config, findings, indexed=indexed, pickles=pickles)


def _from_index(index_path: str, present: list[str], shards: dict[str, dict[str, TensorInfo]],
                findings: list[Finding]) -> dict[str, TensorInfo]:
    weight_map, total_size, duplicates = _read_index(index_path, findings)
    for name in duplicates:
        findings.append(Finding("is listed twice in the index", tensor=name, file=INDEX_FILE))
    tensors: dict[str, TensorInfo] = {}
    missing_files: set[str] = set()
    for name, shard in weight_map.items():
        if shard in shards:
            if name in shards[shard]:
                tensors[name] = shards[shard][name]
            else:
                holders = [s for s, held in shards.items() if name in held]
                where = f" (it is in {', '.join(holders)})" if holders else ""
                findings.append(Finding(f"the index puts it in {shard}, which does not hold it{where}", tensor=name,
                                        file=INDEX_FILE))
        elif shard not in present and shard not in missing_files:
            missing_files.add(shard)
            plain = os.path.basename(shard) == shard
            findings.append(Finding(f"the index names shard '{shard}', which " +
                                    ("does not exist" if plain else "is not a file in this folder"),
                                    file=INDEX_FILE))
    listed = set(weight_map.values())
    for shard, held in shards.items():
        if shard not in listed:
            findings.append(Finding(f"is beside {INDEX_FILE}, which does not list it: transformers loads it "
                                    "instead of the index, other loaders the index's shards" if shard == SINGLE_FILE
                                    else "is not listed in the index, so loaders ignore it", file=shard))
            continue
        for name in held:
            if weight_map.get(name) != shard:
                what = (f"is also stored here, but the index puts it in {weight_map[name]}" if name in weight_map
                        else "is stored here but missing from the index")
                findings.append(Finding(what, tensor=name, file=shard))
    actual = sum(info.nbytes for info in tensors.values())
    if total_size is not None and total_size != actual:
        findings.append(Finding(f"metadata.total_size is {total_size} but the indexed tensors hold {actual} bytes",
                                file=INDEX_FILE))
    return tensors


def _read_index(path: str, findings: list[Finding]) -> tuple[dict[str, str], Optional[int], list[str]]:
    duplicates: list[str] = []

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for key, value in items:
            if key in seen:
                duplicates.append(key)
            seen[key] = value
        return seen

    try:
        index = parse_json_file(path, limit=INDEX_LIMIT, object_pairs_hook=pairs)   # bounded, regular file only
    except (OSError, ValueError) as exc:
        findings.append(Finding(f"cannot read the index: {getattr(exc, 'strerror', None) or exc}", file=INDEX_FILE))
        return {}, None, []
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        findings.append(Finding("the index has no weight_map of tensor name -> shard file", file=INDEX_FILE))
        return {}, None, []
    metadata = index.get("metadata")
    total = metadata.get("total_size") if isinstance(metadata, dict) else None
    return weight_map, total if isinstance(total, int) else None, [d for d in duplicates if d in weight_map]


def _single_file(present: list[str], shards: dict[str, dict[str, TensorInfo]],
                 findings: list[Finding]) -> dict[str, TensorInfo]:
    if SINGLE_FILE not in present:
        findings.append(Finding(f"no {SINGLE_FILE} and no {INDEX_FILE}: the folder holds no loadable weights"
                                + (f" (found {', '.join(present[:3])})" if present else "")))
        return {}
    for stray in present:
        if stray != SINGLE_FILE:
            findings.append(Finding(f"is not read by loaders: without an index only {SINGLE_FILE} is", file=stray))
    return dict(shards.get(SINGLE_FILE, {}))


def _read_config(folder: str, findings: list[Finding]) -> dict[str, Any]:
    try:
        return read_config(folder)
    except ModelError as exc:
        findings.append(Finding(exc.what, file="config.json"))
        return {}


def _what(exc: ModelError) -> str:
    return exc.what + (f" ({exc.hint})" if exc.hint else "")


def _tensor_of(exc: ModelError) -> Optional[str]:
    where = exc.where or ""
    return where[len("tensor '"):-1] if where.startswith("tensor '") and where.endswith("'") else None
