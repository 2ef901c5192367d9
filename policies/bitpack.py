"""Bit-packing of unsigned integers below 2^w into w bits each, vectorised with numpy.

CKKS residues modulo a 60-bit prime sit in 64-bit words; on the wire they need only 60
bits (7.5 bytes). Eight values of `w` bits fill exactly `w` bytes (a "group"), so value
j of group g starts at byte g*w + (j*w)//8, bit (j*w) % 8. Each of the eight positions is
one strided uint64 view over the packed bytes (numpy reads unaligned words), so packing
and unpacking are eight vectorised passes, not a Python loop per value.

A word read at a position may run up to 7 bytes past its group; the caller leaves
`SLACK` readable bytes after the packed data (zero on the wire), so the last group's
reads stay in the buffer. A width works when every shifted value still fits one word:
`(j*w) % 8 + w <= 64` for all j; `packed_width` rounds an unsuitable width (59) up.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

SLACK = 8  # readable bytes required after packed data (one word)
GROUP = 8  # values per group of `width` bytes


def packed_width(bits: int) -> int:
    """The narrowest width >= bits at which every value is one shifted 64-bit word."""
    for w in range(max(1, bits), 65):
        if all((j * w) % 8 + w <= 64 for j in range(GROUP)):
            return w
    raise ValueError(f"cannot pack {bits}-bit values into 64-bit words")


def packed_bytes(count: int, width: int) -> int:
    """Bytes that `count` values (a multiple of 8) take at `width` bits."""
    if count % GROUP:
        raise ValueError(f"bit-packing needs a multiple of {GROUP} values, got {count}")
    return count // GROUP * width


def _positions(width: int) -> Iterator[tuple[int, int, int]]:
    """(j, byte offset in the group, bit shift) of each of the 8 values of a group."""
    for j in range(GROUP):
        yield j, (j * width) // 8, (j * width) % 8


def _word_view(buf: np.ndarray, start: int, groups: int, width: int, writeable: bool) -> np.ndarray:
    """uint64 words at byte offsets start, start + width, ... (unaligned, strided)."""
    if start + (groups - 1) * width + 8 > buf.size:
        raise ValueError("packed data ends too close to the buffer end (missing slack)")
    view = np.ndarray((groups,), dtype="<u8", buffer=buf, offset=start, strides=(width,))
    if not writeable:
        view.flags.writeable = False
    return view


class Unpacker:
    """Reads the values of packed data (`groups` groups of `width` bytes at `offset` in the
    uint8 array `buf`) group range by group range, as 8 planes: plane j holds value j
    of every group. Values come back in plane order, which `Packer` writes back."""

    def __init__(self, buf: np.ndarray, offset: int, groups: int, width: int) -> None:
        self.width, self.groups, self._mask = width, groups, np.uint64((1 << width) - 1)
        self._planes = [(_word_view(buf, offset + byte, groups, width, False), np.uint64(shift), shift)
                        for _, byte, shift in _positions(width)]

    def add_into(self, acc: np.ndarray, start: int, stop: int, scratch: np.ndarray) -> None:
        """acc[j] += value j of groups start..stop, for each plane j (acc: (8, stop-start))."""
        for j, (view, shift, s) in enumerate(self._planes):
            words, tmp = view[start:stop], scratch[:stop - start]
            if s == 0:
                np.bitwise_and(words, self._mask, out=tmp)
            elif s + self.width == 64:  # the shift alone drops the lower neighbour's bits
                np.right_shift(words, shift, out=tmp)
            else:
                np.right_shift(words, shift, out=tmp)
                np.bitwise_and(tmp, self._mask, out=tmp)
            np.add(acc[j], tmp, out=acc[j])

    def read(self, start: int, stop: int) -> np.ndarray:
        """Values of groups start..stop as (8, stop-start) planes."""
        out = np.zeros((GROUP, stop - start), dtype=np.uint64)
        self.add_into(out, start, stop, np.empty(stop - start, dtype=np.uint64))
        return out


class Packer:
    """Writes plane-ordered values (see Unpacker) into zeroed packed data in `buf`."""

    def __init__(self, buf: np.ndarray, offset: int, groups: int, width: int) -> None:
        self.width, self.groups = width, groups
        self._planes = [(_word_view(buf, offset + byte, groups, width, True), np.uint64(shift))
                        for _, byte, shift in _positions(width)]

    def write(self, planes: np.ndarray, start: int, scratch: np.ndarray) -> None:
        """OR the values (8, n) of groups start..start+n into place; every value must be
        below 2^width and the bytes zero beforehand (each word overlaps its neighbours)."""
        n = planes.shape[1]
        for j, (view, shift) in enumerate(self._planes):
            tmp = scratch[:n]
            np.left_shift(planes[j], shift, out=tmp)
            np.bitwise_or(view[start:start + n], tmp, out=view[start:start + n])


def pack(values: np.ndarray, width: int) -> bytes:
    """Pack a flat array of values below 2^width (length a multiple of 8) into bytes."""
    values = np.ascontiguousarray(values, dtype=np.uint64)
    if values.size and int(values.max()) >> width:
        raise ValueError(f"a value does not fit in {width} bits")
    groups = packed_bytes(values.size, width) // width
    buf = np.zeros(groups * width + SLACK, dtype=np.uint8)
    Packer(buf, 0, groups, width).write(values.reshape(groups, GROUP).T, 0, np.empty(groups, dtype=np.uint64))
    return buf[:groups * width].tobytes()


def unpack(data: bytes | np.ndarray, count: int, width: int) -> np.ndarray:
    """Inverse of pack: `count` values from packed bytes (copied once to add the slack)."""
    size = packed_bytes(count, width)
    raw = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data
    if raw.size != size:
        raise ValueError(f"{count} values at {width} bits take {size} bytes, got {raw.size}")
    buf = np.zeros(size + SLACK, dtype=np.uint8)
    buf[:size] = raw
    groups = size // width
    return Unpacker(buf, 0, groups, width).read(0, groups).T.reshape(-1)
