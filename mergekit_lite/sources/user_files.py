"""The files of a user's folder other than tensor data: JSON that a merge parses, and companions it copies.

A model folder is untrusted input like a checkpoint. A FIFO named ``config.json`` would hang a run forever,
and a character device would be read until memory runs out. So every such file goes through here: it must
be a regular file (checked on the open descriptor, without blocking: safetensors_format.open_regular), it is
read up to a limit chosen for its kind, and its JSON may not hold integers of thousands of digits (Python's
int() is quadratic there) or nest deeper than the parser goes. Every failure is an OSError or a ValueError
with a message fit for a user (``parse_json_file``), or a ModelError naming the file (``read_json_object``).

A key written twice in a JSON object is refused (``unique=True``) where the readers of the file would
disagree about it: shard indexes (a tensor listed twice) and safetensors headers. Elsewhere (config.json,
adapter_config.json) the last value wins, as in transformers and peft, which read them with ``json.load``.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Optional

from ..errors import ModelError
from ..safetensors_format import bounded_int, open_regular, read_regular, refuse_duplicates

# Limits per kind of file, each far above the largest real one, so that only a wrong or hostile file hits them.
CONFIG_LIMIT = 16 << 20     # config.json, adapter_config.json, run settings: a few KB (a few hundred KB at most,
                            # for multimodal configs with label maps)
INDEX_LIMIT = 64 << 20      # shard indexes: ~100 bytes a tensor; the largest real ones (1T-parameter MoE models,
                            # ~150k tensors) are ~15 MB
COPY_LIMIT = 256 << 20      # companions copied as they are, read whole: the largest tokenizer.json files (Gemma's)
                            # are ~35 MB, so this only stops a stray or runaway file
TEXT_LIMIT = 16 << 20       # other small text files read whole


class NestedTooDeeply(ValueError):
    """JSON nested deeper than the parser's recursion goes."""


def read_text_file(path: str, limit: int = TEXT_LIMIT, *, follow_links: bool = True) -> str:
    """The UTF-8 text of a regular file of at most ``limit`` bytes; OSError or ValueError (UnicodeDecodeError)."""
    return read_regular(path, limit, follow_links=follow_links).decode("utf-8")


def parse_json_file(path: str, *, limit: int = CONFIG_LIMIT, follow_links: bool = True,
                    object_pairs_hook: Optional[Callable[[list], Any]] = None) -> Any:
    """The JSON value in ``path``. Raises OSError (cannot be opened, not a regular file, larger than ``limit``)
    or ValueError (not UTF-8, not JSON, nested too deeply, an integer too long); each says what in plain words."""
    text = read_text_file(path, limit, follow_links=follow_links)
    try:
        return json.loads(text, object_pairs_hook=object_pairs_hook, parse_int=bounded_int)
    except RecursionError:
        raise NestedTooDeeply("it is nested too deeply") from None


def read_json_object(path: str, name: str, blame: str, hint: str, nested: str = "nested too deeply", *,
                     limit: int = CONFIG_LIMIT, unique: bool = False) -> dict[str, Any]:
    """The JSON object in ``path`` (called ``name`` in messages), or a ModelError naming ``blame``: the file
    cannot be read, is not a regular file or too large, is not JSON, nests deeper than the parser goes
    (``nested`` says so), holds a key twice (with ``unique``), or is not an object."""
    hook = refuse_duplicates(lambda key: ModelError(f"{name} has the key '{key}' twice", file=blame, hint=hint)) \
        if unique else None
    try:
        data = parse_json_file(path, limit=limit, object_pairs_hook=hook)
    except OSError as exc:
        raise ModelError(f"cannot read {name}: {exc.strerror or exc}", file=blame, hint=hint) from None
    except ValueError as exc:
        why = nested if isinstance(exc, NestedTooDeeply) else exc
        raise ModelError(f"cannot read {name}: {why}", file=blame, hint=hint) from None
    if not isinstance(data, dict):
        raise ModelError(f"{name} is not a JSON object", file=blame)
    return data


def check_copyable(path: str, label: str, limit: int = COPY_LIMIT) -> None:
    """Refuse, before a merge starts, a companion file it would copy (tokenizer files, generation_config.json)
    that is not a regular file or is larger than ``limit``: copying a FIFO would hang at the very end of a merge,
    copying a device would never end."""
    try:
        with os.fdopen(open_regular(path), "rb") as f:
            size = os.fstat(f.fileno()).st_size
    except OSError as exc:
        raise ModelError(f"cannot copy {os.path.basename(path)}: {exc.strerror or exc}", file=label,
                         hint="it must be a regular file; download the model's files again") from None
    if size > limit:
        raise ModelError(f"cannot copy {os.path.basename(path)}: it is {size:,} bytes, more than the {limit:,} "
                         "allowed", file=label, hint="a tokenizer file is at most tens of MB; check that file")


def read_copyable(path: str, limit: int = COPY_LIMIT) -> bytes:
    """The bytes of a companion file to copy (checked by check_copyable before the merge); OSError otherwise."""
    return read_regular(path, limit)
