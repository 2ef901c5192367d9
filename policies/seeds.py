"""Seeded CKKS ciphertexts: half the bytes, because c1 can be a public pseudorandom polynomial.

A symmetric CKKS ciphertext is (c0, c1) with c0 + c1*s = m + e (NTT form, per prime),
where c1 is uniform. A silo that holds s can swap c1 for a' = expand(seed), a uniform
polynomial anyone can regenerate from a 32-byte seed:

    c0' = c0 + (c1 - a') * s  (mod q)   =>   c0' + a' * s = c0 + c1 * s = m + e

so (c0', a') encrypts the same m with the same error, and only (c0', seed) is sent: one
polynomial instead of two. Sums stay easy: the coordinator adds the c0' and concatenates
the seeds (it expands nothing and never needs s); a silo expands every seed, adds the a'
itself to get the sum's c1, and decrypts. This is the "seeded" ciphertext SEAL itself
writes for symmetric encryption; TenSEAL 0.3.18 does not expose it, hence this module.

`expand` is AES-256 in counter mode keyed by the seed (a standard PRG; `cryptography`
uses AES-NI, far faster than SHAKE-256 here), one counter range per prime, with
rejection sampling so every residue is exactly uniform below q. Seeds come from
os.urandom and are public: like SEAL's, they only have to be unpredictable before use.

`mulmod` multiplies 60-bit residues exactly in numpy uint64 arithmetic by Shoup's
method: the fixed factor b (the secret key) comes with b' = floor(b * 2^64 / q), so
a*b mod q = a*b - hi64(a*b')*q (wrapping) minus at most one q; hi64 is four 32-bit
partial products.
"""

from __future__ import annotations

import os

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

SEED_BYTES = 32
_LOW32 = np.uint64(0xFFFFFFFF)
_32 = np.uint64(32)


def new_seed() -> bytes:
    return os.urandom(SEED_BYTES)


def expand(seed: bytes, q: int, level: int, count: int) -> np.ndarray:
    """`count` residues uniform below q, determined by (seed, level)."""
    if len(seed) != SEED_BYTES:
        raise ValueError(f"a seed has {SEED_BYTES} bytes, got {len(seed)}")
    mask, modulus = np.uint64((1 << q.bit_length()) - 1), np.uint64(q)
    words = count + 64  # enough at once when q is near 2^width (60-bit primes reject 1 word in 2^46)
    while True:
        stream = Cipher(algorithms.AES(seed), modes.CTR(level.to_bytes(8, "big") + bytes(8))).encryptor()
        raw = np.empty(8 * words + 16, dtype=np.uint8)
        stream.update_into(bytes(8 * words), raw)
        values = raw[:8 * words].view("<u8")
        np.bitwise_and(values, mask, out=values)
        if values[:count].max(initial=0) < modulus:  # nothing rejected among the first `count`
            return values[:count]
        accepted = values[values < modulus]
        if accepted.size >= count:  # the first `count` accepted: a longer stream has the same prefix
            return accepted[:count]
        words *= 2


def expand_sum(seeds: list[bytes], q: int, level: int, count: int) -> np.ndarray:
    """sum of expand(seed) over the seeds, modulo q: the c1 of a sum of seeded ciphertexts.
    Added exactly in uint64 and reduced once every `exact` terms."""
    total = np.zeros(count, dtype=np.uint64)
    exact = ((1 << 64) - 1) // (q - 1)  # terms below q that sum without overflow (16 for 60 bits)
    for i, seed in enumerate(seeds):
        if i and i % exact == 0:
            np.remainder(total, np.uint64(q), out=total)
        np.add(total, expand(seed, q, level, count), out=total)
    np.remainder(total, np.uint64(q), out=total)
    return total


def add_mod(acc: np.ndarray, x: np.ndarray, q: int) -> None:
    """acc = (acc + x) mod q in place, for acc, x < q < 2^63."""
    np.add(acc, x, out=acc)
    _reduce_once(acc, q)


def sub_mod(a: np.ndarray, b: np.ndarray, q: int) -> np.ndarray:
    """(a - b) mod q for a, b < q: where b > a, a - b wraps above a - b + q."""
    out = a - b
    np.minimum(out, out + np.uint64(q), out=out)
    return out


def _reduce_once(x: np.ndarray, q: int) -> None:
    """x = x mod q in place for x < 2q: x - q wraps above x where x < q, so take the smaller."""
    np.minimum(x, x - np.uint64(q), out=x)


def shoup(b: np.ndarray, q: int) -> np.ndarray:
    """b' = floor(b * 2^64 / q) for each residue b < q: the precomputation mulmod needs."""
    return np.array([(int(x) << 64) // q for x in np.asarray(b).reshape(-1)], dtype=np.uint64).reshape(np.shape(b))


def mulmod(a: np.ndarray, b: np.ndarray, b_shoup: np.ndarray, q: int) -> np.ndarray:
    """(a * b) mod q exactly, for a < 2^64, b < q < 2^63 and b_shoup = shoup(b, q)
    (b and b_shoup broadcast against a)."""
    if q >> 63:
        raise ValueError(f"mulmod needs q < 2^63, got a {q.bit_length()}-bit modulus")
    a = np.asarray(a, dtype=np.uint64)
    out = a * b - _mulhi(a, b_shoup) * np.uint64(q)  # wraps to the remainder, or it plus q
    _reduce_once(out, q)
    return out


def _mulhi(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The high 64 bits of the 128-bit products x * y (uint64, elementwise)."""
    x0, x1, y0, y1 = x & _LOW32, x >> _32, y & _LOW32, y >> _32
    low_cross, high_cross = x0 * y1, x1 * y0
    mid = ((x0 * y0) >> _32) + (low_cross & _LOW32) + (high_cross & _LOW32)
    return x1 * y1 + (low_cross >> _32) + (high_cross >> _32) + (mid >> _32)


def reseed(c0: np.ndarray, c1: np.ndarray, s: np.ndarray, s_shoup: np.ndarray, a: np.ndarray, q: int) -> np.ndarray:
    """c0 + (c1 - a) * s mod q: the c0 that pairs with a instead of c1 (same m and e);
    s_shoup = shoup(s, q)."""
    out = mulmod(sub_mod(c1, a, q), s, s_shoup, q)
    add_mod(out, c0, q)
    return out
