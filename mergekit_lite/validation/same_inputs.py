"""Whether a merge's input models hold the same weights, decided from their files without running them.

The forward check compares the merged model with an input only when the merge must compute what that input
computes: a method that gives back its input on identical inputs, applied to identical inputs. Running every
input to find out costs a forward pass per input; the weights say the same thing from the files: the same
folder (one file identity), or the same tensor table (names, dtypes, shapes) and the same bytes. Bytes are
compared first on a small slice of every tensor (models that differ almost always differ there), and only
when every slice agrees in full, in bounded chunks, stopping at the first difference. Identical weights run
identical logits, so one of them is the reference.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

from ..safetensors_format import same_bytes
from .stream import CHUNK_BYTES, TensorReader

SLICE_BYTES = 64 << 10   # compared first, from every tensor


def same_weights(folders: Sequence[str]) -> Optional[bool]:
    """True: every folder holds the same tensors, bit for bit; False: they differ; None: cannot tell from the
    files (pickle weights, unreadable files)."""
    if len({os.path.realpath(folder) for folder in folders}) <= 1:
        return True
    from ..errors import MergeError
    from ..sources.opener import open_checkpoint

    try:
        tables = []
        for folder in folders:
            checkpoint = open_checkpoint(folder)
            checkpoint.close()
            tables.append(checkpoint.tensors)
    except MergeError:
        return None
    first = tables[0]
    if any(_layout(table) != _layout(first) for table in tables[1:]):
        return False
    infos = [[table[name] for table in tables] for name in sorted(first)]
    if any(getattr(info, "path", None) is None for row in infos for info in row):
        return None   # not safetensors: no bytes to compare
    try:
        with TensorReader() as reader:
            return _same_bytes(reader, infos, SLICE_BYTES) and _same_bytes(reader, infos, None)
    except MergeError:
        return None


def _layout(table: dict) -> dict:
    return {name: (info.dtype, tuple(info.shape)) for name, info in table.items()}


def _same_bytes(reader: TensorReader, infos: list, limit: Optional[int]) -> bool:
    """Each tensor's bytes (its first ``limit`` bytes only) equal across the models; stops at the first difference."""
    for row in infos:
        chunks = [reader.chunks(info, limit or CHUNK_BYTES) for info in row]
        for parts in zip(*chunks):
            if any(not same_bytes(parts[0][1], part) for _, part in parts[1:]):
                return False
            if limit is not None:
                break
    return True
