"""The specs whose outputs validation must pass, shared by the validation tests, and the device parameter.

To cover a new merge kind (TIES, layer stacking, a LoRA fold, ...), add one entry to PASSING: an id, the
conftest fixture that builds its input models, and the spec with ``{root}`` standing for that fixture's
folder. test_validate.py::test_passes_on_correct_outputs then merges it and validates the output on
every device, with the forward pass.
"""

from __future__ import annotations

import pytest
import torch

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                reason="no CUDA device"))]

LINEAR = """
merge_method: linear
models:
  - model: {root}/ft-a
    parameters: {{weight: 0.3}}
  - model: {root}/ft-b
    parameters: {{weight: [0.2, 0.9]}}
  - model: {root}/ft-c
    parameters:
      weight:
        - filter: mlp
          value: 0.5
        - value: 0.25
"""

TASK_ARITHMETIC = """
merge_method: task_arithmetic
base_model: {root}/base
models:
  - model: {root}/ft-a
    parameters: {{weight: 0.7}}
  - model: {root}/ft-b
    parameters: {{weight: [1.0, 0.2]}}
parameters: {{lambda: 0.9}}
"""

# id -> (fixture building the input models, spec template, extra run_merge arguments)
PASSING: dict[str, tuple[str, str, dict]] = {
    "linear_f32": ("models_f32", LINEAR, {}),
    "linear_bf16": ("models_bf16", LINEAR, {}),
    "linear_tied": ("models_tied", LINEAR, {}),
    "task_arithmetic_f32": ("models_f32", TASK_ARITHMETIC, {}),
    "task_arithmetic_bf16_in_f32": ("models_bf16", TASK_ARITHMETIC + "dtype: float32\nout_dtype: bfloat16\n", {}),
    "task_arithmetic_out_f16_seed": ("models_f32", TASK_ARITHMETIC, {"out_dtype": "float16", "seed": 3}),
    # The lead adds here: "ties": ("models_f32", TIES, {}), "stacking": (...), "lora_fold": (...)
}
