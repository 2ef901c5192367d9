"""Residues below 2^w packed into 64-bit words' spare bits, and summed modulo q packed.

CKKS residues modulo a w-bit prime sit in 64-bit words with r = 64 - w bits to spare
(4 for the default 60-bit prime). Here G = ceil(w / r) words carry G + 1 residues: each
word holds one residue in its low w bits, and the extra residue is cut into r-bit pieces
stored in the G words' top bits. For w = 60 that is 16 residues in 15 words, exactly 60
bits each (7.5 bytes); other widths lose a little (49 bits: 5 residues in 4 words).

The layout is "planar": residues 0 .. G*cols-1 fill the low bits of a (G, cols) word
array row by row, residues G*cols .. (G+1)*cols-1 are the extras of the columns. Every
operation is then a contiguous uint64 pass, which is what makes the coordinator's sum
cheap: summing raw words gives S = sum(x) + 2^w * T (mod 2^64), where T = sum of the top
pieces is summed alongside; then sum(x) = S - 2^w * T exactly while it stays below 2^64
(`exact_terms` words), and the extras' sum is sum_i T_i * 2^(r*i). No per-residue bit
shuffling is needed to add, only to pack the result once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

_BLOCK_COLUMNS = 1 << 13  # columns summed per step: the accumulators (3 x G x 8 KiB words) stay in cache


@dataclass(frozen=True)
class Packing:
    """How residues below 2^width are packed (see the module docstring)."""

    width: int

    def __post_init__(self) -> None:
        if not 1 <= self.width <= 63:
            raise ValueError(f"cannot pack {self.width}-bit residues into the spare bits of 64-bit words")

    @property
    def spare(self) -> int:
        return 64 - self.width

    @property
    def words(self) -> int:
        """G: words per column; a column carries G + 1 residues."""
        return -(-self.width // self.spare)

    @property
    def exact_terms(self) -> int:
        """How many residues below 2^width sum without overflowing a uint64 (16 for w=60)."""
        return ((1 << 64) - 1) // ((1 << self.width) - 1)

    def columns(self, count: int) -> int:
        return -(-count // (self.words + 1))

    def nbytes(self, count: int) -> int:
        """Bytes that `count` residues take packed."""
        return 8 * self.words * self.columns(count)

    def pack(self, values: np.ndarray) -> np.ndarray:
        """(G, cols) uint64 words holding `values` (each below 2^width), zero-padded."""
        values = np.asarray(values, dtype=np.uint64).reshape(-1)
        if values.size and int(values.max()) >> self.width:
            raise ValueError(f"a residue does not fit in {self.width} bits")
        cols = self.columns(values.size)
        padded = np.zeros((self.words + 1) * cols, dtype=np.uint64)
        padded[:values.size] = values
        main, extra = padded[:self.words * cols].reshape(self.words, cols), padded[self.words * cols:]
        return self._combine(main, extra)

    def _combine(self, main: np.ndarray, extra: np.ndarray) -> np.ndarray:
        out = main.copy()
        piece, width, tmp = np.uint64((1 << self.spare) - 1), np.uint64(self.width), np.empty_like(extra)
        for i in range(self.words):
            np.right_shift(extra, np.uint64(self.spare * i), out=tmp)
            np.bitwise_and(tmp, piece, out=tmp)
            np.left_shift(tmp, width, out=tmp)
            np.bitwise_or(out[i], tmp, out=out[i])
        return out

    def unpack(self, words: np.ndarray, count: int) -> np.ndarray:
        """The first `count` residues held by (G, cols) words."""
        words = self.view(words, count)
        width = np.uint64(self.width)
        main = words & np.uint64((1 << self.width) - 1)
        extra = np.zeros(words.shape[1], dtype=np.uint64)
        for i in range(self.words):
            extra |= (words[i] >> width) << np.uint64(self.spare * i)
        return np.concatenate([main.reshape(-1), extra])[:count]

    def view(self, data: np.ndarray | bytes | memoryview, count: int) -> np.ndarray:
        """Packed bytes (or words) of `count` residues as the (G, cols) uint64 array, no copy."""
        cols = self.columns(count)
        flat = data.reshape(-1) if isinstance(data, np.ndarray) else np.frombuffer(data, dtype=np.uint8)
        if flat.dtype == np.uint8:
            if flat.size != 8 * self.words * cols:
                raise ValueError(f"{count} residues at {self.width} bits take {8 * self.words * cols} bytes, "
                                 f"got {flat.size}")
            flat = flat.view("<u8")
        if flat.size != self.words * cols:
            raise ValueError(f"{count} residues take {self.words * cols} words, got {flat.size}")
        return flat.reshape(self.words, cols)

    def sum_mod(self, terms: Sequence[np.ndarray], q: int, out: np.ndarray) -> None:
        """out = the residue-wise sum modulo q of packed (G, cols) word arrays, packed likewise.

        Works a block of columns at a time so the accumulators stay in cache while the
        terms stream past; terms are summed exactly in batches of `exact_terms`, each batch
        reduced modulo q and added to the total. A residue >= q is treated as its reduction.
        """
        if not terms:
            raise ValueError("nothing to sum")
        cols = terms[0].shape[1]
        if q >> self.width or any(t.shape != (self.words, cols) for t in [*terms, out]):
            raise ValueError("terms of different shapes, or a modulus wider than the packing")
        modulus = np.uint64(q)
        blocks = [np.empty((self.words, _BLOCK_COLUMNS), dtype=np.uint64) for _ in range(4)]
        extras = [np.empty(_BLOCK_COLUMNS, dtype=np.uint64) for _ in range(2)]
        for start in range(0, cols, _BLOCK_COLUMNS):
            stop = min(cols, start + _BLOCK_COLUMNS)
            n = stop - start
            main, extra = blocks[0][:, :n], extras[0][:n]
            for b in range(0, len(terms), self.exact_terms):
                batch = [t[:, start:stop] for t in terms[b:b + self.exact_terms]]
                got_main, got_extra = self._exact_sum(batch, blocks[1][:, :n], blocks[2][:, :n], blocks[3][:, :n],
                                                      extras[1][:n])
                np.remainder(got_main, modulus, out=got_main)
                np.remainder(got_extra, modulus, out=got_extra)
                if b == 0:
                    np.copyto(main, got_main)
                    np.copyto(extra, got_extra)
                else:
                    _add_mod(main, got_main, modulus)
                    _add_mod(extra, got_extra, modulus)
            out[:, start:stop] = self._combine(main, extra)

    def _exact_sum(self, batch: list[np.ndarray], s: np.ndarray, t: np.ndarray, tmp: np.ndarray,
                   extra: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact sums of the main and extra residues of up to `exact_terms` blocks."""
        width = np.uint64(self.width)
        np.copyto(s, batch[0])
        np.right_shift(batch[0], width, out=t)
        for block in batch[1:]:
            np.add(s, block, out=s)  # wraps mod 2^64: low residue plus 2^w x top piece
            np.right_shift(block, width, out=tmp)
            np.add(t, tmp, out=t)
        np.left_shift(t, width, out=tmp)
        np.subtract(s, tmp, out=s)  # the residues' exact sum (below 2^64)
        np.copyto(extra, t[0])
        for i in range(1, self.words):
            np.left_shift(t[i], np.uint64(self.spare * i), out=tmp[0])
            np.add(extra, tmp[0], out=extra)
        return s, extra


def _add_mod(acc: np.ndarray, x: np.ndarray, q: np.uint64) -> None:
    """acc = (acc + x) mod q for acc, x < q (no overflow: q < 2^63)."""
    np.add(acc, x, out=acc)
    np.subtract(acc, q, out=acc, where=acc >= q)
