"""The catalogue of hostile and broken inputs: each case builds its input, runs `merge ...`, and expects one
exact error and exit code. tests/test_hostile_inputs.py runs every case through click's CliRunner;
scripts/hostile_report.py runs them as real processes and fills the README table.

A case that plants code (a pickle or a YAML tag that would write a file) names the file it would write, so
a runner can check that nothing ran. Every case starts from copies of tiny synthetic models, so the inputs
it damages are its own, and a runner can hash the shared inputs before and after.
"""

# Each subject module registers its cases, in this order.
from . import safetensors_files, shard_index, pickles, spec, models, lora, ownership, strict, validation, push, internal, moe, adapters, stages, extract, adapter_validation, mergekit_habits  # noqa: F401, I001
from .catalogue import (CASES, MODEL_FILE, Models, Scenario, build_models, hostile_pickle, leftover_problems,  # noqa: F401
                        linear_spec, snapshot)
