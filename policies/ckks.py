"""The CKKS contract shared by silos and the coordinator: parameters, packing, sums.

Silos encrypt `[a_k * w, a_k, 1]` (policies.update) under one study-wide CKKS secret key;
the coordinator only ever adds ciphertexts (multiplicative depth 0) with a context that
holds no secret key. Both sides import this module, so the rules live here once:

* parameters are refused at policy load unless they meet the HomomorphicEncryption.org
  128-bit table, so SEAL's own cryptic errors never reach a user;
* a per-silo value bound keeps the SUM of `max_silos` contributions inside the range a
  CKKS slot can hold (beyond it decryption silently returns garbage);
* a vector is packed densely, `slots` values per ciphertext, into one framed blob that
  carries no context (the coordinator loads its context once per study, not per message).

Wire format of a blob (little endian)::

    header  "FCKS" | u16 format | u16 flags (0) | u32 chunks | u32 slots | u64 values
    format 2 (packed, the default)
            4 x u64 parms_id | f64 scale | u8 SEAL major, minor | u8 primes | u8 polys
            | u32 seeds | per data prime q_l: chunks x polys x N residues packed into
            64-bit words' spare bits (policies.bitpack: 16 residues in 15 words at 60 bits)
            | seeds x 32-byte seeds
    format 1 (fallback) per chunk: u32 pad | u32 length | pad zero bytes | TenSEAL bytes

Format 2 carries residues and nothing else per chunk. Seeded (polys 1, the default), a
silo sends c0 and one seed from which anyone regenerates c1 (policies.seeds): 15 bytes a
parameter for N=4096, [60, 49] (one poly x 7.5 bytes per slot); unseeded (polys 2, no
seeds) 30, against TenSEAL's 32 plus framing. A silo rebuilds SEAL's serialisation from
it (policies.seal_format), expanding and adding the seeds to get c1, for TenSEAL to load
and decrypt; encrypt_vector checks on every blob that this rebuild gives TenSEAL's own
bytes back and otherwise sends format 1 (TenSEAL's serialisations, framed). The
coordinator adds format-2 blobs as residues with numpy ("numpy-residue") in their packed
form, a block at a time, lists the seeds, and writes the sum in format 2 again: it never
expands a seed and needs no key. TenSEAL stays the reference and the path for format 1,
and both give byte-identical sums. It should call `sum_encrypted_uint8` on the uint8
arrays Flower delivers: it copies nothing into `bytes` on the way in or out.
"""

from __future__ import annotations

import math
import struct
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal, Union

import numpy as np
import tenseal as ts
import tenseal.sealapi  # noqa: F401  registers seal::Modulus so context moduli can be read
from pydantic import BaseModel, ConfigDict, Field, model_validator

from policies import bitpack
from policies.errors import PolicyError
from policies.seal_format import VectorMeta, build_vector, parse_vector
from policies.seeds import SEED_BYTES, expand_sum, new_seed, reseed, shoup

# ---------------------------------------------------------------------------- parameters

#: HomomorphicEncryption.org security standard (Albrecht et al. 2018), ternary secret,
#: 128-bit classical security: the largest total coefficient modulus, in bits, per N.
HE_STANDARD_128_MAX_BITS: dict[int, int] = {
    1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881,
}
MAX_PRIME_BITS = 60  # SEAL's limit for one RNS prime

#: Every silo holds the study's secret key anyway, so public-key encryption buys nothing;
#: symmetric encryption is ~1.7x faster per ciphertext, adds less noise, makes the sealed
#: secret context 3x smaller (no public key) and leaves no key with which anyone but a
#: silo could encrypt. It also allows seeded ciphertexts (half the bytes), which TenSEAL
#: 0.3.18 does not emit: policies.seeds re-randomises its ciphertexts onto a seed.
ENCRYPTION_TYPE = ts.ENCRYPTION_TYPE.SYMMETRIC


class CkksParams(BaseModel):
    """CKKS parameters of a study; an insecure or unusable set fails when the policy loads."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    poly_modulus_degree: int = 4096
    coeff_mod_bit_sizes: list[int] = [60, 49]
    scale_bits: int = Field(40, ge=1)
    max_silos: int = Field(16, ge=1, le=1 << 20)
    key_holder: str | None = None  # the silo that makes the study key (default: the first to enrol)

    @model_validator(mode="after")
    def _secure(self) -> "CkksParams":
        check_security(self)
        return self


def check_security(params: CkksParams) -> None:
    """Refuse parameters below 128-bit security or that SEAL/TenSEAL would reject.

    Raises PolicyError naming the rule, e.g. "N=4096 allows at most 109 bits of coefficient
    modulus for 128-bit security; [60, 50] has 110".
    """
    n, bits = params.poly_modulus_degree, list(params.coeff_mod_bit_sizes)
    if n not in HE_STANDARD_128_MAX_BITS:
        known = ", ".join(str(k) for k in HE_STANDARD_128_MAX_BITS)
        raise PolicyError(f"poly_modulus_degree {n} is not one of {known} (the HomomorphicEncryption.org table)")
    if len(bits) < 2:
        raise PolicyError(
            f"coeff_mod_bit_sizes {bits} needs at least 2 primes: a data prime and SEAL's special prime"
        )
    lowest = int(math.log2(2 * n)) + 1  # a prime = 1 mod 2N is larger than 2N
    for i, b in enumerate(bits):
        if not lowest <= b <= MAX_PRIME_BITS:
            raise PolicyError(
                f"coeff_mod_bit_sizes[{i}] is {b} bits; each prime must have {lowest} to {MAX_PRIME_BITS} bits at N={n}"
            )
    limit = HE_STANDARD_128_MAX_BITS[n]
    if sum(bits) > limit:
        raise PolicyError(
            f"N={n} allows at most {limit} bits of coefficient modulus for 128-bit security; {bits} has {sum(bits)}"
        )
    if params.scale_bits >= bits[0]:
        raise PolicyError(
            f"scale_bits {params.scale_bits} must be below the first prime's {bits[0]} bits, or no value fits a slot"
        )


def slots(params: CkksParams) -> int:
    """Real values per ciphertext: CKKS packs N/2 slots."""
    return params.poly_modulus_degree // 2


def headroom(params: CkksParams) -> float:
    """Largest |value| a summed slot may hold and still decrypt: 2^(q0 - scale - 1).

    A depth-0 ciphertext decrypts modulo the data primes; a slot value v becomes
    coefficients of size at most |v| * 2^scale, which must stay below q0 / 2. Using the
    first prime only is exact for the default [60, 49] (its only data prime) and a safe
    lower bound when there are more data primes.
    """
    return 2.0 ** (params.coeff_mod_bit_sizes[0] - params.scale_bits - 1)


def per_silo_bound(params: CkksParams) -> float:
    """What one contribution may hold: half the headroom (safety factor) over max_silos."""
    return headroom(params) / 2.0 / params.max_silos


def check_bounds(vec: np.ndarray, params: CkksParams) -> None:
    """Refuse a vector whose sum over `max_silos` silos could overflow a slot.

    The message names how many slots and the first index, never the values (they are
    the silo's private update).
    """
    _check_bound(np.asarray(vec, dtype=np.float64), per_silo_bound(params),
                 f"half the CKKS headroom {headroom(params):g} shared by max_silos={params.max_silos}")


def _check_bound(vec: np.ndarray, bound: float, why: str) -> None:
    bad = ~(np.abs(vec) <= bound)  # NaN and inf are out of bounds too
    if bad.any():
        idx = np.flatnonzero(bad)
        raise PolicyError(
            f"{len(idx)} of {vec.size} slots (first at index {int(idx[0])}) are not finite or exceed the "
            f"per-silo bound {bound:g} ({why}); scale the update down before encrypting"
        )


# ---------------------------------------------------------------------------- contexts

Blob = Union[bytes, bytearray, memoryview, np.ndarray]


def new_secret_context(params: CkksParams) -> ts.Context:
    """A fresh study key (made at one silo in the key ceremony), scale 2^scale_bits."""
    check_security(params)
    try:
        ctx = ts.context(ts.SCHEME_TYPE.CKKS, params.poly_modulus_degree,
                         coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes), encryption_type=ENCRYPTION_TYPE)
    except (ValueError, RuntimeError, TypeError):
        raise PolicyError(
            f"SEAL cannot build CKKS parameters N={params.poly_modulus_degree}, "
            f"coeff_mod_bit_sizes={list(params.coeff_mod_bit_sizes)} (not enough primes of those sizes?)"
        ) from None
    ctx.global_scale = 2.0 ** params.scale_bits
    return ctx


def has_secret_key(ctx: ts.Context) -> bool:
    return bool(ctx.is_private())


def _has_public_key(ctx: ts.Context) -> bool:
    try:
        return bool(ctx.has_public_key())
    except ValueError:  # TenSEAL raises for symmetric contexts: there is none
        return False


def secret_context_bytes(ctx: ts.Context) -> bytes:
    """The study secret for sealing to other silos: secret key (+ public key if any), no
    relinearisation or Galois keys (depth 0 needs neither; they would triple the size)."""
    if not has_secret_key(ctx):
        raise PolicyError("this context holds no secret key: only the key-ceremony silo can export the study secret")
    return ctx.serialize(save_public_key=_has_public_key(ctx), save_secret_key=True,
                         save_galois_keys=False, save_relin_keys=False)


def aggregator_context_bytes(ctx: ts.Context) -> bytes:
    """Everything the coordinator gets: parameters and scale, no keys at all (adding needs none)."""
    out = ctx.serialize(save_public_key=False, save_secret_key=False, save_galois_keys=False, save_relin_keys=False)
    if load_context(out).is_private():  # defence in depth: never ship a secret by accident
        raise PolicyError("internal error: the aggregator context would contain the secret key")
    return out


def load_context(b: bytes, params: CkksParams | None = None) -> ts.Context:
    """Load a serialized context; with `params`, refuse one made for other parameters."""
    try:
        ctx = ts.context_from(bytes(b))
    except (ValueError, RuntimeError, TypeError):
        raise PolicyError("not a serialized TenSEAL CKKS context (corrupt or wrong file)") from None
    if params is not None:
        _check_context_params(ctx, params)
    return ctx


def context_params(ctx: ts.Context) -> tuple[int, list[int], float]:
    """(N, coefficient modulus bit sizes, global scale) of a context, read from SEAL."""
    key_level = ctx.seal_context().data.key_context_data().parms()
    bits = [m.bit_count() for m in key_level.coeff_modulus()]
    return key_level.poly_modulus_degree(), bits, float(ctx.global_scale)


def _check_context_params(ctx: ts.Context, params: CkksParams) -> None:
    n, bits, scale = context_params(ctx)
    want = (params.poly_modulus_degree, list(params.coeff_mod_bit_sizes), 2.0 ** params.scale_bits)
    if (n, bits, scale) != want:
        raise PolicyError(
            f"the CKKS context has N={n}, coeff_mod_bit_sizes={bits}, scale 2^{math.log2(scale):g}; "
            f"the study requires N={want[0]}, {want[1]}, 2^{params.scale_bits}"
        )


def _context_slots(ctx: ts.Context) -> int:
    return ctx.seal_context().data.first_context_data().parms().poly_modulus_degree() // 2


def _data_moduli(ctx: ts.Context) -> list[int]:
    """The primes a fresh ciphertext lives under (all but SEAL's special prime)."""
    return [m.value() for m in ctx.seal_context().data.first_context_data().parms().coeff_modulus()]


def _context_headroom(ctx: ts.Context) -> float:
    return _data_moduli(ctx)[0] / 2.0 / float(ctx.global_scale)


# ---------------------------------------------------------------------------- wire format

MAGIC = b"FCKS"
FORMAT_TENSEAL = 1  # framed TenSEAL serialisations: the fallback, summed through TenSEAL
FORMAT_PACKED = 2  # bit-packed residues: the default, summed with numpy
FORMAT_VERSION = FORMAT_PACKED
_HEADER = struct.Struct("<4sHHIIQ")  # magic, format, flags, chunks, slots, values
_PACKED = struct.Struct("<4QdBBBBI")  # parms_id, scale, SEAL major, minor, primes, polys, seeds
_RECORD = struct.Struct("<II")  # format 1: pad, length of each chunk
_PACKED_DATA_AT = _HEADER.size + _PACKED.size


def _chunk_lengths(values: int, n_slots: int) -> list[int]:
    return [min(n_slots, values - i) for i in range(0, values, n_slots)]


def _as_view(blob: Blob) -> memoryview:
    view = memoryview(blob)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


@dataclass(frozen=True)
class _Head:
    """The common header of both formats."""

    version: int
    chunks: int
    slots: int
    values: int


def _read_head(blob: memoryview, what: str) -> _Head:
    """Magic, format and counts, checked; every error names `what` (which blob)."""
    if len(blob) < _HEADER.size:
        raise PolicyError(f"{what}: too short to be an encrypted update ({len(blob)} bytes)")
    magic, version, flags, n_chunks, n_slots, values = _HEADER.unpack_from(blob, 0)
    if magic != MAGIC:
        raise PolicyError(f"{what}: not a fedcohort CKKS blob (bad magic)")
    if version not in (FORMAT_TENSEAL, FORMAT_PACKED) or flags != 0:
        raise PolicyError(f"{what}: CKKS blob format {version} (flags {flags}) is not supported; expected "
                          f"{FORMAT_PACKED} (or {FORMAT_TENSEAL})")
    if n_slots == 0 or values == 0 or n_chunks != -(-values // n_slots):
        raise PolicyError(f"{what}: header says {values} values in {n_chunks} chunks of {n_slots} slots, which is inconsistent")
    return _Head(version, n_chunks, n_slots, values)


# -- format 1: header, then per chunk u32 pad | u32 length | pad zero bytes | TenSEAL bytes


def _frame(chunks: Sequence[bytes], n_slots: int, values: int) -> bytes:
    parts = [_HEADER.pack(MAGIC, FORMAT_TENSEAL, 0, len(chunks), n_slots, values)]
    for data in chunks:
        parts += [_RECORD.pack(0, len(data)), data]
    return b"".join(parts)


def _records(blob: memoryview, head: _Head, what: str) -> list[tuple[int, int]]:
    """(offset, length) of each TenSEAL chunk of a format-1 blob, bounds-checked."""
    records, pos = [], _HEADER.size
    for i in range(head.chunks):
        if pos + _RECORD.size > len(blob):
            raise PolicyError(f"{what}: truncated before chunk {i} of {head.chunks}")
        pad, length = _RECORD.unpack_from(blob, pos)
        start = pos + _RECORD.size + pad
        if pad > 7 or length == 0 or start + length > len(blob):
            raise PolicyError(f"{what}: chunk {i} of {head.chunks} is truncated or malformed")
        records.append((start, length))
        pos = start + length
    if pos != len(blob):
        raise PolicyError(f"{what}: {len(blob) - pos} unexpected bytes after the last chunk")
    return records


# -- format 2: header | parms_id, scale, SEAL version, primes, polys, seeds | per prime l:
#    chunks x polys x N residues packed into 64-bit words' spare bits (policies.bitpack)
#    | seeds x 32-byte seeds. polys = 2: (c0, c1), no seeds. polys = 1: seeded, c0 only,
#    and c1 = the sum of the seeds' expansions (policies.seeds): one seed for a silo's
#    update, K for a sum of K updates.


@dataclass(frozen=True)
class _Packed:
    """A format-2 blob's header, checked against the study context, and its layout."""

    head: _Head
    meta: VectorMeta  # SEAL's view of a full chunk (size 2); `values` is each chunk's but the last
    polys: int  # polynomials sent: 2, or 1 when seeded
    seeds: int
    moduli: tuple[int, ...]
    packings: tuple[bitpack.Packing, ...]
    offsets: tuple[int, ...]  # where each prime's packed residues start, then the seeds
    length: int  # of the whole blob

    @property
    def count(self) -> int:
        """Residues sent per prime: chunks x polys x N."""
        return self.head.chunks * self.polys * self.meta.n

    def chunk_meta(self, c: int) -> VectorMeta:
        return replace(self.meta, values=min(self.head.slots, self.head.values - c * self.head.slots))

    def words(self, buf: np.ndarray, level: int) -> np.ndarray:
        """Prime `level`'s packed residues in the uint8 blob `buf`, as (G, cols) words (a view)."""
        start = self.offsets[level]
        return self.packings[level].view(buf[start:start + self.packings[level].nbytes(self.count)], self.count)

    def seed_list(self, buf: np.ndarray | memoryview) -> list[bytes]:
        start = self.offsets[-1]
        return [bytes(buf[start + i * SEED_BYTES:start + (i + 1) * SEED_BYTES]) for i in range(self.seeds)]

    def header(self) -> bytes:
        m = self.meta
        return (_HEADER.pack(MAGIC, FORMAT_PACKED, 0, self.head.chunks, self.head.slots, self.head.values)
                + _PACKED.pack(*m.parms_id, m.scale, *m.version, m.levels, self.polys, self.seeds))


def _packed_layout(head: _Head, meta: VectorMeta, moduli: Sequence[int], seeds: int) -> _Packed:
    packings = tuple(bitpack.Packing(q.bit_length()) for q in moduli)
    polys = 1 if seeds else 2
    count = head.chunks * polys * meta.n
    offsets, pos = [], _PACKED_DATA_AT
    for packing in packings:
        offsets.append(pos)
        pos += packing.nbytes(count)
    offsets.append(pos)
    return _Packed(head, meta, polys, seeds, tuple(moduli), packings, tuple(offsets), pos + SEED_BYTES * seeds)


def _read_packed(ctx: ts.Context, blob: memoryview, head: _Head, what: str) -> _Packed:
    """A format-2 blob's layout, refused unless it is a fresh ciphertext of this study's
    parameters (parms_id, slots, primes, scale) and exactly as long as that layout."""
    if len(blob) < _PACKED_DATA_AT:
        raise PolicyError(f"{what}: truncated inside the header ({len(blob)} bytes)")
    *parms_id, scale, major, minor, levels, polys, seeds = _PACKED.unpack_from(blob, _HEADER.size)
    _check_frame_slots(head.slots, _context_slots(ctx), what)
    moduli = _data_moduli(ctx)
    if tuple(parms_id) != _first_parms_id(ctx) or levels != len(moduli):
        raise PolicyError(f"{what}: encrypted under other CKKS parameters than this study's context")
    if (polys, bool(seeds)) not in ((2, False), (1, True)):
        raise PolicyError(f"{what}: not a fresh CKKS ciphertext ({polys} polynomials, {seeds} seeds)")
    if scale != float(ctx.global_scale):
        raise PolicyError(f"{what}: scale 2^{math.log2(scale) if scale > 0 else float('nan'):g} is not the study's "
                          f"2^{math.log2(ctx.global_scale):g}")
    meta = VectorMeta(head.slots, scale, (major, minor), tuple(parms_id), 1, 2, 2 * head.slots, levels, scale, 1)
    packed = _packed_layout(head, meta, moduli, seeds)
    if len(blob) != packed.length:
        kind = "truncated" if len(blob) < packed.length else "too long"
        raise PolicyError(f"{what}: {kind}: {len(blob)} bytes, its header implies {packed.length}")
    return packed


def _first_parms_id(ctx: ts.Context) -> tuple[int, ...]:
    return tuple(ctx.seal_context().data.first_parms_id())


_RESEED_ROWS = 16  # ciphertexts re-randomised per numpy pass


class _Fresh:
    """Seeding for _pack: re-randomise onto a new seed (needs the secret key)."""


FRESH_SEED = _Fresh()
Seeding = Union[None, _Fresh, Sequence[bytes]]  # None: send c1; FRESH_SEED; seeds c1 already sums to


def _pack(ctx: ts.Context, serialised: Sequence[bytes], n_slots: int, values: int, seeding: Seeding = None) -> bytes:
    """TenSEAL's serialisations of the chunks of one vector as a format-2 blob.

    `seeding`: None sends (c0, c1); FRESH_SEED re-randomises onto a new seed so only c0
    travels (policies.seeds; the context must hold the secret key); a list of seeds
    states that c1 already is their expansions' sum (a sum of seeded blobs), checked.
    Raises ValueError (the caller falls back to format 1) when a serialisation is not in
    the layout this module knows, or rebuilding the first one does not give TenSEAL's own
    bytes back: that check runs on every blob, so a TenSEAL upgrade cannot corrupt updates.
    """
    head = _Head(FORMAT_PACKED, len(serialised), n_slots, values)
    parsed = [parse_vector(s) for s in serialised]
    meta = replace(parsed[0][0], values=n_slots)
    lengths = _chunk_lengths(values, n_slots)
    for (m, _), expected in zip(parsed, lengths):
        if replace(m, values=n_slots) != meta or m.values != expected:
            raise ValueError("chunks of one vector differ in their ciphertext metadata")
    if (meta.size, meta.ntt, meta.correction, meta.proto_scale) != (2, 1, 1, meta.scale) \
            or meta.parms_id != _first_parms_id(ctx) or meta.n != 2 * n_slots:
        raise ValueError("not a fresh ciphertext at the study's first level")
    if ts.ckks_vector_from(ctx, build_vector(parsed[0][0], parsed[0][1])).serialize() != bytes(serialised[0]):
        raise ValueError("rebuilding TenSEAL's serialisation does not round-trip")
    residues = np.stack([r for _, r in parsed], axis=2)  # (polys, primes, chunks, N)
    moduli = _data_moduli(ctx)
    seeds = [new_seed()] if isinstance(seeding, _Fresh) else list(seeding or [])
    if seeds:
        residues = _seeded(ctx, residues, moduli, seeds, fresh=isinstance(seeding, _Fresh))
    packed = _packed_layout(head, meta, moduli, len(seeds))
    out = np.empty(packed.length, dtype=np.uint8)
    out[:_PACKED_DATA_AT] = np.frombuffer(packed.header(), dtype=np.uint8)
    for level, packing in enumerate(packed.packings):
        packed.words(out, level)[...] = packing.pack(residues[:, level].transpose(1, 0, 2))  # chunk, poly, coeff
    out[packed.offsets[-1]:] = np.frombuffer(b"".join(seeds), dtype=np.uint8)
    return out.tobytes()


def _seeded(ctx: ts.Context, residues: np.ndarray, moduli: list[int], seeds: list[bytes], fresh: bool) -> np.ndarray:
    """c0 (shape (1, primes, chunks, N)) of the seeded form of (c0, c1) = residues."""
    chunks, n = residues.shape[2], residues.shape[3]
    secret = _secret_multipliers(ctx) if fresh else None
    c0 = np.empty_like(residues[:1])
    for level, q in enumerate(moduli):
        a = expand_sum(seeds, q, level, chunks * n).reshape(chunks, n)
        if fresh:
            s, s_shoup = secret[level]
            for r in range(0, chunks, _RESEED_ROWS):  # in blocks, so the temporaries stay in cache
                rows = slice(r, r + _RESEED_ROWS)
                c0[0, level, rows] = reseed(residues[0, level, rows], residues[1, level, rows], s, s_shoup, a[rows], q)
        elif not np.array_equal(residues[1, level], a):
            raise ValueError("c1 is not the sum of the seeds' expansions")
        else:
            c0[0, level] = residues[0, level]
    return c0


_MULTIPLIERS: "weakref.WeakKeyDictionary[ts.Context, list[tuple[np.ndarray, np.ndarray]]]" = weakref.WeakKeyDictionary()


def _secret_multipliers(ctx: ts.Context) -> list[tuple[np.ndarray, np.ndarray]]:
    """(s, shoup(s)) per data prime, kept in memory for as long as the context lives:
    reading the key costs N pybind calls, far more than re-randomising a small update."""
    if ctx not in _MULTIPLIERS:
        secret = _secret_residues(ctx)
        _MULTIPLIERS[ctx] = [(secret[level], shoup(secret[level], q)) for level, q in enumerate(_data_moduli(ctx))]
    return _MULTIPLIERS[ctx]


def _secret_residues(ctx: ts.Context) -> np.ndarray:
    """The secret key s in NTT form, one row of N residues per data prime (silos only)."""
    if not has_secret_key(ctx):
        raise PolicyError("this context holds no secret key: only a silo can make seeded ciphertexts")
    key = ctx.secret_key().data.data()
    n, levels = 2 * _context_slots(ctx), len(_data_moduli(ctx))
    if not key.is_ntt_form() or key.coeff_count() < n * levels:
        raise ValueError("the secret key is not in the NTT layout seeded ciphertexts need")
    return np.array([key.data(i) for i in range(n * levels)], dtype=np.uint64).reshape(levels, n)


def _residues(view: memoryview, packed: _Packed) -> np.ndarray:
    """The (c0, c1) residues of a format-2 blob, reduced, as (chunks, 2, primes, N) uint64;
    a seeded blob's c1 is its seeds' expansions summed."""
    buf = np.frombuffer(view, dtype=np.uint8)
    m, chunks = packed.meta, packed.head.chunks
    out = np.empty((chunks, 2, m.levels, m.n), dtype=np.uint64)
    seeds = packed.seed_list(buf)
    for level, (packing, q) in enumerate(zip(packed.packings, packed.moduli)):
        flat = np.remainder(packing.unpack(packed.words(buf, level), packed.count), np.uint64(q))
        out[:, :packed.polys, level] = flat.reshape(chunks, packed.polys, m.n)
        if seeds:
            out[:, 1, level] = expand_sum(seeds, q, level, chunks * m.n).reshape(chunks, m.n)
    return out


# ---------------------------------------------------------------------------- encrypt / decrypt


def encrypt_vector(ctx: ts.Context, vec: np.ndarray, *, params: CkksParams | None = None,
                   seeded: bool = True) -> bytes:
    """Encrypt a flat float64 vector densely (`slots` values per ciphertext) into one blob.

    With `params`, refuse values the sum of `max_silos` silos could overflow (check_bounds);
    without, still refuse values one ciphertext cannot hold, and NaN/inf. The blob is in
    the packed format 2, seeded (c0 and a seed: half the bytes) unless `seeded` is False,
    or format 1 if TenSEAL's serialisation is not the one we know.
    """
    if not has_secret_key(ctx):
        raise PolicyError("this context holds no secret key: only a silo can encrypt an update")
    flat = np.asarray(vec, dtype=np.float64)
    if flat.ndim != 1 or flat.size == 0:
        raise PolicyError(f"an update must be a non-empty flat vector, got shape {flat.shape}")
    if params is not None:
        check_bounds(flat, params)
    else:
        _check_bound(flat, _context_headroom(ctx) / 2.0, "half of what one CKKS slot can hold")
    n_slots = _context_slots(ctx)
    serialised = [ts.ckks_vector(ctx, flat[i:i + n_slots]).serialize() for i in range(0, flat.size, n_slots)]
    try:
        return _pack(ctx, serialised, n_slots, flat.size, FRESH_SEED if seeded else None)
    except ValueError:  # includes seal_format.Compressed
        return _frame(serialised, n_slots, flat.size)


def decrypt_vector(ctx: ts.Context, blob: Blob) -> np.ndarray:
    """Decrypt a blob (a silo's own update or a sum) with the study's secret context."""
    if not has_secret_key(ctx):
        raise PolicyError("this context holds no secret key: the coordinator cannot decrypt")
    view = _as_view(blob)
    head = _read_head(view, "encrypted vector")
    _check_frame_slots(head.slots, _context_slots(ctx), "encrypted vector")
    out = np.empty(head.values, dtype=np.float64)
    for i, vec in enumerate(_tenseal_vectors(ctx, view, head, "encrypted vector")):
        out[i * head.slots:i * head.slots + vec.size()] = vec.decrypt()
    return out


def _tenseal_vectors(ctx: ts.Context, view: memoryview, head: _Head, what: str) -> list[ts.CKKSVector]:
    """The blob's chunks loaded through TenSEAL (SEAL validates each), either format."""
    expected = _chunk_lengths(head.values, head.slots)
    if head.version == FORMAT_PACKED:
        packed = _read_packed(ctx, view, head, what)
        residues = _residues(view, packed)
        chunks = [build_vector(packed.chunk_meta(c), residues[c]) for c in range(head.chunks)]
    else:
        chunks = [view[start:start + length] for start, length in _records(view, head, what)]
    vectors = []
    for c, (chunk, size) in enumerate(zip(chunks, expected)):
        vec = _load_tenseal(ctx, chunk, f"{what}, chunk {c}")
        if vec.size() != size:
            raise PolicyError(f"{what}, chunk {c}: holds {vec.size()} values, expected {size}")
        vectors.append(vec)
    return vectors


def _check_frame_slots(n_slots: int, context_slots: int, what: str) -> None:
    if n_slots != context_slots:
        raise PolicyError(f"{what}: packed {n_slots} slots per ciphertext; this study's context has {context_slots}")


def _load_tenseal(ctx: ts.Context, chunk: bytes | memoryview, what: str) -> ts.CKKSVector:
    try:
        return ts.ckks_vector_from(ctx, bytes(chunk))
    except (ValueError, RuntimeError, TypeError):
        raise PolicyError(f"{what}: not a CKKS ciphertext for this study's parameters") from None


# ---------------------------------------------------------------------------- sums

SumMethod = Literal["auto", "tenseal", "numpy-residue"]


def sum_encrypted(aggregator_ctx: ts.Context, blobs: Sequence[Blob], *, method: SumMethod = "auto") -> bytes:
    """Add encrypted vectors (depth 0, no key needed): the coordinator's whole job.

    Every blob must pack the same number of values; a malformed or mismatched one is
    refused with a PolicyError naming its index. `method`: "tenseal" loads every
    ciphertext through TenSEAL (the reference); "numpy-residue" unpacks the format-2
    residues and adds them modulo each prime (byte-identical result, many times faster);
    "auto" uses numpy-residue when every blob is in format 2, else TenSEAL.
    """
    summed = _sum(aggregator_ctx, blobs, method)
    return summed if isinstance(summed, bytes) else summed.tobytes()


def sum_encrypted_uint8(aggregator_ctx: ts.Context, blobs: Sequence[Blob], *, method: SumMethod = "auto") -> np.ndarray:
    """sum_encrypted for Flower transport: takes bytes or uint8 arrays (not copied) and
    returns the sum as a uint8 array, skipping a copy of the whole sum into `bytes`."""
    summed = _sum(aggregator_ctx, blobs, method)
    return np.frombuffer(summed, dtype=np.uint8) if isinstance(summed, bytes) else summed


def _sum(ctx: ts.Context, blobs: Sequence[Blob], method: SumMethod) -> bytes | np.ndarray:
    if method not in ("auto", "tenseal", "numpy-residue"):
        raise PolicyError(f"unknown sum method {method!r}; use 'auto', 'tenseal' or 'numpy-residue'")
    if not blobs:
        raise PolicyError("nothing to sum: no encrypted contributions")
    views = [_as_view(b) for b in blobs]
    heads = [_read_head(v, f"contribution [{i}]") for i, v in enumerate(views)]
    _check_frame_slots(heads[0].slots, _context_slots(ctx), "contribution [0]")
    for i, head in enumerate(heads[1:], start=1):
        if (head.slots, head.values) != (heads[0].slots, heads[0].values):
            raise PolicyError(
                f"contribution [{i}] holds {head.values} values in chunks of {head.slots}, contribution [0] "
                f"{heads[0].values} in chunks of {heads[0].slots}: updates of different models cannot be summed"
            )
    old = [i for i, h in enumerate(heads) if h.version != FORMAT_PACKED]
    if old and method == "numpy-residue":
        raise PolicyError(f"contribution [{old[0]}] is in format {FORMAT_TENSEAL} (TenSEAL's own serialisation): "
                          f"numpy-residue needs the packed format {FORMAT_PACKED}")
    if old:
        return _frame([v.serialize() for v in _sum_tenseal(ctx, views, heads)], heads[0].slots, heads[0].values)
    packed = [_read_packed(ctx, v, h, f"contribution [{i}]") for i, (v, h) in enumerate(zip(views, heads))]
    for i, p in enumerate(packed[1:], start=1):
        if p.meta.version != packed[0].meta.version:
            raise PolicyError(f"contribution [{i}]: SEAL format {p.meta.version} differs from contribution [0]'s")
        if p.polys != packed[0].polys:
            raise PolicyError(f"contribution [{i}] is {'' if p.seeds else 'not '}seeded, contribution [0] "
                              f"{'is' if packed[0].seeds else 'is not'}: seeded and full ciphertexts are not summed together")
    seeds = [s for p, v in zip(packed, views) for s in p.seed_list(v)]
    if method == "tenseal":  # the reference: expands the seeds, which the numpy path never does
        summed = [v.serialize() for v in _sum_tenseal(ctx, views, heads)]
        return _pack(ctx, summed, heads[0].slots, heads[0].values, seeds or None)
    return _sum_packed(views, packed, seeds)


def _sum_tenseal(ctx: ts.Context, views: list[memoryview], heads: list[_Head]) -> list[ts.CKKSVector]:
    """The reference: load every ciphertext through TenSEAL (SEAL validates it) and add."""
    total = None
    for i, (view, head) in enumerate(zip(views, heads)):
        vectors = _tenseal_vectors(ctx, view, head, f"contribution [{i}]")
        if total is None:
            total = vectors
            continue
        for c, (acc, vec) in enumerate(zip(total, vectors)):
            try:
                acc.add_(vec)
            except (ValueError, RuntimeError):
                raise PolicyError(f"contribution [{i}], chunk {c}: cannot be added (scale or level differs)") from None
    return total


def _sum_packed(views: list[memoryview], packed: list[_Packed], seeds: list[bytes]) -> np.ndarray:
    """Add format-2 blobs without TenSEAL: (c0, c1) of a sum are the sums of the (c0, c1)
    modulo each prime, which is all SEAL's add does for same-scale, same-level inputs.
    The residues are added in their packed form (bitpack.Packing.sum_mod) and the sum is
    written in format 2 again; a residue >= q (never written by a silo) is the same
    ciphertext as its reduction, so it is simply reduced. Seeded blobs: their c0 are
    added and their seeds listed (c1 is the seeds' expansions summed, which the silos do)."""
    first = packed[0]
    layout = _packed_layout(first.head, first.meta, first.moduli, len(seeds))
    out = np.empty(layout.length, dtype=np.uint8)
    out[:_PACKED_DATA_AT] = np.frombuffer(layout.header(), dtype=np.uint8)
    bufs = [np.frombuffer(v, dtype=np.uint8) for v in views]
    for level, (packing, q) in enumerate(zip(layout.packings, layout.moduli)):
        packing.sum_mod([p.words(b, level) for p, b in zip(packed, bufs)], q, layout.words(out, level))
    out[layout.offsets[-1]:] = np.frombuffer(b"".join(seeds), dtype=np.uint8)
    return out


# ---------------------------------------------------------------------------- transport


def blob_as_uint8(blob: bytes) -> np.ndarray:
    """A blob as the 1-D uint8 array Flower's ArrayRecord carries (no copy)."""
    return np.frombuffer(blob, dtype=np.uint8)


def uint8_as_blob(arr: np.ndarray) -> bytes:
    """Back from Flower's uint8 array to bytes (sum_encrypted also takes the array itself)."""
    arr = np.asarray(arr)
    if arr.dtype != np.uint8 or arr.ndim != 1:
        raise PolicyError(f"an encrypted update travels as a 1-D uint8 array, got {arr.dtype} {arr.shape}")
    return arr.tobytes()
