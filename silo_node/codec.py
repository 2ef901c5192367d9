"""How a silo's vectors travel: as plain float64, or as CKKS ciphertexts.

Both codecs take the same vectors; the CKKS one scales them first (so a sum of
`max_silos` contributions stays inside the ciphertext's headroom), checks bounds,
encrypts densely, and undoes the scaling after decryption. The worker never needs to
know which one it holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from policies.ckks import CkksParams, blob_as_uint8, decrypt_vector, encrypt_vector
from policies.errors import PolicyError


class Codec(Protocol):
    def encode(self, vec: np.ndarray, scale: np.ndarray | float = 1.0) -> np.ndarray: ...
    def decode(self, arr: np.ndarray, scale: np.ndarray | float = 1.0) -> np.ndarray: ...


class PlainCodec:
    """`encryption: none`: vectors travel as they are (scaling is not needed)."""

    def encode(self, vec: np.ndarray, scale: np.ndarray | float = 1.0) -> np.ndarray:
        return np.asarray(vec, dtype=np.float64)

    def decode(self, arr: np.ndarray, scale: np.ndarray | float = 1.0) -> np.ndarray:
        if arr.dtype != np.float64:
            raise PolicyError("expected a plaintext vector, got ciphertext bytes: study encryption mismatch")
        return np.asarray(arr, dtype=np.float64)


@dataclass
class CkksCodec:
    """`encryption: ckks`: scale, bound-check, encrypt; decrypt, unscale."""

    context: Any  # tenseal.Context holding the study's secret key
    params: CkksParams

    def encode(self, vec: np.ndarray, scale: np.ndarray | float = 1.0) -> np.ndarray:
        scaled = np.asarray(vec, dtype=np.float64) * scale
        return blob_as_uint8(encrypt_vector(self.context, scaled, params=self.params))

    def decode(self, arr: np.ndarray, scale: np.ndarray | float = 1.0) -> np.ndarray:
        if arr.dtype != np.uint8:
            raise PolicyError("expected ciphertext bytes, got a plaintext vector: study encryption mismatch")
        return decrypt_vector(self.context, arr) / scale
