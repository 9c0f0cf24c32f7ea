"""Hostile inputs to `merge validate`: a folder whose only weights are a pickle that runs code when loaded.

Validation reads safetensors; the forward check loads models with transformers, which would read the pickle.
Without --allow-pickle nothing is unpickled (the checks that need the weights are NOT CHECKED: exit 3); with
it, the file is read by torch.load(weights_only=True), which refuses the payload (forward FAILED: exit 1).
The report goes to stdout; stderr stays empty.
"""


from __future__ import annotations

import shutil
from pathlib import Path

from .catalogue import Models, Scenario, case, hostile_pickle


def _hostile_model(tmp: Path, models: Models) -> tuple[Path, Path]:
    marker, folder = tmp / "pwned", tmp / "pickled"
    hostile_pickle(folder, marker)
    shutil.copy(models.a / "config.json", folder / "config.json")
    return folder, marker


@case("pickle", "code")
def validate_does_not_unpickle_a_pickle_only_folder(tmp: Path, models: Models) -> Scenario:
    folder, marker = _hostile_model(tmp, models)
    return Scenario(["validate", str(folder), "--device", "cpu", "--quiet"], 3, "", marker=marker, preserved=(folder,))


@case("pickle", "code")
def validate_with_opt_in_refuses_a_pickle_with_code(tmp: Path, models: Models) -> Scenario:
    folder, marker = _hostile_model(tmp, models)
    return Scenario(["validate", str(folder), "--device", "cpu", "--allow-pickle", "--quiet"], 1, "", marker=marker,
                    preserved=(folder,))
