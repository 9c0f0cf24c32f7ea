"""A mergekit user's habits on the command line: card flags without a push, sizes that read like
parameter counts on `merge fold`, a model's own code validated without the code. Each is refused with what to
do, before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

from .catalogue import Models, Scenario, case, linear_spec, run

GROUP = "mergekit habits"


@case(GROUP)
def license_without_push(tmp: Path, models: Models) -> Scenario:
    spec = linear_spec(tmp, models.a, models.b)
    return Scenario(run(tmp, spec, "--license", "mit"), 2,
                    "error: --license: --license only applies with --push-to-hub\nHint: add --push-to-hub ORG/NAME, "
                    "or `merge push OUT --repo ORG/NAME` with it later\n", out=tmp / "out")


@case(GROUP)
def base_model_that_is_a_path(tmp: Path, models: Models) -> Scenario:
    spec = linear_spec(tmp, models.a, models.b)
    return Scenario(run(tmp, spec, "--push-to-hub", "user/x", "--base-model", str(models.a)), 2,
                    f"error: --base-model: '{models.a}' is not a Hub repo id\nHint: write namespace/name (your user "
                    "name or an organization, then the model's name)\n", out=tmp / "out")


@case(GROUP)
def fold_shard_size_in_parameters(tmp: Path, models: Models) -> Scenario:
    return Scenario(["fold", str(models.a), str(tmp / "adapter"), "-o", str(tmp / "out"), "--max-shard-size", "2B"],
                    2, "error: --max-shard-size: '2B' is 2 bytes, which reads like mergekit's parameter count\n"
                       "Hint: --max-shard-size takes bytes: write 2GB, or use mergekit's --out-shard-size 2B\n",
                    out=tmp / "out")


@case(GROUP)
def validate_own_code_that_is_missing(tmp: Path, models: Models) -> Scenario:
    """auto_map names code that is not in the folder: --trust-remote-code cannot run it; NOT CHECKED (exit 3)."""
    folder = models.copy(models.a, tmp / "coded")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    return Scenario(["validate", str(folder), "--device", "cpu", "--trust-remote-code", "--quiet"], 3, "",
                    preserved=(folder,))
