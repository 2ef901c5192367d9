"""The CKKS contract with real TenSEAL ciphertexts: what the coordinator can and cannot do,
that sums decrypt to plaintext sums, the security table, headroom, malformed input."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tenseal as ts

from policies import ckks, seeds
from policies.ckks import CkksParams
from policies.errors import PolicyError
from policies.update import pack_update, unpack_sum

P_LONG = 5000  # more than two ciphertexts of 2048 slots: chunking is exercised


@pytest.fixture(scope="module")
def params() -> CkksParams:
    return CkksParams()


@pytest.fixture(scope="module")
def secret_ctx(params):
    return ckks.new_secret_context(params)


@pytest.fixture(scope="module")
def agg_ctx(secret_ctx, params):
    """What the coordinator holds: loaded from the bytes it is sent, nothing else."""
    return ckks.load_context(ckks.aggregator_context_bytes(secret_ctx), params)


def _weights(rng: np.random.Generator, k: int, p: int) -> list[np.ndarray]:
    """Realistic contributions: a_k * w with a_k in (0, 1] and w like trained weights."""
    return [rng.uniform(0.05, 1.0) * rng.normal(0.0, 0.8, p) for _ in range(k)]


def _assert_close(got: np.ndarray, want: np.ndarray, rel: float = 1e-6) -> None:
    assert got.shape == want.shape
    assert np.max(np.abs(got - want)) <= rel * np.max(np.abs(want))


def _protobuf_fields(buf: bytes) -> dict[int, list[bytes]]:
    """Length-delimited fields of a protobuf message (enough to find TenSEAL's secret key)."""
    out: dict[int, list[bytes]] = {}
    pos = 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos)
        wire = tag & 7
        if wire == 0:
            _, pos = _varint(buf, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        else:
            length, pos = _varint(buf, pos)
            out.setdefault(tag >> 3, []).append(buf[pos:pos + length])
            pos += length
    return out


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not byte & 0x80:
            return value, pos


# ---------------------------------------------------------------------------- key custody


def test_aggregator_context_holds_no_secret_key(secret_ctx, agg_ctx, params):
    agg_bytes = ckks.aggregator_context_bytes(secret_ctx)
    secret_bytes = ckks.secret_context_bytes(secret_ctx)
    assert len(agg_bytes) * 100 < len(secret_bytes)
    assert ckks.has_secret_key(secret_ctx) and ckks.load_context(secret_bytes).is_private()
    assert agg_ctx.is_private() is False and not ckks.has_secret_key(agg_ctx)

    blob = ckks.encrypt_vector(secret_ctx, np.ones(10), params=params)
    with pytest.raises(PolicyError, match="cannot decrypt"):
        ckks.decrypt_vector(agg_ctx, blob)
    with pytest.raises(ValueError, match="secret_key"):  # and TenSEAL itself refuses too
        ts.ckks_vector_from(agg_ctx, ts.ckks_vector(secret_ctx, np.ones(10)).serialize()).decrypt()
    with pytest.raises(PolicyError, match="only a silo can encrypt"):
        ckks.encrypt_vector(agg_ctx, np.ones(10))


def test_aggregator_file_does_not_contain_the_secret_key(secret_ctx, tmp_path):
    path = tmp_path / "aggregator.ctx"
    path.write_bytes(ckks.aggregator_context_bytes(secret_ctx))
    on_disk = path.read_bytes()
    assert ckks.load_context(on_disk).is_private() is False

    with_sk = ckks.secret_context_bytes(secret_ctx)
    secret_key = _protobuf_fields(_protobuf_fields(with_sk)[3][0])[1][0]  # private_context.secret_key
    assert len(secret_key) > 30_000  # N=4096 x 2 primes x 8 bytes, serialized by SEAL
    without_sk = secret_ctx.serialize(save_public_key=False, save_secret_key=False,
                                      save_galois_keys=False, save_relin_keys=False)
    assert len(with_sk) - len(without_sk) >= len(secret_key)  # the diff is the secret key
    assert secret_key not in on_disk
    for start in range(100, len(secret_key) - 64, 4096):  # nor any 64-byte piece of it
        assert secret_key[start:start + 64] not in on_disk


def test_secret_context_round_trip_and_parameter_check(secret_ctx, params):
    blob = ckks.encrypt_vector(secret_ctx, np.arange(7.0), params=params)
    other_silo = ckks.load_context(ckks.secret_context_bytes(secret_ctx), params)
    _assert_close(ckks.decrypt_vector(other_silo, blob), np.arange(7.0))
    assert ckks.encrypt_vector(other_silo, np.ones(3), params=params)  # every silo can encrypt

    wrong = CkksParams(poly_modulus_degree=8192, coeff_mod_bit_sizes=[60, 40, 40])
    with pytest.raises(PolicyError, match="study requires N=8192"):
        ckks.load_context(ckks.secret_context_bytes(secret_ctx), wrong)
    with pytest.raises(PolicyError, match="not a serialized TenSEAL CKKS context"):
        ckks.load_context(b"garbage")


def test_symmetric_encryption_is_used(secret_ctx):
    """Every silo holds the secret key anyway; symmetric contexts have no public key."""
    assert ckks.ENCRYPTION_TYPE == ts.ENCRYPTION_TYPE.SYMMETRIC
    with pytest.raises(ValueError):
        secret_ctx.has_public_key()


# ---------------------------------------------------------------------------- sums


@pytest.mark.parametrize("k", [4, 16])
def test_sum_with_aggregator_context_decrypts_to_plaintext_sum(secret_ctx, agg_ctx, params, k):
    contributions = _weights(np.random.default_rng(k), k, P_LONG)
    blobs = [ckks.encrypt_vector(secret_ctx, c, params=params) for c in contributions]
    expected = np.sum(contributions, axis=0)
    by_tenseal = ckks.sum_encrypted(agg_ctx, blobs, method="tenseal")
    by_numpy = ckks.sum_encrypted(agg_ctx, blobs, method="numpy-residue")
    assert by_numpy == by_tenseal  # the fast path is the same ciphertext, byte for byte
    assert ckks.sum_encrypted(agg_ctx, blobs) == by_tenseal
    _assert_close(ckks.decrypt_vector(secret_ctx, by_numpy), expected)


def test_update_layout_sums_to_weighted_mean_and_counts_contributors(secret_ctx, agg_ctx, params):
    rng = np.random.default_rng(7)
    weights = [rng.normal(0, 1, 14) for _ in range(4)]
    a = [0.27, 0.23, 0.04, 0.11]  # train rows / study maximum
    blobs = [ckks.encrypt_vector(secret_ctx, pack_update(w, a_k), params=params) for w, a_k in zip(weights, a)]
    summed = unpack_sum(ckks.decrypt_vector(secret_ctx, ckks.sum_encrypted(agg_ctx, blobs)))
    assert summed.contributors == 4
    assert summed.total_weight == pytest.approx(sum(a), rel=1e-8)
    _assert_close(summed.mean, np.average(weights, axis=0, weights=a))


def test_more_contributors_than_fit_unreduced(secret_ctx, agg_ctx):
    """K > 16 forces a modular reduction mid-sum on the numpy path (60-bit primes)."""
    rng = np.random.default_rng(3)
    contributions = [rng.normal(0, 1, 100) for _ in range(20)]
    blobs = [ckks.encrypt_vector(secret_ctx, c) for c in contributions]
    by_numpy = ckks.sum_encrypted(agg_ctx, blobs, method="numpy-residue")
    assert by_numpy == ckks.sum_encrypted(agg_ctx, blobs, method="tenseal")
    _assert_close(ckks.decrypt_vector(secret_ctx, by_numpy), np.sum(contributions, axis=0))


def test_two_data_primes_sum_on_both_paths():
    """N=8192 [60, 60, 60]: residues modulo two data primes, still stored uncompressed."""
    params = CkksParams(poly_modulus_degree=8192, coeff_mod_bit_sizes=[60, 60, 60])
    ctx = ckks.new_secret_context(params)
    agg = ckks.load_context(ckks.aggregator_context_bytes(ctx), params)
    contributions = _weights(np.random.default_rng(11), 3, 5000)
    blobs = [ckks.encrypt_vector(ctx, c, params=params) for c in contributions]
    by_numpy = ckks.sum_encrypted(agg, blobs, method="numpy-residue")
    assert by_numpy == ckks.sum_encrypted(agg, blobs, method="tenseal")
    _assert_close(ckks.decrypt_vector(ctx, by_numpy), np.sum(contributions, axis=0))


def test_compressed_ciphertexts_fall_back_to_tenseal():
    """N=8192 [60, 40, 40]: zstd really compresses 40-bit residues, so the silo cannot read
    them out and sends TenSEAL's own bytes (format 1), which only TenSEAL adds."""
    params = CkksParams(poly_modulus_degree=8192, coeff_mod_bit_sizes=[60, 40, 40])
    ctx = ckks.new_secret_context(params)
    agg = ckks.load_context(ckks.aggregator_context_bytes(ctx), params)
    contributions = _weights(np.random.default_rng(5), 3, 300)
    blobs = [ckks.encrypt_vector(ctx, c, params=params) for c in contributions]
    assert [_format(b) for b in blobs] == [ckks.FORMAT_TENSEAL] * 3
    with pytest.raises(PolicyError, match=r"contribution \[0\] is in format 1"):
        ckks.sum_encrypted(agg, blobs, method="numpy-residue")
    summed = ckks.sum_encrypted(agg, blobs)
    assert _format(summed) == ckks.FORMAT_TENSEAL
    _assert_close(ckks.decrypt_vector(ctx, summed), np.sum(contributions, axis=0))


def _format(blob: bytes) -> int:
    return struct.unpack_from("<H", blob, 4)[0]


def _tenseal_chunks(ctx: ts.Context, values: np.ndarray) -> list[bytes]:
    return [ts.ckks_vector(ctx, values[i:i + 2048]).serialize() for i in range(0, values.size, 2048)]


def _format1(chunks: list[bytes], values: int) -> bytes:
    return struct.pack("<4sHHIIQ", b"FCKS", 1, 0, len(chunks), 2048, values) + b"".join(
        struct.pack("<II", 0, len(c)) + c for c in chunks)


def test_packed_blob_rebuilds_tenseals_own_serialisation(secret_ctx, agg_ctx, params):
    """Format 2 is TenSEAL's ciphertexts minus everything but residues: the chunks a silo
    rebuilds load in TenSEAL and re-serialise to TenSEAL's bytes, and decrypt bit for bit
    like the vectors TenSEAL made."""
    values = np.random.default_rng(8).normal(0, 1, P_LONG)
    chunks = _tenseal_chunks(secret_ctx, values)
    packed = ckks._pack(secret_ctx, chunks, 2048, P_LONG)
    assert _format(packed) == ckks.FORMAT_PACKED
    view = memoryview(packed)
    head = ckks._read_head(view, "blob")
    rebuilt = ckks._tenseal_vectors(agg_ctx, view, head, "blob")
    assert [v.serialize() for v in rebuilt] == chunks  # byte-identical round trip
    originals = np.concatenate([ts.ckks_vector_from(secret_ctx, c).decrypt() for c in chunks])
    assert np.array_equal(ckks.decrypt_vector(secret_ctx, packed), originals)


def _tenseal_sum(ctx: ts.Context, silos: list[list[bytes]]) -> list[ts.CKKSVector]:
    """TenSEAL's own `+`, chunk by chunk, over the silos' serialised vectors."""
    totals = []
    for c in range(len(silos[0])):
        total = ts.ckks_vector_from(ctx, silos[0][c])
        for chunks in silos[1:]:
            total = total + ts.ckks_vector_from(ctx, chunks[c])
        totals.append(total)
    return totals


def test_numpy_sum_decrypts_like_tenseals_add(secret_ctx, agg_ctx, params):
    """The coordinator's numpy sum of packed blobs against TenSEAL's `+` on the vectors the
    silos encrypted: same ciphertext bytes, same decryption, bit for bit."""
    rng = np.random.default_rng(9)
    contributions = _weights(rng, 5, P_LONG)
    tenseal_chunks = [_tenseal_chunks(secret_ctx, c) for c in contributions]
    blobs = [ckks._pack(secret_ctx, chunks, 2048, P_LONG) for chunks in tenseal_chunks]
    by_tenseal = _tenseal_sum(secret_ctx, tenseal_chunks)
    summed = ckks.sum_encrypted(agg_ctx, blobs, method="numpy-residue")
    rebuilt = ckks._tenseal_vectors(agg_ctx, memoryview(summed), ckks._read_head(memoryview(summed), "sum"), "sum")
    assert [v.serialize() for v in rebuilt] == [v.serialize() for v in by_tenseal]
    assert np.array_equal(ckks.decrypt_vector(secret_ctx, summed), np.concatenate([v.decrypt() for v in by_tenseal]))


def test_format1_and_packed_blobs_sum_through_tenseal(secret_ctx, agg_ctx, params):
    """A silo that had to fall back (format 1) still counts: the sum goes through TenSEAL."""
    contributions = _weights(np.random.default_rng(2), 3, P_LONG)
    blobs = [ckks.encrypt_vector(secret_ctx, c, params=params) for c in contributions]
    blobs[1] = _format1(_tenseal_chunks(secret_ctx, contributions[1]), P_LONG)
    summed = ckks.sum_encrypted(agg_ctx, blobs)
    assert _format(summed) == ckks.FORMAT_TENSEAL
    _assert_close(ckks.decrypt_vector(secret_ctx, summed), np.sum(contributions, axis=0))


def test_uint8_transport_round_trip(secret_ctx, agg_ctx, params):
    contributions = _weights(np.random.default_rng(4), 4, 3000)
    blobs = [ckks.encrypt_vector(secret_ctx, c, params=params) for c in contributions]
    arrays = [ckks.blob_as_uint8(b) for b in blobs]
    assert arrays[0].dtype == np.uint8 and ckks.uint8_as_blob(arrays[0]) == blobs[0]
    summed = ckks.sum_encrypted_uint8(agg_ctx, arrays)
    assert summed.dtype == np.uint8 and summed.tobytes() == ckks.sum_encrypted(agg_ctx, blobs)
    _assert_close(ckks.decrypt_vector(secret_ctx, summed), np.sum(contributions, axis=0))
    with pytest.raises(PolicyError, match="1-D uint8"):
        ckks.uint8_as_blob(np.zeros(3, dtype=np.float32))


def test_wire_size_is_15_bytes_per_parameter_seeded_30_unseeded(secret_ctx, params):
    """One polynomial x 1 data prime x 60 bits per slot = 15 bytes (seeded), 30 with c1,
    plus a 72-byte header and a 32-byte seed per contribution."""
    blob = ckks.encrypt_vector(secret_ctx, np.zeros(100 * 2048), params=params)
    assert len(blob) == 100 * 2048 * 15 + 72 + 32
    full = ckks.encrypt_vector(secret_ctx, np.zeros(100 * 2048), params=params, seeded=False)
    assert len(full) == 100 * 2048 * 30 + 72
    agg = ckks.load_context(ckks.aggregator_context_bytes(secret_ctx))
    assert len(ckks.sum_encrypted(agg, [blob] * 3)) == len(blob) + 2 * 32  # c0 sum and three seeds
    assert len(ckks.sum_encrypted(agg, [full] * 3)) == len(full)


# ---------------------------------------------------------------------------- seeded ciphertexts
# The silo re-randomises onto a public seed and sends c0 only; the coordinator adds c0 and
# lists seeds without the secret key or any expansion; a silo expands the seeds and
# decrypts exactly what TenSEAL would have.


def _seeded(ctx: ts.Context, chunks: list[bytes], values: int) -> bytes:
    return ckks._pack(ctx, chunks, 2048, values, ckks.FRESH_SEED)


def _header(blob: bytes) -> tuple[int, int]:
    """(polys, seeds) of a format-2 blob."""
    return struct.unpack_from("<BI", blob, 67)


def test_seeded_blob_decrypts_bit_for_bit_like_tenseals_ciphertext(secret_ctx):
    """Re-randomising keeps m + e: TenSEAL decrypts the rebuilt (c0', a') to exactly the
    floats it decrypts the original (c0, c1) to."""
    values = np.random.default_rng(1).normal(0, 1, P_LONG)
    chunks = _tenseal_chunks(secret_ctx, values)
    blob = _seeded(secret_ctx, chunks, P_LONG)
    assert _header(blob) == (1, 1)
    originals = np.concatenate([ts.ckks_vector_from(secret_ctx, c).decrypt() for c in chunks])
    assert np.array_equal(ckks.decrypt_vector(secret_ctx, blob), originals)
    np.testing.assert_allclose(originals, values, atol=1e-6)


def test_seeded_c1_is_the_seed_expansion_and_every_blob_has_a_fresh_seed(secret_ctx, agg_ctx, params):
    values = np.linspace(-1, 1, P_LONG)
    one, two = (ckks.encrypt_vector(secret_ctx, values, params=params) for _ in range(2))
    seed_one, seed_two = one[-32:], two[-32:]
    assert seed_one != seed_two
    view = memoryview(one)
    packed = ckks._read_packed(agg_ctx, view, ckks._read_head(view, "blob"), "blob")
    residues = ckks._residues(view, packed)  # (chunks, 2, primes, N)
    q = ckks._data_moduli(agg_ctx)[0]
    assert np.array_equal(residues[:, 1, 0].reshape(-1), seeds.expand(seed_one, q, 0, 3 * 4096))


@pytest.mark.parametrize("k", [3, 16, 17])
def test_seeded_sum_decrypts_like_tenseals_add(secret_ctx, agg_ctx, k):
    """K silos' seeded blobs summed by the coordinator's numpy path decrypt bit for bit like
    TenSEAL's `+` over the silos' original ciphertexts; the TenSEAL reference sum of the
    seeded blobs is the same bytes; the sum lists every contributor's seed."""
    rng = np.random.default_rng(k)
    contributions = [rng.uniform(0.05, 1) * rng.normal(0, 0.8, P_LONG) for _ in range(k)]
    chunks = [_tenseal_chunks(secret_ctx, c) for c in contributions]
    blobs = [_seeded(secret_ctx, c, P_LONG) for c in chunks]
    summed = ckks.sum_encrypted(agg_ctx, blobs, method="numpy-residue")
    assert _header(summed) == (1, k)
    assert summed[-32 * k:] == b"".join(b[-32:] for b in blobs)
    by_tenseal = _tenseal_sum(secret_ctx, chunks)
    assert np.array_equal(ckks.decrypt_vector(secret_ctx, summed), np.concatenate([v.decrypt() for v in by_tenseal]))
    if k == 3:
        assert ckks.sum_encrypted(agg_ctx, blobs, method="tenseal") == summed


def test_the_coordinator_path_holds_no_secret_key_and_expands_nothing(secret_ctx, agg_ctx, params, monkeypatch):
    blobs = [ckks.encrypt_vector(secret_ctx, np.full(P_LONG, float(i)), params=params) for i in range(3)]
    assert not ckks.has_secret_key(agg_ctx)
    with pytest.raises(PolicyError, match="only a silo can make seeded ciphertexts"):
        ckks._secret_residues(agg_ctx)

    def refuse(*_args, **_kwargs):
        raise AssertionError("the coordinator expanded a seed")

    monkeypatch.setattr(seeds, "expand", refuse)
    monkeypatch.setattr(ckks, "expand_sum", refuse)
    summed = ckks.sum_encrypted_uint8(agg_ctx, [ckks.blob_as_uint8(b) for b in blobs])
    monkeypatch.undo()
    np.testing.assert_allclose(ckks.decrypt_vector(secret_ctx, summed), np.full(P_LONG, 3.0), atol=1e-6)


def test_seeded_and_full_blobs_are_not_summed_together(secret_ctx, agg_ctx, params):
    seeded = ckks.encrypt_vector(secret_ctx, np.ones(10), params=params)
    full = ckks.encrypt_vector(secret_ctx, np.ones(10), params=params, seeded=False)
    for method in ("numpy-residue", "tenseal"):
        with pytest.raises(PolicyError, match=r"contribution \[1\] is not seeded, contribution \[0\] is"):
            ckks.sum_encrypted(agg_ctx, [seeded, full], method=method)


def test_seed_headers_that_do_not_add_up_are_refused(secret_ctx, agg_ctx, params):
    good = ckks.encrypt_vector(secret_ctx, np.ones(10), params=params)
    no_seed = good[:68] + struct.pack("<I", 0) + good[72:]
    extra_seed = good[:68] + struct.pack("<I", 2) + good[72:]
    with pytest.raises(PolicyError, match=r"contribution \[1\]: not a fresh CKKS ciphertext \(1 polynomials, 0 seeds\)"):
        ckks.sum_encrypted(agg_ctx, [good, no_seed])
    with pytest.raises(PolicyError, match=r"contribution \[1\]: truncated"):
        ckks.sum_encrypted(agg_ctx, [good, extra_seed])
    with pytest.raises(PolicyError, match=r"contribution \[1\]: truncated"):
        ckks.sum_encrypted(agg_ctx, [good, good[:-1]])


def test_a_wrong_seed_decrypts_to_noise_not_to_the_message(secret_ctx, params):
    """The seed is part of the ciphertext: with another one, c0' + a*s is garbage."""
    values = np.linspace(-1, 1, 100)
    blob = ckks.encrypt_vector(secret_ctx, values, params=params)
    other = blob[:-32] + bytes(32)
    assert np.max(np.abs(ckks.decrypt_vector(secret_ctx, other) - values)) > 1.0


# ---------------------------------------------------------------------------- malformed input


@pytest.mark.parametrize("method", ["tenseal", "numpy-residue", "auto"])
def test_mismatched_and_malformed_blobs_are_refused(secret_ctx, agg_ctx, params, method):
    a = ckks.encrypt_vector(secret_ctx, np.ones(P_LONG), params=params)
    shorter = ckks.encrypt_vector(secret_ctx, np.ones(P_LONG - 1), params=params)
    with pytest.raises(PolicyError, match=r"contribution \[1\] holds 4999 values"):
        ckks.sum_encrypted(agg_ctx, [a, shorter], method=method)
    with pytest.raises(PolicyError, match=r"contribution \[1\]: truncated: 92164 bytes, its header implies 92264"):
        ckks.sum_encrypted(agg_ctx, [a, a[:-100]], method=method)
    with pytest.raises(PolicyError, match=r"contribution \[1\]: too long"):
        ckks.sum_encrypted(agg_ctx, [a, a + b"\0" * 8], method=method)
    with pytest.raises(PolicyError, match=r"contribution \[1\]: truncated inside the header"):
        ckks.sum_encrypted(agg_ctx, [a, a[:40]], method=method)
    with pytest.raises(PolicyError, match="bad magic"):
        ckks.sum_encrypted(agg_ctx, [a, b"XXXX" + a[4:]], method=method)
    with pytest.raises(PolicyError, match="format 7"):
        ckks.sum_encrypted(agg_ctx, [a, a[:4] + b"\x07" + a[5:]], method=method)
    with pytest.raises(PolicyError, match="nothing to sum"):
        ckks.sum_encrypted(agg_ctx, [], method=method)


def _patch(blob: bytes, at: int, data: bytes) -> bytes:
    return blob[:at] + data + blob[at + len(data):]


@pytest.mark.parametrize("method", ["tenseal", "numpy-residue"])
def test_corrupt_headers_are_refused(secret_ctx, agg_ctx, params, method):
    good = ckks.encrypt_vector(secret_ctx, np.ones(10), params=params)
    cases = {
        "other CKKS parameters": _patch(good, 24, b"\xee" * 8),  # parms_id
        "scale 2\\^41 is not the study's 2\\^40": _patch(good, 56, struct.pack("<d", 2.0 ** 41)),
        "not a fresh CKKS ciphertext \\(3 polynomials": _patch(good, 67, b"\x03"),
        "header says 10 values in 2 chunks": _patch(good, 8, struct.pack("<I", 2)),
    }
    for message, bad in cases.items():
        with pytest.raises(PolicyError, match=r"contribution \[1\]: .*" + message):
            ckks.sum_encrypted(agg_ctx, [good, bad], method=method)


def test_unreduced_residue_is_the_same_ciphertext_reduced(secret_ctx, agg_ctx, params):
    """Residues carry 60 bits; a value in [q, 2^60) (no silo writes one) stands for its
    reduction, so both sums reduce it and agree, and the result decrypts as usual. Any
    other change to the residues is a valid ciphertext of something else: CKKS ciphertexts
    are indistinguishable from random, so no format can tell (the transport's TLS must)."""
    good = ckks.encrypt_vector(secret_ctx, np.linspace(-1, 1, 10), params=params)
    q = ckks._data_moduli(agg_ctx)[0]

    def first_residue(value: int) -> bytes:  # bits 0..59 of the first packed word
        word = struct.unpack_from("<Q", good, 72)[0]
        return _patch(good, 72, struct.pack("<Q", (word >> 60 << 60) | value))

    unreduced, reduced = first_residue((1 << 60) - 1), first_residue((1 << 60) - 1 - q)
    by_numpy = ckks.sum_encrypted(agg_ctx, [good, unreduced], method="numpy-residue")
    assert by_numpy == ckks.sum_encrypted(agg_ctx, [good, reduced], method="numpy-residue")
    assert by_numpy == ckks.sum_encrypted(agg_ctx, [good, unreduced], method="tenseal")
    assert by_numpy != ckks.sum_encrypted(agg_ctx, [good, good], method="numpy-residue")
    assert np.array_equal(ckks.decrypt_vector(secret_ctx, unreduced), ckks.decrypt_vector(secret_ctx, reduced))


def test_ciphertexts_of_other_parameters_are_refused(agg_ctx, secret_ctx, params):
    other = ckks.new_secret_context(CkksParams(poly_modulus_degree=8192, coeff_mod_bit_sizes=[60, 60, 60]))
    foreign = ckks.encrypt_vector(other, np.ones(10))
    mine = ckks.encrypt_vector(secret_ctx, np.ones(10), params=params)
    scaled = ckks.new_secret_context(CkksParams(scale_bits=30))  # same primes, other scale
    for method in ("tenseal", "numpy-residue", "auto"):
        with pytest.raises(PolicyError, match="4096 slots per ciphertext; this study's context has 2048"):
            ckks.sum_encrypted(agg_ctx, [foreign, mine], method=method)
        with pytest.raises(PolicyError, match=r"contribution \[1\]"):
            ckks.sum_encrypted(agg_ctx, [mine, foreign], method=method)
        with pytest.raises(PolicyError, match=r"contribution \[1\]: scale 2\^30 is not the study's 2\^40"):
            ckks.sum_encrypted(agg_ctx, [mine, ckks.encrypt_vector(scaled, np.ones(10))], method=method)
    with pytest.raises(PolicyError, match="unknown sum method"):
        ckks.sum_encrypted(agg_ctx, [mine], method="fast")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- security table


def test_default_parameters_pass():
    p = CkksParams()
    assert (p.poly_modulus_degree, p.coeff_mod_bit_sizes, p.scale_bits, p.max_silos) == (4096, [60, 49], 40, 16)
    assert ckks.slots(p) == 2048


def test_insecure_parameters_are_refused_with_a_readable_message():
    message = "N=4096 allows at most 109 bits of coefficient modulus for 128-bit security; [60, 50] has 110"
    with pytest.raises(PolicyError) as exc:
        ckks.check_security(CkksParams.model_construct(poly_modulus_degree=4096, coeff_mod_bit_sizes=[60, 50],
                                                       scale_bits=40, max_silos=16))
    assert str(exc.value) == message
    with pytest.raises(ValueError) as exc:  # at policy load: pydantic wraps our message
        CkksParams(coeff_mod_bit_sizes=[60, 50])
    assert message in str(exc.value)
    assert "encryption parameters are not set correctly" not in str(exc.value)


def test_n8192_with_three_primes_passes():
    p = CkksParams(poly_modulus_degree=8192, coeff_mod_bit_sizes=[60, 40, 40])
    assert ckks.new_secret_context(p).is_private()


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"poly_modulus_degree": 3000}, "poly_modulus_degree 3000 is not one of"),
        ({"coeff_mod_bit_sizes": [60]}, "needs at least 2 primes"),
        ({"poly_modulus_degree": 8192, "coeff_mod_bit_sizes": [61, 40]}, r"coeff_mod_bit_sizes\[0\] is 61 bits"),
        ({"coeff_mod_bit_sizes": [40, 49], "scale_bits": 40}, "scale_bits 40 must be below the first prime's 40 bits"),
        ({"poly_modulus_degree": 1024, "coeff_mod_bit_sizes": [20, 10]}, r"coeff_mod_bit_sizes\[1\] is 10 bits"),
        ({"extra": 1}, "Extra inputs are not permitted"),
    ],
)
def test_unusable_parameters_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        CkksParams(**fields)


# ---------------------------------------------------------------------------- headroom


def test_headroom_is_first_prime_minus_scale(params):
    assert ckks.headroom(params) == 2.0 ** 19
    assert ckks.per_silo_bound(params) == 2.0 ** 19 / 2 / 16
    assert ckks.headroom(CkksParams(poly_modulus_degree=8192, coeff_mod_bit_sizes=[60, 40, 40])) == 2.0 ** 19


def test_sums_just_under_headroom_decrypt_and_above_it_are_garbage(secret_ctx, agg_ctx, params):
    bound = ckks.headroom(params)
    # just under: two contributions of 0.495 * bound, one positive run and one mixed-sign
    signs = np.where(np.arange(P_LONG) % 3 == 0, -1.0, 1.0)
    parts = [np.full(P_LONG, 0.495 * bound), 0.495 * bound * signs]
    for vec in parts:
        summed = ckks.sum_encrypted(agg_ctx, [ckks.encrypt_vector(secret_ctx, vec)] * 2)
        _assert_close(ckks.decrypt_vector(secret_ctx, summed), 2 * vec)
    # far above: 16 silos of 1e5 sum to 1.6e6 > 2^19 = 524288, and decrypt to nonsense
    blob = ckks.encrypt_vector(secret_ctx, np.full(100, 1e5))
    overflowed = ckks.decrypt_vector(secret_ctx, ckks.sum_encrypted(agg_ctx, [blob] * 16))
    assert np.min(np.abs(overflowed - 1.6e6)) > 1e5
    assert np.max(np.abs(overflowed)) <= bound  # it wrapped around modulo q0


def test_check_bounds_refuses_without_revealing_values(secret_ctx, params):
    limit = ckks.per_silo_bound(params)
    vec = np.zeros(10)
    vec[[3, 7]] = 1.01 * limit
    with pytest.raises(PolicyError) as exc:
        ckks.check_bounds(vec, params)
    text = str(exc.value)
    assert "2 of 10 slots" in text and "index 3" in text and "16384" in text
    assert f"{1.01 * limit:g}" not in text and str(1.01 * limit) not in text
    with pytest.raises(PolicyError, match="1 of 3 slots"):
        ckks.check_bounds(np.array([0.0, np.nan, 1.0]), params)
    with pytest.raises(PolicyError, match="per-silo bound"):
        ckks.encrypt_vector(secret_ctx, vec, params=params)
    ckks.check_bounds(np.full(10, limit), params)  # the bound itself is allowed


def test_encrypt_refuses_what_no_slot_can_hold(secret_ctx):
    with pytest.raises(PolicyError, match="half of what one CKKS slot can hold"):
        ckks.encrypt_vector(secret_ctx, np.full(4, 3e5))
    with pytest.raises(PolicyError, match="non-empty flat vector"):
        ckks.encrypt_vector(secret_ctx, np.ones((2, 2)))


def test_raw_tenseal_chunks_are_summed_through_tenseal(secret_ctx, agg_ctx, params):
    """Format 1 as TenSEAL writes it (zstd frames) still sums; numpy-residue says why it can't."""
    values = np.linspace(-1, 1, 3000)
    blob = _format1(_tenseal_chunks(secret_ctx, values), 3000)
    with pytest.raises(PolicyError, match="numpy-residue needs the packed format 2"):
        ckks.sum_encrypted(agg_ctx, [blob, blob], method="numpy-residue")
    _assert_close(ckks.decrypt_vector(secret_ctx, ckks.sum_encrypted(agg_ctx, [blob, blob])), 2 * values)


def test_import_boundaries():
    """policies.ckks runs at the coordinator and the silos: it may not pull either side in."""
    code = (
        "import sys, policies.ckks, silo_node.keys; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'flwr', 'coordinator'}); "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parent.parent)
    code = "import sys, policies.ckks; assert 'silo_node' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parent.parent)


@pytest.mark.parametrize("p, k", [(10, 1), (2048, 2), (4101, 3), (9 * 2048 + 3, 5)])
def test_chunk_edges_sum_identically(secret_ctx, agg_ctx, params, p, k):
    """One contributor, exactly one full chunk, and a last chunk so short that its layout
    shifts (a 1-byte size field): the strided fast path must handle each."""
    contributions = _weights(np.random.default_rng(p), k, p)
    blobs = [ckks.encrypt_vector(secret_ctx, c, params=params) for c in contributions]
    by_numpy = ckks.sum_encrypted(agg_ctx, blobs, method="numpy-residue")
    assert by_numpy == ckks.sum_encrypted(agg_ctx, blobs, method="tenseal")
    _assert_close(ckks.decrypt_vector(secret_ctx, by_numpy), np.sum(contributions, axis=0))
