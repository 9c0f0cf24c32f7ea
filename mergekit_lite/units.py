"""Byte sizes as people write them: ``5GB``, ``500MB``, ``2GiB``, ``1.5e9``."""

from __future__ import annotations

import re
from decimal import Decimal

_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")


# No file (and no shard) can be larger than a signed 64-bit byte offset; a size beyond that is a typo.
MAX_SIZE = 2**63 - 1
_EXAMPLES = "e.g. 5GB, 500MB or 2GiB"


def parse_size(text: str | int | float) -> int:
    """Parse a byte size. Decimal units (``GB``) are powers of 10 as on the Hub; ``GiB`` are powers of 2.

    Raises ValueError for anything that is not a whole, positive, finite number of bytes of at most
    ``MAX_SIZE``: ``inf``, ``nan``, ``1e999GB``, ``-5GB``, ``0``, ``1e-3``, a boolean."""
    if isinstance(text, bool):
        raise ValueError(f"{text!r} is not a size; write a number of bytes with an optional unit, {_EXAMPLES}")
    if isinstance(text, int):
        return _checked(text, str(text))
    match = _SIZE.match(str(text))
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS:
        raise ValueError(f"'{text}' is not a size; write a number of bytes with an optional unit, {_EXAMPLES}")
    # Exactly, without float rounding or overflow: '1e999GB' is a (huge) number, not infinity.
    number = Decimal(match.group(1))
    value = Decimal(0) if number.adjusted() < -40 else number * _UNITS[unit] if number.adjusted() < 40 else None
    if value is None or value > MAX_SIZE:
        raise ValueError(f"'{text}' is larger than any file can be (at most {format_size(MAX_SIZE)}); "
                         "for a single shard, give a size larger than the model, e.g. 1TB")
    return _checked(int(value), f"'{text}'")


def _checked(size: int, shown: str) -> int:
    if size <= 0:
        raise ValueError(f"{shown} must be at least 1 byte")
    if size > MAX_SIZE:
        raise ValueError(f"{shown} is larger than any file can be (at most {format_size(MAX_SIZE)}); "
                         "for a single shard, give a size larger than the model, e.g. 1TB")
    return size


def format_size(size: float) -> str:
    """Human-readable bytes, decimal units (what the Hub and `ls -h --si` show)."""
    for unit in ("B", "kB", "MB", "GB", "TB", "PB", "EB"):
        if abs(size) < 1000 or unit == "EB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")
