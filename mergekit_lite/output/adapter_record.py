"""What an adapter folder was made from, written next to it as ``adapter_record.json``.

`merge run` keeps its spec (``mergekit_config.yml``) and ``merge_run.json``, from which `merge validate` merges a
sample of tensors again. An adapter made by `merge extract` or `merge adapters` has no merge spec, so its
sources and settings are recorded here instead, for the same purpose (validation/adapter_recompute.py):

- ``{"command": "extract", "model", "base_model", "settings": {max_rank, sv_epsilon, distribute_scale, svd},
  "out_dtype", "device"}``: the fine-tune and base folders (absolute), the decomposition's settings;
- ``{"command": "adapters", "adapters": [folders], "labels": [as given], "combination": {...}, "seed",
  "check_base", "allow_pickle"}``: the input adapters' folders (absolute) and add_weighted_adapter's arguments.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

from ..errors import ModelError
from ..sources.user_files import read_json_object
from .folder import write_new

ADAPTER_RECORD = "adapter_record.json"
COMMANDS = ("extract", "adapters")


def write_adapter_record(folder: str, record: dict[str, Any]) -> None:
    from .. import __version__

    data = {"tool": "mergekit_lite", "version": __version__, **record}
    write_new(os.path.join(folder, ADAPTER_RECORD), (json.dumps(data, indent=2) + "\n").encode())


def read_adapter_record(folder: str) -> Optional[dict[str, Any]]:
    """The record, or None when the folder has none (an adapter made elsewhere). Raises ModelError when it is
    there but unreadable or names no command we know."""
    path = os.path.join(folder, ADAPTER_RECORD)
    if not os.path.lexists(path):
        return None
    data = read_json_object(path, "the adapter record", path, "the file is corrupt; delete it (recompute is then "
                                                              "not checked) or make the adapter again")
    if data.get("command") not in COMMANDS:
        raise ModelError(f"command {data.get('command')!r} is not one of {', '.join(COMMANDS)}", file=path,
                         hint="the file is corrupt; delete it or make the adapter again")
    return data
