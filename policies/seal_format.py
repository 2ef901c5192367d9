"""TenSEAL's serialisation of one CKKS vector, taken apart and put back together.

`ts.CKKSVector.serialize()` (tenseal 0.3.18, SEAL 4.x) writes a CKKSVectorProto
(protobuf: sizes, one SEAL ciphertext, scale); the SEAL ciphertext is a SEAL header,
then, usually inside a zstd frame, parms_id, NTT flag, dimensions, scale, correction
factor and the residues as little-endian uint64 (polynomial-major, then prime, then
coefficient). fedcohort sends only the residues (bit-packed, see policies.ckks); this
module reads them out (`parse_vector`) and rebuilds a serialisation TenSEAL loads
(`build_vector`, uncompressed: SEAL accepts either). No zstd decoder is assumed: a frame
made of stored blocks (what zstd emits for 60-bit residues) is read directly, and one that
really compresses (e.g. 40-bit primes) raises `Compressed`, so the caller falls back to
TenSEAL's own bytes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

_SEAL_HEADER = struct.Struct("<HBBBBHQ")  # magic, header size, major, minor, compr mode, reserved, size
_SEAL_MAGIC = 0xA15E
_CT_HEAD = struct.Struct("<4QB")  # parms_id, is_ntt_form
_CT_DIMS = struct.Struct("<QQQdQ")  # size, N, coeff_modulus_size, scale, correction_factor
_U64 = struct.Struct("<Q")
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


class Compressed(ValueError):
    """A well-formed serialisation whose residues are really compressed (zlib, or zstd
    blocks that are not stored): only TenSEAL can read it."""


@dataclass(frozen=True)
class VectorMeta:
    """Everything in a serialised one-ciphertext CKKS vector except the residues."""

    values: int  # slots used (CKKSVectorProto.sizes)
    proto_scale: float  # CKKSVectorProto.scale
    version: tuple[int, int]  # SEAL serialisation version (major, minor)
    parms_id: tuple[int, int, int, int]
    ntt: int
    size: int  # polynomials (2 for a fresh ciphertext)
    n: int  # poly modulus degree
    levels: int  # primes the ciphertext lives under
    scale: float
    correction: int

    @property
    def residue_count(self) -> int:
        return self.size * self.levels * self.n


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


def _parse_proto(buf: memoryview) -> tuple[int, int, int, float]:
    """CKKSVectorProto: (size, ciphertext offset, ciphertext length, scale); one ciphertext."""
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
    return sizes[0], ct[0][0], ct[0][1], scale


def _zstd_stored_payload(buf: memoryview) -> bytes:
    """Content of a zstd frame made only of raw/RLE blocks (what zstd emits for random
    residues); anything really compressed raises Compressed."""
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
            raise Compressed("compressed zstd block")
        if last:
            break
    if pos + 4 * checksum != len(buf):
        raise ValueError("trailing bytes after zstd frame")
    return bytes(out)


def parse_vector(serialised: bytes | memoryview) -> tuple[VectorMeta, np.ndarray]:
    """Metadata and residues (uint64, shape (size, levels, N)) of a serialised CKKS vector.

    Raises Compressed for compressed residues and ValueError for anything else that is
    not a one-ciphertext CKKS vector serialisation.
    """
    chunk = memoryview(serialised).cast("B")
    try:
        values, ct_at, ct_len, proto_scale = _parse_proto(chunk)
        magic, head_size, major, minor, compr, _, total = _SEAL_HEADER.unpack_from(chunk, ct_at)
        if magic != _SEAL_MAGIC or head_size != _SEAL_HEADER.size or total != ct_len:
            raise ValueError("not a SEAL ciphertext")
        body = chunk[ct_at + _SEAL_HEADER.size:ct_at + ct_len]
        if compr == 2:
            body = memoryview(_zstd_stored_payload(body))
        elif compr == 1:
            raise Compressed("zlib")
        elif compr != 0:
            raise ValueError(f"unknown SEAL compression mode {compr}")
        *parms_id, ntt = _CT_HEAD.unpack_from(body, 0)
        size, n, levels, scale, correction = _CT_DIMS.unpack_from(body, _CT_HEAD.size)
        arr_at = _CT_HEAD.size + _CT_DIMS.size
        arr_magic, _, _, _, arr_compr, _, _ = _SEAL_HEADER.unpack_from(body, arr_at)
        (count,) = _U64.unpack_from(body, arr_at + _SEAL_HEADER.size)
    except struct.error:
        raise ValueError("truncated CKKS vector serialisation") from None
    data_at = arr_at + _SEAL_HEADER.size + _U64.size
    if arr_magic != _SEAL_MAGIC or arr_compr != 0 or count != size * n * levels or data_at + 8 * count != len(body):
        raise ValueError("unexpected SEAL ciphertext layout")
    meta = VectorMeta(values, proto_scale, (major, minor), tuple(parms_id), ntt, size, n, levels, scale, correction)
    residues = np.frombuffer(body[data_at:], dtype="<u8").reshape(size, levels, n)
    return meta, residues


def build_vector(meta: VectorMeta, residues: np.ndarray) -> bytes:
    """The uncompressed serialisation of a CKKS vector: loads in TenSEAL like the original
    (and re-serialises to TenSEAL's own bytes)."""
    data = np.ascontiguousarray(residues, dtype="<u8").tobytes()
    if len(data) != 8 * meta.residue_count:
        raise ValueError(f"{len(data) // 8} residues given, the ciphertext has {meta.residue_count}")
    arr = _SEAL_HEADER.pack(_SEAL_MAGIC, _SEAL_HEADER.size, *meta.version, 0, 0, _SEAL_HEADER.size + _U64.size + len(data))
    body_head = (_CT_HEAD.pack(*meta.parms_id, meta.ntt)
                 + _CT_DIMS.pack(meta.size, meta.n, meta.levels, meta.scale, meta.correction)
                 + arr + _U64.pack(len(data) // 8))
    ct_len = _SEAL_HEADER.size + len(body_head) + len(data)
    seal_head = _SEAL_HEADER.pack(_SEAL_MAGIC, _SEAL_HEADER.size, *meta.version, 0, 0, ct_len)
    sizes = _put_varint(meta.values)
    return b"".join((b"\x0a", _put_varint(len(sizes)), sizes, b"\x12", _put_varint(ct_len), seal_head, body_head,
                     data, b"\x19", struct.pack("<d", meta.proto_scale)))
