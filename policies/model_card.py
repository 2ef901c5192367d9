"""The released model's format, shared by the silos that send it and the coordinator that keeps it.

A release is two files: `model.safetensors` (weights plus the feature transform the
weights need, as float64 tensors) and `model_card.json` (what the model is, how it was
made, who consented, and the sha256 of the weights file). safetensors rather than ONNX:
loading one runs no code (a JSON header and raw little-endian bytes, no pickle, no
graph), it reads from numpy, torch or any language without our code, and it keeps the
exact float64 bytes, so the sha256 a silo logs before sending is the sha256 the
coordinator stores and a user can check. A logistic regression needs no graph format.

Silos round every released value to `RELEASE_DECIMALS` before it leaves (CKKS
decryptions shown to a ciphertext holder can leak the secret key, issue 3 point 7);
silos decrypting the same aggregate with the same key therefore send identical bytes.
"""

from __future__ import annotations

import hashlib
import json
import struct

import numpy as np

from policies.errors import PolicyError
from policies.study import StudySpec

RELEASE_DECIMALS = 6
QUANTUM = 10.0 ** -RELEASE_DECIMALS  # models "agree" when no value differs by more than this
CARD_FILE = "model_card.json"
WEIGHTS_FILE = "model.safetensors"
CARD_FORMAT = "fedcohort-model-card/1"
WEIGHTS_FORMAT = "fedcohort-logistic/1"
TENSORS = ("weight", "bias", "feature_mean", "feature_std")
METADATA_KEY = "fedcohort"


def round_released(values: np.ndarray) -> np.ndarray:
    """What may leave a silo: the value rounded to RELEASE_DECIMALS (float64)."""
    return np.round(np.asarray(values, dtype=np.float64), RELEASE_DECIMALS)


def model_bytes(weights: np.ndarray, mean: np.ndarray, std: np.ndarray, study: StudySpec) -> bytes:
    """The safetensors file a consenting silo sends: rounded weights and feature transform.

    A standard deviation is kept at least QUANTUM after rounding, so a constant feature
    never divides by zero in the user's hands.
    """
    from safetensors.numpy import save

    d = len(mean)
    weights = np.asarray(weights, dtype=np.float64)
    if weights.shape != (d + 1,) or np.shape(std) != (d,):
        raise PolicyError(f"model has {weights.shape[0]} parameters and a transform for {d} features: "
                          f"expected {d + 1} parameters")
    tensors = {
        "weight": round_released(weights[:d]).reshape(1, d),
        "bias": round_released(weights[d:]),
        "feature_mean": round_released(mean),
        "feature_std": np.maximum(round_released(std), QUANTUM),
    }
    # One metadata key: safetensors writes its metadata map in hash order, which differs from
    # process to process; a single key keeps the file byte-identical at every silo.
    about = {"format": WEIGHTS_FORMAT, "study_id": study.id, "policy_hash": study.policy_hash(),
             "features": study.feature_names()}
    return save(tensors, metadata={METADATA_KEY: json.dumps(about, sort_keys=True)})


def load_model(data: bytes) -> dict[str, np.ndarray]:
    """Parse a released weights file (no code runs); PolicyError if it is not one."""
    from safetensors.numpy import load

    try:
        tensors = load(bytes(data))
    except Exception as exc:  # safetensors raises its own SafetensorError for any malformed file
        raise PolicyError(f"not a safetensors model file ({type(exc).__name__}: {str(exc)[:200]})") from None
    missing = [t for t in TENSORS if t not in tensors]
    if missing:
        raise PolicyError(f"model file lacks tensor(s) {', '.join(missing)}")
    return tensors


def file_metadata(data: bytes) -> dict:
    """What the file says it is (study, policy hash, features), from the safetensors header's
    `__metadata__` (8-byte little-endian length, then JSON)."""
    (size,) = struct.unpack("<Q", bytes(data[:8]))
    meta = json.loads(bytes(data[8:8 + size])).get("__metadata__", {})
    return dict(json.loads(meta.get(METADATA_KEY, "{}")))


def models_agree(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    """Same tensors, same shapes, no value further apart than the rounding quantum."""
    if set(a) != set(b):
        return False
    return all(a[k].shape == b[k].shape and float(np.max(np.abs(a[k] - b[k]), initial=0.0)) <= QUANTUM * 1.5
               for k in a)


def sha256(data: bytes) -> str:
    return hashlib.sha256(bytes(data)).hexdigest()


def feature_transform(study: StudySpec, tensors: dict[str, np.ndarray]) -> dict:
    """How to turn a raw cohort row into the model's input and a prediction, without our code."""
    fp = study.features
    return {
        "input_columns": [*fp.numeric, *fp.one_hot],
        "rows_with_missing_values": "dropped (the model was trained and evaluated on complete rows only)",
        "numeric": list(fp.numeric),
        "one_hot": {col: list(levels) for col, levels in fp.one_hot.items()},
        "one_hot_rule": "one 0/1 column per level except the first, in the order listed, after the numeric columns",
        "features": study.feature_names(),
        "normalisation": fp.normalisation,
        "feature_mean": tensors["feature_mean"].tolist(),
        "feature_std": tensors["feature_std"].tolist(),
        "score": "p = sigmoid(((x - feature_mean) / feature_std) @ weight.T + bias)",
        "threshold": 0.5,
        "label": f"{study.cohort.label_column} > {fp.label_threshold:g}",
    }
