"""output/crc.py: the CRC-32 of concatenated bytes from the parts' CRC-32s equals zlib's CRC-32 of the whole."""

import os
import zlib

import pytest

from mergekit_lite.output.crc import crc32_combine


@pytest.mark.parametrize("first, second", [(0, 0), (0, 5), (5, 0), (1, 1), (100, 3000), (4096, 1 << 20),
                                           (7, 123457)])
def test_combine_matches_zlib(first, second):
    a, b = os.urandom(first), os.urandom(second)
    assert crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)


def test_combine_chains_in_order():
    parts = [os.urandom(n) for n in (10, 0, 333, 65536, 1)]
    crc = 0
    for part in parts:
        crc = crc32_combine(crc, zlib.crc32(part), len(part))
    assert crc == zlib.crc32(b"".join(parts))


@pytest.mark.parametrize("first, second", [(0, 0), (0, 5), (5, 0), (100, 3000), (7, 123457)])
def test_own_combine_matches_zlib(first, second):
    """The module's own combine, used where zlib-ng is not installed."""
    from mergekit_lite.output.crc import _crc32_combine

    a, b = os.urandom(first), os.urandom(second)
    assert _crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)


@pytest.mark.parametrize("size", [0, 1, 15, 4096, 5 << 20])
def test_the_crc_is_zlibs(size):
    """The CRC-32 the journal records is zlib's, whichever library computes it (a journal written with one
    resumes with the other)."""
    from mergekit_lite.output.crc import crc32

    data = os.urandom(size)
    assert crc32(data) == zlib.crc32(data)
    assert crc32(data[size // 2:], crc32(data[:size // 2])) == zlib.crc32(data)
    assert crc32(memoryview(data)) == zlib.crc32(data)
