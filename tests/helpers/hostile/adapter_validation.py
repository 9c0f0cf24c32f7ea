"""Hostile inputs: `merge validate` on adapter folders (made by `merge extract`) that were damaged afterwards.
The report goes to stdout; the exit code says FAILED (1) or NOT CHECKED (3), and nothing is written."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .catalogue import Models, Scenario, case

GROUP = "lora extract"


def _extracted(tmp: Path, models: Models) -> Path:
    from mergekit_lite.api.extract import extract_lora

    extract_lora(models.a, models.b, tmp / "adapter", max_rank=4, validate=False)
    return tmp / "adapter"


@case(GROUP)
def validate_adapter_with_a_corrupt_record(tmp: Path, models: Models) -> Scenario:
    adapter = _extracted(tmp, models)
    (adapter / "adapter_record.json").write_text("{ not json")
    return Scenario(["validate", str(adapter), "-q"], 1, "")


@case(GROUP)
def validate_adapter_whose_base_is_gone(tmp: Path, models: Models) -> Scenario:
    adapter = _extracted(tmp, models)
    record = json.loads((adapter / "adapter_record.json").read_text())
    os.remove(adapter / "adapter_record.json")
    (adapter / "adapter_record.json").write_text(json.dumps({**record, "base_model": str(tmp / "gone")}))
    return Scenario(["validate", str(adapter), "-q"], 3, "")


@case(GROUP)
def validate_adapter_with_a_truncated_file(tmp: Path, models: Models) -> Scenario:
    adapter = _extracted(tmp, models)
    weights = adapter / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    return Scenario(["validate", str(adapter), "-q"], 1, "")
