"""Bit-packing of CKKS residues: exact round trips at every width a prime can have."""

from __future__ import annotations

import numpy as np
import pytest

from policies import bitpack


@pytest.mark.parametrize("bits", [13, 20, 30, 40, 49, 50, 57, 58, 59, 60])
def test_round_trip_at_each_width(bits):
    width = bitpack.packed_width(bits)
    rng = np.random.default_rng(bits)
    values = rng.integers(0, 1 << bits, size=8 * 1001, dtype=np.uint64)
    values[:8] = (1 << bits) - 1  # all ones: neighbours must not bleed into each other
    values[8:16] = 0
    packed = bitpack.pack(values, width)
    assert len(packed) == values.size * width // 8
    assert np.array_equal(bitpack.unpack(packed, values.size, width), values)


def test_widths_round_up_only_where_a_word_cannot_hold_the_shift():
    assert [bitpack.packed_width(b) for b in (40, 49, 57, 58, 59, 60)] == [40, 49, 57, 58, 60, 60]
    with pytest.raises(ValueError, match="cannot pack 65-bit"):
        bitpack.packed_width(65)


def test_unpacker_accumulates_block_ranges():
    rng = np.random.default_rng(1)
    a, b = (rng.integers(0, 1 << 60, size=8 * 50, dtype=np.uint64) for _ in range(2))
    bufs = [np.frombuffer(bitpack.pack(v, 60) + b"\0" * bitpack.SLACK, dtype=np.uint8) for v in (a, b)]
    acc = np.zeros((8, 20), dtype=np.uint64)
    for buf in bufs:
        bitpack.Unpacker(buf, 0, 50, 60).add_into(acc, 10, 30, np.empty(20, dtype=np.uint64))
    assert np.array_equal(acc.T.reshape(-1), (a + b)[80:240])


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="multiple of 8"):
        bitpack.pack(np.zeros(12, dtype=np.uint64), 60)
    with pytest.raises(ValueError, match="does not fit in 40 bits"):
        bitpack.pack(np.full(8, 1 << 40, dtype=np.uint64), 40)
    with pytest.raises(ValueError, match="take 60 bytes, got 59"):
        bitpack.unpack(b"\0" * 59, 8, 60)
    with pytest.raises(ValueError, match="missing slack"):
        bitpack.Unpacker(np.zeros(40, dtype=np.uint8), 0, 1, 40)
