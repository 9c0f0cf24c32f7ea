"""Names of tensor dtypes: in specs (``bfloat16``), in safetensors headers (``BF16``), and in torch."""

from __future__ import annotations

from functools import lru_cache

import torch

# safetensors header code -> torch dtype. Codes torch cannot represent are absent on purpose: a model
# using them gets a clear error instead of a silent reinterpretation of its bytes.
SAFETENSORS_TO_TORCH: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
# The float8 formats safetensors and torch share (F8_E8M0 is a block-scale format, not weights: absent).
FLOAT8_CODES = {"F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E4M3FNUZ": "float8_e4m3fnuz",
                "F8_E5M2FNUZ": "float8_e5m2fnuz"}
for _code, _name in (*FLOAT8_CODES.items(), ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _name):
        SAFETENSORS_TO_TORCH[_code] = getattr(torch, _name)
TORCH_TO_SAFETENSORS = {dtype: code for code, dtype in SAFETENSORS_TO_TORCH.items()}
# float8 tensors are read and computed in float32 (torch has almost no float8 arithmetic on the CPU) but never
# written: a merged tensor rounded back to float8 without the per-block scales fp8 checkpoints carry is not
# what any fp8 loader expects.
FLOAT8: frozenset[torch.dtype] = frozenset(SAFETENSORS_TO_TORCH[c] for c in FLOAT8_CODES if c in SAFETENSORS_TO_TORCH)

# Spec names, as mergekit accepts them (``torch.`` prefix allowed), plus the short forms people type.
SPEC_NAMES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float64": torch.float64, "fp64": torch.float64,
}


def parse_dtype(name: str) -> torch.dtype:
    """Spec dtype name -> torch dtype; raises ValueError listing the accepted names."""
    key = str(name).strip().lower().removeprefix("torch.")
    if key.startswith(("float8", "fp8", "f8")):
        raise ValueError(f"'{name}' is not a dtype to merge in or write: float8 inputs are read and merged in "
                         "float32, but a merge does not compute the scales an fp8 checkpoint needs; use bfloat16, "
                         "float16 or float32")
    if key not in SPEC_NAMES:
        raise ValueError(f"unknown dtype '{name}'; use one of bfloat16, float16, float32, float64")
    return SPEC_NAMES[key]


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> 'bfloat16' (the spelling config.json uses)."""
    return str(dtype).removeprefix("torch.")


@lru_cache(maxsize=None)
def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def is_float8(dtype: torch.dtype) -> bool:
    return dtype in FLOAT8


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Merges are computed in float32 (float64 when the input is float64), as mergekit does; float8 inputs
    are upcast to float32 too."""
    return torch.float64 if dtype == torch.float64 else torch.float32
