"""One input model on disk: its tensors (from safetensors headers), its config, and reading tensor bytes.

Opening a checkpoint reads only headers and JSON; tensor data is read on demand, one tensor at a time,
with positional reads into a fresh buffer. Nothing is memory-mapped, so resident memory holds only the
tensors in flight.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from ..errors import ModelError
from ..safetensors_format import TensorInfo, read_header, read_into, refuse_duplicates
from .user_files import INDEX_LIMIT, NestedTooDeeply, parse_json_file, read_json_object

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
ADVICE = 128 << 10   # bytes per WILLNEED call (Checkpoint.will_read): the smallest common readahead window


@dataclass
class Checkpoint:
    label: str                      # the reference as the spec wrote it, for messages
    folder: str                     # absolute local folder
    tensors: dict[str, TensorInfo]
    config: dict[str, Any]
    warnings: list[str] = field(default_factory=list)     # about this input, for the merge's warnings
    card_notes: list[str] = field(default_factory=list)   # facts the output's model card should state
    commit: Optional[str] = None    # the Hub commit the files came from (None for a local folder)
    _fds: dict[str, int] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def folders(self) -> tuple[str, ...]:
        """Every folder this input reads (an output inside any of them is refused)."""
        return (self.folder,)

    def read(self, name: str, rows: Optional[tuple[int, int]] = None, out: Optional[torch.Tensor] = None
             ) -> torch.Tensor:
        """Read one tensor (or the block of its rows [start, end)) into a new CPU tensor of its stored dtype, or
        into ``out`` (a CPU uint8 tensor of at least its bytes, reused by a caller that reads many tensors in
        turn: a fresh buffer costs a page fault per 4 KiB), returning a view of ``out``."""
        info = self.tensors[name]
        shape, start, nbytes = info.span(rows)
        buffer = torch.empty(nbytes, dtype=torch.uint8) if out is None else out.view(-1)[:nbytes]
        if nbytes:
            try:
                read_into(self._fd(info.path), start, memoryview(buffer.numpy()))
            except (OSError, EOFError) as exc:
                raise ModelError(f"cannot read tensor '{name}': {exc}", file=info.path,
                                 hint="the file changed or was truncated after the merge started") from None
        return buffer.view(info.dtype).reshape(shape)

    def will_read(self, name: str, rows: Optional[tuple[int, int]] = None) -> None:
        """Tell the kernel this tensor (or the block of its rows) is read soon (posix_fadvise WILLNEED): it reads
        the bytes into the page cache in the background, many reads in flight, with no thread or memory of ours.
        One call reads at most the device's readahead window (``read_ahead_kb``, 128 KiB on many machines), so
        the range is advised in pieces of ``ADVICE``; on pages already cached a call costs next to nothing (2 GB
        in 30 ms). A hint only: where the call does not exist or fails, nothing changes."""
        advise = getattr(os, "posix_fadvise", None)
        info = self.tensors.get(name)
        if advise is None or info is None or not info.nbytes:
            return
        _, start, nbytes = info.span(rows)
        try:
            fd = self._fd(info.path)
            for offset in range(start, start + nbytes, ADVICE):
                advise(fd, offset, min(ADVICE, start + nbytes - offset), os.POSIX_FADV_WILLNEED)
        except OSError:
            return

    def _fd(self, path: str) -> int:
        with self._lock:
            if path not in self._fds:
                self._fds[path] = os.open(path, os.O_RDONLY)
            return self._fds[path]

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (for Ray workers) without its open descriptors, which are reopened on the first read."""
        state = {k: v for k, v in self.__dict__.items() if k != "_lock"}
        state["_fds"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __del__(self) -> None:  # descriptors are a finite resource in long notebook sessions
        try:
            self.close()
        except Exception:
            pass


def read_index(index_path: str) -> dict[str, str]:
    """The weight_map of a shard index (safetensors or pickle): tensor name -> shard file name, as written."""
    unique = refuse_duplicates(lambda key: ModelError(f"the index lists '{key}' twice", file=index_path,
                                                      hint="the index is corrupt; download it again"))
    try:
        index = parse_json_file(index_path, limit=INDEX_LIMIT, object_pairs_hook=unique)
    except OSError as exc:
        raise ModelError(f"cannot read the shard index: {exc.strerror or exc}", file=index_path,
                         hint="the index must be a regular file; download it again") from None
    except ValueError as exc:
        why = "nested too deeply" if isinstance(exc, NestedTooDeeply) else str(exc)
        raise ModelError(f"the shard index is not valid JSON ({why})", file=index_path,
                         hint="the index is corrupt; download it again") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ModelError("the index has no weight_map of tensor name -> shard file", file=index_path,
                         hint="the index is corrupt; download it again")
    return weight_map


def read_sharded(folder: str, index_path: str, label: Optional[str] = None) -> dict[str, TensorInfo]:
    by_shard: dict[str, list[str]] = {}
    for name, shard in read_index(index_path).items():
        by_shard.setdefault(shard, []).append(name)
    refuse_two_layouts(folder, label or folder, SINGLE_FILE, INDEX_FILE, set(by_shard))
    tensors: dict[str, TensorInfo] = {}
    for shard, names in by_shard.items():
        path = shard_path(folder, shard, index_path)
        found, _ = read_header(path)
        for name in names:
            if name not in found:
                raise ModelError(f"the index lists tensor '{name}' in {shard}, but that shard does not have it",
                                 file=index_path, hint="the index and shards are from different versions")
            tensors[name] = found[name]
        extra = sorted(set(found) - set(names))
        if extra:
            raise ModelError(f"shard {shard} holds tensor '{extra[0]}' that the index does not list",
                             file=index_path, hint="the index and shards are from different versions")
    return tensors


def shard_path(folder: str, shard: str, index_path: str) -> str:
    """Resolve a shard name, refusing anything that leaves the model folder (path traversal)."""
    if "\0" in shard or not shard.strip():
        raise ModelError(f"shard name {shard!r} is not a file name", file=index_path,
                         hint="the index is corrupt; download it again")
    if os.path.isabs(shard) or ".." in shard.replace("\\", "/").split("/"):
        raise ModelError(f"shard name '{shard}' points outside the model folder", file=index_path,
                         hint="refusing it: shard names must be plain file names inside the folder")
    path = os.path.join(folder, shard)
    if not _stays_inside(folder, path):
        raise ModelError(f"shard '{shard}' is a link that leaves the model folder", file=index_path,
                         hint="refusing it: copy the real file into the folder")
    if not os.path.isfile(path):
        raise ModelError(f"the index names shard '{shard}', which does not exist", file=index_path,
                         hint="the download is incomplete; download the missing shard again")
    return path


def contained_path(folder: str, name: str, label: str) -> str:
    """``folder/name``, refusing a symlink that leads out of the model folder (a crafted folder could make a
    merge read, and copy into its output, any file the user can read)."""
    path = os.path.join(folder, name)
    if not _stays_inside(folder, path):
        raise ModelError(f"{name} is a link that leaves the model folder", file=label,
                         hint="refusing it: copy the real file into the folder")
    return path


def _stays_inside(folder: str, path: str) -> bool:
    """Whether ``path``, links resolved, is inside the folder's link root (see _link_root)."""
    root = _link_root(folder)
    return os.path.commonpath([os.path.realpath(path), root]) == root


def _link_root(folder: str) -> str:
    """Where a model folder's links may lead: the folder itself, or for a snapshot in the Hugging Face cache
    (``models--org--name/snapshots/<commit>/``, whose files link to ``../../blobs/``) that repo's cache folder."""
    real = os.path.realpath(folder)
    parent = os.path.dirname(real)
    if os.path.basename(parent) == "snapshots" and os.path.basename(os.path.dirname(parent)).startswith("models--"):
        return os.path.dirname(parent)
    return real


def refuse_two_layouts(folder: str, label: str, single: str, index: str, shards: set[str]) -> None:
    """A folder with an index whose shards are not just ``single`` must not also hold ``single``.

    transformers' from_pretrained loads ``single`` (model.safetensors, pytorch_model.bin) whenever it is a file,
    and reads the index only without it; other tools (vLLM, mergekit, an index-first reader) take the index's
    shards. With both, which weights are the model is not clear, so neither is guessed."""
    if shards != {single} and os.path.isfile(os.path.join(folder, single)):
        listed = ", ".join(sorted(shards)[:3]) + (", ..." if len(shards) > 3 else "")
        raise ModelError(f"the folder holds both {single} and {index} (shards {listed}): transformers loads "
                         f"{single}, other tools the index's shards, so which weights are meant is unclear",
                         file=label, hint=f"move away what is not the model: {single}, or {index} with its shards")


def pickle_weights(folder: str) -> bool:
    return any(name.endswith(PICKLE_SUFFIXES) for name in os.listdir(folder))


def no_weights_error(folder: str, label: str) -> ModelError:
    names = sorted(os.listdir(folder))
    if "adapter_config.json" in names:
        return ModelError("this is a PEFT adapter folder, not a model", file=label,
                          hint="fold it into its base: write the model as base+adapter (e.g. ./base+./adapter)")
    pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
    if pickles:
        return ModelError(f"only pickle checkpoints found ({', '.join(pickles[:3])}); they are refused because "
                          "loading a pickle can run arbitrary code", file=label,
                          hint="use a safetensors version of the model, or, if you trust its source, pass "
                               "--allow-pickle "
                               "(loads tensors only, with torch.load(weights_only=True), which refuses code)")
    others = [n for n in names if n.endswith(".safetensors")]
    if others:
        return ModelError(f"no {SINGLE_FILE} or {INDEX_FILE}; found {', '.join(others[:3])}", file=label,
                          hint=f"rename a single file to {SINGLE_FILE}, or add an {INDEX_FILE} for shards")
    return ModelError(f"no {SINGLE_FILE} or {INDEX_FILE} in the folder", file=label,
                      hint="give the folder that holds the model's safetensors files")


def read_config(folder: str) -> dict[str, Any]:
    path = os.path.join(folder, "config.json")
    if not os.path.exists(path):
        return {}
    contained_path(folder, "config.json", folder)
    return read_json_object(path, "config.json", path, "the file is corrupt; download it again")

