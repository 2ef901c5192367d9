"""The coordinator drops bad contributions before they touch the sum, logs why, and goes on."""

from __future__ import annotations

import json

import numpy as np
import pytest

from coordinator.server_app import SiloAnswer, StudyRunner
from policies import messages as m
from policies.ckks import CkksParams, aggregator_context_bytes, blob_as_uint8, encrypt_vector, load_context, new_secret_context, sum_encrypted_uint8
from policies.study import load_study, shipped_study


@pytest.fixture()
def runner(tmp_path):
    study = load_study(shipped_study())
    r = StudyRunner(grid=None, study=study, out_dir=tmp_path, timeout=1, poll=0.1, expected=4)
    secret = new_secret_context(study.ckks)
    agg = load_context(aggregator_context_bytes(secret), study.ckks)
    r.state.adder = lambda arrays: sum_encrypted_uint8(agg, arrays)
    return r, secret, study


def answer(silo: str, arr: np.ndarray, node: int) -> SiloAnswer:
    reply = m.Reply(study_id="heart-disease", policy_hash="h", round=1, nonce="n", silo=silo, status="ok")
    return SiloAnswer(node, reply, {m.UPDATE: arr})


def test_bad_contributions_are_rejected_and_logged(runner):
    r, secret, study = runner
    vec = np.linspace(-1, 1, 16)
    good = [answer(f"good{i}", blob_as_uint8(encrypt_vector(secret, vec, params=study.ckks)), i) for i in range(3)]
    corrupted = good[0].arrays[m.UPDATE].copy()
    corrupted[40:80] ^= 0xFF
    other = new_secret_context(CkksParams(poly_modulus_degree=8192, coeff_mod_bit_sizes=[60, 40, 40]))
    bad = [
        answer("corrupted", corrupted, 10),
        answer("truncated", good[1].arrays[m.UPDATE][:-100], 11),
        answer("other-context", blob_as_uint8(encrypt_vector(other, vec)), 12),
        answer("longer", blob_as_uint8(encrypt_vector(secret, np.linspace(-1, 1, 5000), params=study.ckks)), 13),
        answer("plaintext", vec.astype(np.float64), 14),
    ]
    kept = r._ok(good + bad, m.UPDATE, screen=(m.UPDATE,))
    assert [a.reply.silo for a in kept] == ["good0", "good1", "good2"]
    assert set(r.rejected) == {"corrupted", "truncated", "other-context", "longer", "plaintext"}
    logged = [json.loads(line) for line in (r.out_dir / "audit.jsonl").read_text().splitlines()]
    assert sorted(e["subject"] for e in logged if e["action"] == "reply.rejected") == sorted(r.rejected)
    # the round goes on: the kept contributions still sum and decrypt correctly
    total = r.state.adder([a.arrays[m.UPDATE] for a in kept])
    from policies.ckks import decrypt_vector

    np.testing.assert_allclose(decrypt_vector(secret, total), 3 * vec, atol=1e-6)
