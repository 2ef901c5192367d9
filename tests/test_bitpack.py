"""Spare-bit packing of CKKS residues: exact round trips, and sums modulo q done packed."""

from __future__ import annotations

import numpy as np
import pytest

from policies.bitpack import Packing

Q60 = 1152921504606830593  # SEAL's 60-bit prime for N=4096 (2^60 - 16383)


@pytest.mark.parametrize("bits", [13, 20, 30, 40, 49, 59, 60, 62])
def test_round_trip_at_each_width(bits):
    packing = Packing(bits)
    rng = np.random.default_rng(bits)
    values = rng.integers(0, 1 << bits, size=3001, dtype=np.uint64)  # not a whole number of columns
    values[:20] = (1 << bits) - 1  # all ones: a residue must not bleed into its neighbours
    words = packing.pack(values)
    assert words.shape == (packing.words, packing.columns(values.size))
    assert np.array_equal(packing.unpack(words, values.size), values)
    raw = words.tobytes()
    assert len(raw) == packing.nbytes(values.size)
    assert np.array_equal(packing.unpack(np.frombuffer(raw, dtype=np.uint8), values.size), values)


def test_sixty_bit_residues_take_seven_and_a_half_bytes():
    packing = Packing(60)
    assert (packing.words, packing.exact_terms) == (15, 16)
    assert packing.nbytes(2 * 4096) == 2 * 4096 * 7.5


@pytest.mark.parametrize("k", [1, 2, 16, 17, 40])
def test_sum_mod_matches_integer_arithmetic(k):
    """Batches of exact_terms (16 at 60 bits) are summed exactly, then reduced and combined."""
    packing = Packing(60)
    rng = np.random.default_rng(k)
    count = 16 * 600 + 5
    terms = [rng.integers(0, 1 << 60, size=count, dtype=np.uint64) for _ in range(k)]  # some >= q
    terms[0][:16] = (1 << 60) - 1
    out = np.empty((packing.words, packing.columns(count)), dtype=np.uint64)
    packing.sum_mod([packing.pack(t) for t in terms], Q60, out)
    expected = [sum(int(t[i]) for t in terms) % Q60 for i in range(count)]
    assert packing.unpack(out, count).tolist() == expected


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="cannot pack 64-bit"):
        Packing(64)
    with pytest.raises(ValueError, match="does not fit in 40 bits"):
        Packing(40).pack(np.full(8, 1 << 40, dtype=np.uint64))
    with pytest.raises(ValueError, match="take 120 bytes, got 119"):
        Packing(60).view(b"\0" * 119, 16)
    packing = Packing(60)
    a, b = packing.pack(np.zeros(32, dtype=np.uint64)), packing.pack(np.zeros(48, dtype=np.uint64))
    with pytest.raises(ValueError, match="different shapes"):
        packing.sum_mod([a, b], Q60, np.empty_like(a))
    with pytest.raises(ValueError, match="nothing to sum"):
        packing.sum_mod([], Q60, np.empty_like(a))
