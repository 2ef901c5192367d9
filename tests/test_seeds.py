"""Seed expansion and exact modular arithmetic behind seeded CKKS ciphertexts."""

from __future__ import annotations

import numpy as np
import pytest

from policies import seeds

PRIMES = [1152921504606830593, 562949953216513, 1099511480321, (1 << 62) - 57]  # 60, 49, 40, 62 bits


@pytest.mark.parametrize("q", PRIMES)
def test_mulmod_is_exact(q):
    rng = np.random.default_rng(q % 1000)
    a = rng.integers(0, q, 20000, dtype=np.uint64)
    b = rng.integers(0, q, 20000, dtype=np.uint64)
    a[:4], b[:4] = [q - 1, 0, 1, q - 1], [q - 1, q - 1, q - 1, 1]
    got = seeds.mulmod(a, b, seeds.shoup(b, q), q)
    assert got.tolist() == [int(x) * int(y) % q for x, y in zip(a.tolist(), b.tolist())]


def test_mulmod_broadcasts_a_fixed_factor_over_rows():
    q = PRIMES[0]
    rng = np.random.default_rng(1)
    a, s = rng.integers(0, q, (3, 64), dtype=np.uint64), rng.integers(0, q, 64, dtype=np.uint64)
    got = seeds.mulmod(a, s, seeds.shoup(s, q), q)
    assert got.tolist() == [[int(x) * int(y) % q for x, y in zip(row, s.tolist())] for row in a.tolist()]
    with pytest.raises(ValueError, match="q < 2\\^63"):
        seeds.mulmod(a, s, s, 1 << 63)


def test_reseed_keeps_c0_plus_c1_s():
    """(c0', a) decrypts like (c0, c1): c0' + a*s = c0 + c1*s mod q, checked with Python ints."""
    q = PRIMES[0]
    rng = np.random.default_rng(2)
    c0, c1, s = (rng.integers(0, q, 4096, dtype=np.uint64) for _ in range(3))
    a = seeds.expand(seeds.new_seed(), q, 0, 4096)
    c0_new = seeds.reseed(c0, c1, s, seeds.shoup(s, q), a, q)
    for i in range(0, 4096, 37):
        assert (int(c0_new[i]) + int(a[i]) * int(s[i])) % q == (int(c0[i]) + int(c1[i]) * int(s[i])) % q


@pytest.mark.parametrize("q", PRIMES)
def test_expand_is_deterministic_below_q_and_separates_primes(q):
    seed = bytes(range(32))
    a = seeds.expand(seed, q, 0, 50000)
    assert a.dtype == np.uint64 and a.size == 50000 and int(a.max()) < q
    assert np.array_equal(a, seeds.expand(seed, q, 0, 50000))
    assert np.array_equal(a[:1000], seeds.expand(seed, q, 0, 1000))  # a prefix of the same stream
    assert not np.array_equal(a[:1000], seeds.expand(seed, q, 1, 1000))
    assert not np.array_equal(a[:1000], seeds.expand(bytes(32), q, 0, 1000))
    # uniform: the mean of 50000 uniform residues is within 1% of q/2, top bit set about half the time
    assert abs(float(a.mean()) / q - 0.5) < 0.01
    assert 0.48 < float(np.mean(a >= np.uint64(q // 2))) < 0.52


def test_expand_rejects_rather_than_reduces():
    """q = 3 * 2^38 takes 40-bit words and rejects a quarter of them: uniform below q puts a
    third of the residues below 2^38; reducing the words instead would put half there."""
    q = 3 << 38  # not prime, but the sampler only needs a modulus
    a = seeds.expand(bytes(32), q, 0, 30000)
    assert a.size == 30000 and int(a.max()) < q
    assert 0.32 < float(np.mean(a < np.uint64(1 << 38))) < 0.35


def test_expand_sum_and_bad_seeds():
    q = PRIMES[0]
    s1, s2 = seeds.new_seed(), seeds.new_seed()
    assert s1 != s2 and len(s1) == seeds.SEED_BYTES
    total = seeds.expand_sum([s1, s2], q, 0, 500)
    expected = [(int(x) + int(y)) % q for x, y in zip(seeds.expand(s1, q, 0, 500).tolist(), seeds.expand(s2, q, 0, 500).tolist())]
    assert total.tolist() == expected
    with pytest.raises(ValueError, match="a seed has 32 bytes, got 5"):
        seeds.expand(b"short", q, 0, 10)
