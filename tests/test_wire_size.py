"""What an encrypted update weighs on the wire, measured on the Flower message a silo sends.

bench/he_aggregation.py reports bytes/param from the blob a silo encrypts; these tests
check that the blob is what travels (Flower's Array holds its bytes as they are, plus a
few bytes of protobuf framing) and that its size follows the format: 72 header bytes, a
32-byte seed, and 7.5 bytes per slot of each ciphertext (one 60-bit polynomial, N=4096).
"""

from __future__ import annotations

import math

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.common.serde import recorddict_to_proto

from coordinator.demo import sample_cohorts
from coordinator.rounds import StudyState
from policies import messages as m
from policies.ckks import load_context, new_secret_context, sum_encrypted_uint8
from policies.study import load_study, shipped_study
from policies.update import pack_update
from silo_node.codec import CkksCodec
from silo_node.worker import Silo

FRAMING = 256  # protobuf keys, dtype and shape fields of one array in a RecordDict


def _expected_blob_bytes(values: int, seeds: int = 1) -> int:
    """Format 2, seeded, N=4096 [60, 49]: header + ciphertexts x N x 60 bits + seeds."""
    return 72 + math.ceil(values / 2048) * 4096 * 60 // 8 + 32 * seeds


def _wire_bytes(arrays: dict[str, np.ndarray]) -> int:
    """Bytes of the reply's content as Flower serialises it (what client_app.py sends)."""
    content = RecordDict({
        m.HEADER: ConfigRecord({"silo": "x"}),
        m.ARRAYS: ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()}),
    })
    return recorddict_to_proto(content).ByteSize()


def test_a_real_train_reply_carries_the_benchmarked_bytes(tmp_path):
    base = load_study(shipped_study())
    study = base.model_copy(update={"privacy": "none"})
    silos = [Silo.from_cohort(n, study, p, state_dir=tmp_path / n) for n, p in sample_cohorts().items()]
    aggregator, sealed = silos[0].make_study_key({s.name: s.enrolment_public() for s in silos[1:]})
    for s in silos[1:]:
        s.receive_study_key(sealed[s.name])
    ctx = load_context(aggregator, study.ckks)
    state = StudyState(study.id, study.policy_hash(), adder=lambda arrays: sum_encrypted_uint8(ctx, arrays))
    state.add_stats([s.stats_contribution() for s in silos])
    result = silos[0].train(1, state.stats_sum, state.aggregates)
    params = silos[0].global_weights([]).size
    update = result.update
    assert update.dtype == np.uint8 and update.nbytes == _expected_blob_bytes(params + 2)  # [a_k w, a_k, 1]
    alone = _wire_bytes({m.UPDATE: update})
    assert update.nbytes < alone < update.nbytes + FRAMING


def test_wire_bytes_per_parameter_at_100k():
    """At P=100k the Flower message is 15.05 bytes a parameter, as the benchmark reports."""
    study = load_study(shipped_study())
    codec = CkksCodec(new_secret_context(study.ckks), study.ckks)
    p = 100_000
    update = codec.encode(pack_update(np.random.default_rng(0).normal(0, 0.5, p), 0.3))
    assert update.nbytes == _expected_blob_bytes(p + 2)
    wire = _wire_bytes({m.UPDATE: update})
    assert wire - update.nbytes < FRAMING
    assert 15.0 < wire / p < 15.1
