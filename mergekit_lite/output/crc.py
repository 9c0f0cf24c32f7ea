"""CRC-32, the checksum of every byte a merge reads and writes (the resume journal's), and the CRC-32 of
concatenated bytes from the CRC-32 of each part (zlib's ``crc32_combine``, which Python's zlib does not expose).

A merge checksums every input byte it reads and every output byte it writes, so the CRC's speed is a share of
every merge's time: Python's zlib computes it at 2.4-3.5 GiB/s on one core, the zlib-ng package (a dependency,
the same CRC-32 values) at about 12 GiB/s with the processor's carry-less multiply instructions. On a 1B merge of
three inputs that is about 2.5 s of CPU against 0.5 s. Where zlib-ng is not installed (an interpreter it has no
wheel for), Python's zlib computes the same values, and ``crc32_combine`` is this module's own.

The shard writer computes the CRC-32 of every tensor it writes once, and both the shard's CRC (the whole file,
for resuming) and, for a tensor written exactly as an input was read (a LoRA fold), the input's CRC (the resume
journal's input checksums) are combined from those parts, so the bytes are checksummed in one pass, not two.
The arithmetic is zlib's (1.2.12 and later): multiplying polynomials modulo the CRC-32 polynomial, reflected.
"""

from __future__ import annotations

POLY = 0xEDB88320      # the CRC-32 polynomial, reflected (as zlib uses it)
_X0 = 1 << 31           # the polynomial x^0 (1), reflected


def _multmodp(a: int, b: int) -> int:
    """a(x) * b(x) modulo the CRC-32 polynomial."""
    m, p = _X0, 0
    while m:
        if a & m:
            p ^= b
            if not a & (m - 1):
                break
        m >>= 1
        b = (b >> 1) ^ POLY if b & 1 else b >> 1
    return p


def _powers() -> list[int]:
    """x^(2^n) modulo the polynomial, for n = 0..31."""
    table, p = [], _X0 >> 1     # x^1
    for _ in range(32):
        table.append(p)
        p = _multmodp(p, p)
    return table


_X2N = _powers()


def _x8nmodp(length: int) -> int:
    """x^(8 * length) modulo the polynomial: the shift of a CRC past ``length`` bytes."""
    p, k = _X0, 3
    while length:
        if length & 1:
            p = _multmodp(_X2N[k & 31], p)
        length >>= 1
        k += 1
    return p


def _crc32_combine(crc1: int, crc2: int, length2: int) -> int:
    """The CRC-32 of ``a + b`` from ``crc32(a)``, ``crc32(b)`` and ``len(b)`` (zlib's crc32_combine)."""
    return _multmodp(_x8nmodp(length2), crc1) ^ crc2


try:
    from zlib_ng.zlib_ng import crc32
except ImportError:   # pragma: no cover - zlib-ng has wheels for CPython 3.9-3.14 on Linux, macOS and Windows
    from zlib import crc32
try:
    from zlib_ng.zlib_ng import crc32_combine
except ImportError:   # pragma: no cover
    crc32_combine = _crc32_combine
