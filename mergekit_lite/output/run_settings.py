"""The settings of a `merge run` that the spec does not hold, written next to the spec as ``merge_run.json``.

``mergekit_config.yml`` is the spec as the user wrote it, but ``--dtype``, ``--out-dtype`` and ``--seed``
change the output too, and the device decides whether a recomputation can be bit-exact. Without them
``merge validate OUT`` could not rebuild what was written, and a DARE merge could not be reproduced.
``working_dir`` is the absolute folder the run was started in: the spec's relative model paths are relative
to it, so ``merge validate OUT`` resolves them as the run did from whatever folder it runs in.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Optional

import torch

from ..dtypes import dtype_name, parse_dtype
from ..errors import ModelError
from ..sources.checkpoint import read_json_object
from .folder import write_new

RUN_SETTINGS_FILE = "merge_run.json"
FIELDS = ("dtype", "out_dtype", "seed", "device", "tool", "version", "working_dir", "config_from", "stage")


@dataclass(frozen=True)
class RunSettings:
    dtype: Optional[str] = None        # --dtype (None: the spec's)
    out_dtype: Optional[str] = None    # --out-dtype (None: the spec's)
    seed: int = 0
    device: Optional[str] = None       # device type the arithmetic ran on ("cpu", "cuda"); None when unknown
    tool: str = "mergekit_lite"
    version: str = ""
    working_dir: Optional[str] = None  # absolute folder the run started in (None: not recorded, an older run)
    config_from: Optional[str] = None  # --config-from, as the YAML path of that model in the spec (plan/configs.py)
    stage: Optional[str] = None        # a stage of a multi-stage file: digest of its spec and inputs (api/stages.py)

    @property
    def torch_dtype(self) -> Optional[torch.dtype]:
        return parse_dtype(self.dtype) if self.dtype else None

    @property
    def torch_out_dtype(self) -> Optional[torch.dtype]:
        return parse_dtype(self.out_dtype) if self.out_dtype else None


def settings_for(dtype: Optional[torch.dtype], out_dtype: Optional[torch.dtype], seed: int,
                 device: torch.device, config_from: Optional[str] = None, stage: Optional[str] = None) -> RunSettings:
    from .. import __version__

    try:
        working_dir: Optional[str] = os.getcwd()
    except OSError:   # the current folder was deleted: relative paths could not have resolved either
        working_dir = None
    return RunSettings(dtype_name(dtype) if dtype else None, dtype_name(out_dtype) if out_dtype else None, seed,
                       device.type, version=__version__, working_dir=working_dir, config_from=config_from,
                       stage=stage)


def write_run_settings(folder: str, settings: RunSettings) -> None:
    write_new(os.path.join(folder, RUN_SETTINGS_FILE), (json.dumps(asdict(settings), indent=2) + "\n").encode(),
              replace=True)


def read_run_settings(folder: str) -> Optional[RunSettings]:
    """The recorded settings; None when the folder has none (e.g. a mergekit output). Raises ModelError when
    the file is there but unreadable, because guessing the settings could make a sound output look broken."""
    path = os.path.join(folder, RUN_SETTINGS_FILE)
    if not os.path.exists(path):
        return None
    hint = "the file is corrupt; restore it or delete it (defaults: the spec's dtypes, seed 0)"
    data = read_json_object(path, "the run settings", path, hint)
    try:
        settings = RunSettings(**{k: data[k] for k in FIELDS if k in data})
        if not isinstance(settings.seed, int) or isinstance(settings.seed, bool):
            raise ValueError(f"seed {settings.seed!r} is not an integer")
        if settings.working_dir is not None and not (isinstance(settings.working_dir, str)
                                                     and os.path.isabs(settings.working_dir)):
            raise ValueError(f"working_dir {settings.working_dir!r} is not an absolute path")
        if settings.config_from is not None and not isinstance(settings.config_from, str):
            raise ValueError(f"config_from {settings.config_from!r} is not a string")
        settings.torch_dtype, settings.torch_out_dtype  # noqa: B018 - unknown dtype names raise ValueError
        return settings
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise ModelError(f"cannot read the run settings: {exc}", file=path, hint=hint) from None
