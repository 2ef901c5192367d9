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

    header  "FCKS" | u16 format version | u16 flags (0) | u32 chunks | u32 slots | u64 values
    chunk   u32 pad | u32 length | pad zero bytes | TenSEAL CKKSVector serialization

Each chunk is what `tenseal.ckks_vector_from` loads. Where possible it is rewritten with
SEAL compression "none" (TenSEAL writes zstd frames that, for the default parameters,
only hold stored blocks) and padded so its residues start 8-byte aligned. That lets the
coordinator add ciphertexts as uint64 residues with numpy ("numpy-residue") instead of
deserialising every ciphertext through TenSEAL; both paths give byte-identical sums, and
the TenSEAL one stays the reference. The coordinator should call `sum_encrypted_uint8` on
the uint8 arrays Flower delivers: it copies nothing into `bytes` on the way in or out.
"""

from __future__ import annotations

import functools
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal, Union

import numpy as np
import tenseal as ts
import tenseal.sealapi  # noqa: F401  registers seal::Modulus so context moduli can be read
from pydantic import BaseModel, ConfigDict, Field, model_validator

from policies.errors import PolicyError

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
#: silo could encrypt. TenSEAL 0.3.18 does not emit seeded ciphertexts, so the wire size
#: is the same as asymmetric (measured with TenSEAL 0.3.18 while choosing the scheme).
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
FORMAT_VERSION = 1
_HEADER = struct.Struct("<4sHHIIQ")
_RECORD = struct.Struct("<II")
_SEAL_HEADER = struct.Struct("<HBBBBHQ")  # magic, header size, major, minor, compr mode, reserved, size
_SEAL_MAGIC = 0xA15E
_CT_HEAD = struct.Struct("<4QB")  # parms_id, is_ntt_form
_CT_DIMS = struct.Struct("<QQQdQ")  # size, N, coeff_modulus_size, scale, correction_factor
_U64 = struct.Struct("<Q")
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


@dataclass(frozen=True)
class _Frame:
    slots: int
    values: int
    records: tuple[tuple[int, int], ...]  # (offset, length) of each chunk in the blob


def _chunk_lengths(values: int, n_slots: int) -> list[int]:
    return [min(n_slots, values - i) for i in range(0, values, n_slots)]


def _place(chunks: Sequence[tuple[int, int | None]]) -> tuple[list[tuple[int, int]], int]:
    """(record position, pad) of each chunk given (length, residue offset), and the blob
    length: pads put known residue offsets on 8-byte boundaries for aligned numpy views."""
    places, pos = [], _HEADER.size
    for length, data_offset in chunks:
        pad = 0 if data_offset is None else -(pos + _RECORD.size + data_offset) % 8
        places.append((pos, pad))
        pos += _RECORD.size + pad + length
    return places, pos


def _frame(chunks: Sequence[tuple[bytes, int | None]], n_slots: int, values: int) -> bytes:
    """Header then length-prefixed, aligned chunks (see the module docstring)."""
    places, _ = _place([(len(data), at) for data, at in chunks])
    parts = [_HEADER.pack(MAGIC, FORMAT_VERSION, 0, len(chunks), n_slots, values)]
    for (data, _), (_, pad) in zip(chunks, places):
        parts += [_RECORD.pack(pad, len(data)), b"\0" * pad, data]
    return b"".join(parts)


def _read_frame(blob: memoryview, what: str) -> _Frame:
    """Parse and bounds-check a blob's framing; every error names `what` (which blob)."""
    if len(blob) < _HEADER.size:
        raise PolicyError(f"{what}: too short to be an encrypted update ({len(blob)} bytes)")
    magic, version, flags, n_chunks, n_slots, values = _HEADER.unpack_from(blob, 0)
    if magic != MAGIC:
        raise PolicyError(f"{what}: not a fedcohort CKKS blob (bad magic)")
    if version != FORMAT_VERSION or flags != 0:
        raise PolicyError(f"{what}: CKKS blob format {version} (flags {flags}) is not supported; expected {FORMAT_VERSION}")
    if n_slots == 0 or values == 0 or n_chunks != -(-values // n_slots):
        raise PolicyError(f"{what}: header says {values} values in {n_chunks} chunks of {n_slots} slots, which is inconsistent")
    records, pos = [], _HEADER.size
    for i in range(n_chunks):
        if pos + _RECORD.size > len(blob):
            raise PolicyError(f"{what}: truncated before chunk {i} of {n_chunks}")
        pad, length = _RECORD.unpack_from(blob, pos)
        start = pos + _RECORD.size + pad
        if pad > 7 or length == 0 or start + length > len(blob):
            raise PolicyError(f"{what}: chunk {i} of {n_chunks} is truncated or malformed")
        records.append((start, length))
        pos = start + length
    if pos != len(blob):
        raise PolicyError(f"{what}: {len(blob) - pos} unexpected bytes after the last chunk")
    return _Frame(n_slots, values, tuple(records))


def _as_view(blob: Blob) -> memoryview:
    view = memoryview(blob)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


# -- the TenSEAL / SEAL serialization of one chunk (parsed only to add residues directly)


@dataclass(frozen=True)
class _Cipher:
    """One chunk as the numpy path sees it: metadata plus where its residues are."""

    values: int  # slots used (CKKSVectorProto.sizes)
    proto_scale: float  # CKKSVectorProto.scale
    version: tuple[int, int]  # SEAL serialization version
    parms_id: tuple[int, int, int, int]
    ntt: int
    size: int  # polynomials (2 for a fresh ciphertext)
    n: int
    levels: int
    scale: float
    correction: int
    data: memoryview  # size * levels * n little-endian uint64 residues
    data_offset: int | None  # offset of `data` in the chunk if stored uncompressed


class _Compressed(ValueError):
    """A well-formed chunk whose residues zstd really compressed: TenSEAL must add it."""


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated varint")
        byte = buf[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not byte & 0x80:
            return value, pos


def _put_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _parse_proto(buf: memoryview) -> tuple[list[int], int, int, float]:
    """CKKSVectorProto: (sizes, ciphertext offset, ciphertext length, scale); one ciphertext."""
    sizes: list[int] = []
    ct: list[tuple[int, int]] = []
    scale, pos = None, 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos)
        field, wire = tag >> 3, tag & 7
        if field == 1 and wire == 2:
            length, pos = _varint(buf, pos)
            end = pos + length
            while pos < end:
                value, pos = _varint(buf, pos)
                sizes.append(value)
        elif field == 2 and wire == 2:
            length, pos = _varint(buf, pos)
            ct.append((pos, length))
            pos += length
        elif field == 3 and wire == 1:
            scale = struct.unpack_from("<d", buf, pos)[0]
            pos += 8
        else:
            raise ValueError(f"unexpected protobuf field {field}")
    if pos != len(buf) or len(ct) != 1 or len(sizes) != 1 or scale is None:
        raise ValueError("not a one-ciphertext CKKS vector")
    return sizes, ct[0][0], ct[0][1], scale


def _zstd_stored_payload(buf: memoryview) -> bytes:
    """Content of a zstd frame made only of raw/RLE blocks (what zstd emits for random
    residues); anything really compressed is refused (no zstd decoder is assumed)."""
    if bytes(buf[:4]) != _ZSTD_MAGIC:
        raise ValueError("not a zstd frame")
    fhd = buf[4]
    single, checksum, dict_flag, fcs_flag = fhd >> 5 & 1, fhd >> 2 & 1, fhd & 3, fhd >> 6
    pos = 5 + (0 if single else 1) + (0, 1, 2, 4)[dict_flag]
    pos += (1 if single else 0, 2, 4, 8)[fcs_flag]
    out = bytearray()
    while True:
        if pos + 3 > len(buf):
            raise ValueError("truncated zstd block")
        head = int.from_bytes(buf[pos:pos + 3], "little")
        last, kind, size = head & 1, head >> 1 & 3, head >> 3
        pos += 3
        if kind == 0:
            out += buf[pos:pos + size]
            pos += size
        elif kind == 1:
            out += bytes(buf[pos:pos + 1]) * size
            pos += 1
        else:
            raise _Compressed("compressed zstd block")
        if last:
            break
    if pos + 4 * checksum != len(buf):
        raise ValueError("trailing bytes after zstd frame")
    return bytes(out)


def _parse_chunk(chunk: memoryview) -> _Cipher:
    """Decode a TenSEAL CKKS vector serialization down to its residue array."""
    sizes, ct_at, ct_len, proto_scale = _parse_proto(chunk)
    magic, head_size, major, minor, compr, _, total = _SEAL_HEADER.unpack_from(chunk, ct_at)
    if magic != _SEAL_MAGIC or head_size != _SEAL_HEADER.size or total != ct_len:
        raise ValueError("not a SEAL ciphertext")
    body_at = ct_at + _SEAL_HEADER.size
    if compr == 0:
        body, base = chunk[body_at:ct_at + ct_len], body_at
    elif compr == 2:
        body, base = memoryview(_zstd_stored_payload(chunk[body_at:ct_at + ct_len])), None
    elif compr == 1:
        raise _Compressed("zlib")
    else:
        raise ValueError(f"unknown SEAL compression mode {compr}")
    *parms_id, ntt = _CT_HEAD.unpack_from(body, 0)
    size, n, levels, scale, correction = _CT_DIMS.unpack_from(body, _CT_HEAD.size)
    arr_at = _CT_HEAD.size + _CT_DIMS.size
    arr_magic, arr_head, _, _, arr_compr, _, arr_total = _SEAL_HEADER.unpack_from(body, arr_at)
    (count,) = _U64.unpack_from(body, arr_at + _SEAL_HEADER.size)
    data_at = arr_at + _SEAL_HEADER.size + _U64.size
    if arr_magic != _SEAL_MAGIC or arr_compr != 0 or count != size * n * levels or data_at + 8 * count != len(body):
        raise ValueError("unexpected SEAL ciphertext layout")
    return _Cipher(sizes[0], proto_scale, (major, minor), tuple(parms_id), ntt, size, n, levels, scale,
                   correction, body[data_at:], None if base is None else base + data_at)


def _chunk_bytes(c: _Cipher, data_len: int) -> tuple[bytes, bytes, int]:
    """(prefix, suffix, residue offset) of the uncompressed serialization of `c`; the
    residues (`data_len` bytes) go between prefix and suffix."""
    arr = _SEAL_HEADER.pack(_SEAL_MAGIC, _SEAL_HEADER.size, *c.version, 0, 0, _SEAL_HEADER.size + _U64.size + data_len)
    body_head = (_CT_HEAD.pack(*c.parms_id, c.ntt) + _CT_DIMS.pack(c.size, c.n, c.levels, c.scale, c.correction)
                 + arr + _U64.pack(data_len // 8))
    ct_len = _SEAL_HEADER.size + len(body_head) + data_len
    seal_head = _SEAL_HEADER.pack(_SEAL_MAGIC, _SEAL_HEADER.size, *c.version, 0, 0, ct_len)
    sizes = _put_varint(c.values)
    prefix = b"\x0a" + _put_varint(len(sizes)) + sizes + b"\x12" + _put_varint(ct_len) + seal_head + body_head
    return prefix, b"\x19" + struct.pack("<d", c.proto_scale), len(prefix)


def _normalise_chunk(serialized: bytes) -> tuple[bytes, int | None]:
    """TenSEAL's serialization rewritten uncompressed (same ciphertext, loads the same),
    with the residue offset; unchanged with None when it holds really compressed data."""
    try:
        c = _parse_chunk(memoryview(serialized))
    except (ValueError, struct.error):
        return serialized, None
    if c.data_offset is not None:
        return serialized, c.data_offset
    prefix, suffix, offset = _chunk_bytes(c, len(c.data))
    return b"".join((prefix, c.data, suffix)), offset


# ---------------------------------------------------------------------------- encrypt / decrypt


def encrypt_vector(ctx: ts.Context, vec: np.ndarray, *, params: CkksParams | None = None) -> bytes:
    """Encrypt a flat float64 vector densely (`slots` values per ciphertext) into one blob.

    With `params`, refuse values the sum of `max_silos` silos could overflow (check_bounds);
    without, still refuse values one ciphertext cannot hold, and NaN/inf.
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
    chunks = [_normalise_chunk(ts.ckks_vector(ctx, flat[i:i + n_slots]).serialize())
              for i in range(0, flat.size, n_slots)]
    return _frame(chunks, n_slots, flat.size)


def decrypt_vector(ctx: ts.Context, blob: Blob) -> np.ndarray:
    """Decrypt a blob (a silo's own update or a sum) with the study's secret context."""
    if not has_secret_key(ctx):
        raise PolicyError("this context holds no secret key: the coordinator cannot decrypt")
    view = _as_view(blob)
    frame = _read_frame(view, "encrypted vector")
    _check_frame_slots(frame, _context_slots(ctx), "encrypted vector")
    out = np.empty(frame.values, dtype=np.float64)
    for i, ((start, length), expected) in enumerate(zip(frame.records, _chunk_lengths(frame.values, frame.slots))):
        vec = _load_tenseal(ctx, view[start:start + length], f"encrypted vector, chunk {i}")
        if vec.size() != expected:
            raise PolicyError(f"encrypted vector, chunk {i}: holds {vec.size()} values, expected {expected}")
        out[i * frame.slots:i * frame.slots + expected] = vec.decrypt()
    return out


def _check_frame_slots(frame: _Frame, n_slots: int, what: str) -> None:
    if frame.slots != n_slots:
        raise PolicyError(f"{what}: packed {frame.slots} slots per ciphertext; this study's context has {n_slots}")


def _load_tenseal(ctx: ts.Context, chunk: memoryview, what: str) -> ts.CKKSVector:
    try:
        return ts.ckks_vector_from(ctx, bytes(chunk))
    except (ValueError, RuntimeError, TypeError):
        raise PolicyError(f"{what}: not a CKKS ciphertext for this study's parameters") from None


# ---------------------------------------------------------------------------- sums

SumMethod = Literal["auto", "tenseal", "numpy-residue"]
_BLOCK_BYTES = 1 << 18  # residues summed per step: the accumulator stays in L2 cache


def sum_encrypted(aggregator_ctx: ts.Context, blobs: Sequence[Blob], *, method: SumMethod = "auto") -> bytes:
    """Add encrypted vectors (depth 0, no key needed): the coordinator's whole job.

    Every blob must have the same length and chunking; a malformed or mismatched one is
    refused with a PolicyError naming its index. `method`: "tenseal" deserialises every
    ciphertext through TenSEAL (the reference); "numpy-residue" adds the RNS residues as
    uint64 arrays modulo each prime (byte-identical result, several times faster);
    "auto" uses numpy-residue when every chunk is stored uncompressed, else TenSEAL.
    """
    summed = _sum(aggregator_ctx, blobs, method)
    return summed if isinstance(summed, bytes) else summed.tobytes()


def sum_encrypted_uint8(aggregator_ctx: ts.Context, blobs: Sequence[Blob], *, method: SumMethod = "auto") -> np.ndarray:
    """sum_encrypted for Flower transport: takes bytes or uint8 arrays (not copied) and
    returns the sum as a uint8 array, skipping a copy of the whole sum into `bytes`
    (on this VM a fresh 32 MB bytes object costs about as much as all the additions)."""
    summed = _sum(aggregator_ctx, blobs, method)
    return np.frombuffer(summed, dtype=np.uint8) if isinstance(summed, bytes) else summed


def _sum(ctx: ts.Context, blobs: Sequence[Blob], method: SumMethod) -> bytes | np.ndarray:
    if method not in ("auto", "tenseal", "numpy-residue"):
        raise PolicyError(f"unknown sum method {method!r}; use 'auto', 'tenseal' or 'numpy-residue'")
    if not blobs:
        raise PolicyError("nothing to sum: no encrypted contributions")
    views = [_as_view(b) for b in blobs]
    first = _read_frame(views[0], "contribution [0]")
    _check_frame_slots(first, _context_slots(ctx), "contribution [0]")
    if method != "tenseal":
        summed = _sum_residues(ctx, views, first, strict=method == "numpy-residue")
        if summed is not None:
            return summed
    return _sum_tenseal(ctx, views, [_read_like(v, first, i) for i, v in enumerate(views)])


def _read_like(view: memoryview, first: _Frame, i: int) -> _Frame:
    """Frame of contribution i, refused unless it packs like contribution [0]."""
    frame = first if i == 0 else _read_frame(view, f"contribution [{i}]")
    if frame.slots != first.slots or frame.values != first.values:
        raise PolicyError(
            f"contribution [{i}] holds {frame.values} values in chunks of {frame.slots}, contribution [0] "
            f"{first.values} in chunks of {first.slots}: updates of different models cannot be summed"
        )
    return frame


def _sum_tenseal(ctx: ts.Context, views: list[memoryview], frames: list[_Frame]) -> bytes:
    """The reference: load every ciphertext through TenSEAL (SEAL validates it) and add."""
    chunks = []
    for c, expected in enumerate(_chunk_lengths(frames[0].values, frames[0].slots)):
        acc = None
        for i, (view, frame) in enumerate(zip(views, frames)):
            start, length = frame.records[c]
            vec = _load_tenseal(ctx, view[start:start + length], f"contribution [{i}], chunk {c}")
            if vec.size() != expected:
                raise PolicyError(f"contribution [{i}], chunk {c}: holds {vec.size()} values, expected {expected}")
            if acc is None:
                acc = vec
                continue
            try:
                acc.add_(vec)
            except (ValueError, RuntimeError):
                raise PolicyError(f"contribution [{i}], chunk {c}: cannot be added (scale or level differs)") from None
        chunks.append(_normalise_chunk(acc.serialize()))
    return _frame(chunks, frames[0].slots, frames[0].values)


# -- numpy-residue: the same sum, as uint64 additions modulo each prime


@dataclass(frozen=True)
class _Layout:
    """The canonical blob for one chunking and ciphertext metadata (what encrypt_vector and
    both sums write), as the bytes between residue runs. A blob equal to it outside the
    residues needs no parsing: one vectorised comparison validates all its chunks."""

    gaps: list[bytes]  # before chunk 0's residues, between each pair, after the last
    offsets: list[int]  # where each chunk's residues start
    data_len: int  # bytes of residues per chunk
    fixed: np.ndarray  # indices of every byte outside the residues
    expected: np.ndarray  # their values (the gaps concatenated)
    segments: list[tuple[int, int, int]]  # (first chunk, end chunk, byte stride) of regular runs

    def matches(self, buf: np.ndarray) -> bool:
        total = self.offsets[-1] + self.data_len + len(self.gaps[-1])
        return len(buf) == total and np.array_equal(buf[self.fixed], self.expected)


def _sum_residues(ctx: ts.Context, views: list[memoryview], first: _Frame, strict: bool) -> np.ndarray | None:
    """Add ciphertexts as RNS residues: (c0, c1) of a sum are the sums of the (c0, c1)
    modulo each prime, which is all SEAL's add does for same-scale, same-level inputs.
    None (or, if strict, an error) when some chunk is not stored uncompressed."""
    ref = _reference_cipher(ctx, views[0], first, strict)
    if ref is None:
        return None
    layout = _canonical_layout(ref, first)
    rows = []
    for i, view in enumerate(views):
        buf = np.frombuffer(view, dtype=np.uint8)
        if layout.matches(buf):
            rows.append(_Rows(buf, layout.offsets, layout.data_len // 8, layout.segments))
            continue
        offsets = _residue_offsets(ctx, view, _read_like(view, first, i), ref, i, strict)
        if offsets is None:
            return None
        rows.append(_Rows(buf, offsets, layout.data_len // 8, _segments(offsets, layout.data_len)))
    out = np.empty(layout.offsets[-1] + layout.data_len + len(layout.gaps[-1]), dtype=np.uint8)
    out[layout.fixed] = layout.expected
    _add_mod(rows, _modulus_row(_data_moduli(ctx), ref.n), _Rows(out, layout.offsets, layout.data_len // 8, layout.segments))
    return out


def _reference_cipher(ctx: ts.Context, view: memoryview, frame: _Frame, strict: bool) -> _Cipher | None:
    """Contribution [0], chunk 0, parsed and checked against the context; the others must
    carry the same metadata."""
    start, length = frame.records[0]
    ref = _parse_or_refuse(view[start:start + length], "contribution [0], chunk 0", strict)
    if ref is not None:
        _check_cipher(ctx, ref, ref, min(frame.slots, frame.values), "contribution [0], chunk 0")
    return ref


def _parse_or_refuse(chunk: memoryview, where: str, strict: bool) -> _Cipher | None:
    try:
        cipher = _parse_chunk(chunk)
        if cipher.data_offset is None:  # stored in a zstd frame: residues not in place
            raise _Compressed("zstd frame")
        return cipher
    except _Compressed:
        if strict:
            raise PolicyError(f"{where}: stored compressed; numpy-residue needs uncompressed chunks") from None
        return None
    except (ValueError, struct.error):
        raise PolicyError(f"{where}: not a CKKS ciphertext serialization") from None


def _check_cipher(ctx: ts.Context, x: _Cipher, ref: _Cipher, expected: int, where: str) -> None:
    """What SEAL checks on load and add: this study's parameters (parms_id), a fresh
    2-polynomial NTT-form ciphertext, the scale of the others, the announced slot count."""
    if x.parms_id != tuple(ctx.seal_context().data.first_parms_id()) or x.n != 2 * _context_slots(ctx) \
            or x.levels != len(_data_moduli(ctx)):
        raise PolicyError(f"{where}: encrypted under other CKKS parameters than this study's context")
    if x.size != 2 or x.ntt != 1 or x.correction != 1:
        raise PolicyError(f"{where}: not a fresh CKKS ciphertext (size {x.size}); only sums of fresh ones are allowed")
    if x.scale != ref.scale or x.proto_scale != ref.proto_scale or x.version != ref.version:
        raise PolicyError(f"{where}: scale or format differs from contribution [0]")
    if x.values != expected:
        raise PolicyError(f"{where}: holds {x.values} values, expected {expected}")


_META_FIELDS = ("proto_scale", "version", "parms_id", "ntt", "size", "n", "levels", "scale", "correction")


def _canonical_layout(ref: _Cipher, frame: _Frame) -> _Layout:
    """The layout for this chunking and metadata, cached: each round of a study reuses it."""
    return _layout_for(tuple(getattr(ref, f) for f in _META_FIELDS), frame.slots, frame.values, len(ref.data))


@functools.lru_cache(maxsize=8)
def _layout_for(meta: tuple, n_slots: int, values: int, data_len: int) -> _Layout:
    ref = _Cipher(0, *meta, data=memoryview(b""), data_offset=None)
    lengths = _chunk_lengths(values, n_slots)
    parts = {v: _chunk_bytes(replace(ref, values=v), data_len) for v in set(lengths)}
    places, _ = _place([(len(parts[v][0]) + data_len + len(parts[v][1]), parts[v][2]) for v in lengths])
    gaps, offsets, tail = [], [], _HEADER.pack(MAGIC, FORMAT_VERSION, 0, len(lengths), n_slots, values)
    for v, (pos, pad) in zip(lengths, places):
        prefix, suffix, _ = parts[v]
        gaps.append(tail + _RECORD.pack(pad, len(prefix) + data_len + len(suffix)) + b"\0" * pad + prefix)
        offsets.append(pos + _RECORD.size + pad + len(prefix))
        tail = suffix
    gaps.append(tail)
    starts = [0] + [o + data_len for o in offsets]
    fixed = np.concatenate([np.arange(a, a + len(g)) for a, g in zip(starts, gaps)])
    expected = np.frombuffer(b"".join(gaps), dtype=np.uint8)
    fixed.flags.writeable = False
    return _Layout(gaps, offsets, data_len, fixed, expected, _segments(offsets, data_len))


def _residue_offsets(ctx: ts.Context, view: memoryview, frame: _Frame, ref: _Cipher, i: int,
                     strict: bool) -> list[int] | None:
    """Where each chunk's residues start in a blob laid out differently from the canonical
    one (parsed and checked chunk by chunk)."""
    offsets = []
    for c, ((start, length), expected) in enumerate(zip(frame.records, _chunk_lengths(frame.values, frame.slots))):
        where = f"contribution [{i}], chunk {c}"
        cipher = _parse_or_refuse(view[start:start + length], where, strict)
        if cipher is None:
            return None
        _check_cipher(ctx, cipher, ref, expected, where)
        offsets.append(start + cipher.data_offset)
    return offsets


def _segments(offsets: list[int], data_len: int) -> list[tuple[int, int, int]]:
    """Runs of consecutive chunks whose residues sit at a constant byte stride."""
    out, first = [], 0
    for j in range(1, len(offsets) + 1):
        if j == len(offsets) or (j - first > 1 and offsets[j] - offsets[j - 1] != offsets[first + 1] - offsets[first]):
            out.append((first, j, offsets[first + 1] - offsets[first] if j - first > 1 else data_len))
            first = j
    return out


class _Rows:
    """One blob's residues as (width,) uint64 rows, one per chunk; a block of consecutive
    chunks inside a regular run is one zero-copy strided view."""

    def __init__(self, buf: np.ndarray, offsets: list[int], width: int, segments: list[tuple[int, int, int]]) -> None:
        self._buf, self._offsets, self._width = buf, offsets, width
        self._segments = [(a, b, np.lib.stride_tricks.as_strided(self._row(a), shape=(b - a, width),
                                                                  strides=(stride, 8), writeable=buf.flags.writeable))
                          for a, b, stride in segments]

    def _row(self, j: int) -> np.ndarray:
        o = self._offsets[j]
        return self._buf[o:o + 8 * self._width].view(np.uint64)

    def get(self, start: int, stop: int) -> np.ndarray:
        for first, end, view in self._segments:
            if first <= start and stop <= end:
                return view[start - first:stop - first]
        return np.stack([self._row(j) for j in range(start, stop)])

    def put(self, start: int, stop: int, values: np.ndarray) -> None:
        for first, end, view in self._segments:
            if first <= start and stop <= end:
                view[start - first:stop - first] = values
                return
        for j in range(start, stop):
            self._row(j)[...] = values[j - start]

    def __len__(self) -> int:
        return len(self._offsets)


def _modulus_row(moduli: list[int], n: int) -> np.ndarray | np.uint64:
    """The prime each residue of a (c0, c1) row is reduced by (a scalar for one prime)."""
    if len(moduli) == 1:
        return np.uint64(moduli[0])
    return np.tile(np.repeat(np.asarray(moduli, dtype=np.uint64), n), 2)


def _add_mod(rows: list[_Rows], q: np.ndarray | np.uint64, out: _Rows) -> None:
    """out = sum(rows) mod q, a block of chunks at a time in one reused accumulator that
    stays in cache while the K blobs stream past.

    Inputs must be < q (SEAL's validity rule, checked here); `fits` terms below q sum
    without overflowing uint64 (16 for 60-bit primes), so K <= 16 needs one reduction.
    """
    fits = ((1 << 64) - 1) // (int(np.max(q)) - 1)
    width = out.get(0, 1).shape[1]
    per_block = max(1, _BLOCK_BYTES // (width * 8))
    buffer = np.empty((per_block, width), dtype=np.uint64)
    for start in range(0, len(out), per_block):
        stop = min(len(out), start + per_block)
        acc = buffer[:stop - start]
        np.copyto(acc, rows[0].get(start, stop))
        _check_reduced(acc, q, 0)
        terms = 1
        for k in range(1, len(rows)):
            block = rows[k].get(start, stop)
            _check_reduced(block, q, k)
            if terms == fits:
                np.remainder(acc, q, out=acc)
                terms = 1
            np.add(acc, block, out=acc)
            terms += 1
        np.remainder(acc, q, out=acc)
        out.put(start, stop, acc)


def _check_reduced(block: np.ndarray, q: np.ndarray | np.uint64, k: int) -> None:
    bad = block.max() >= q if np.ndim(q) == 0 else bool((block >= q).any())
    if bad:
        raise PolicyError(f"contribution [{k}]: residues not reduced modulo the study's primes (corrupt ciphertext)")


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
