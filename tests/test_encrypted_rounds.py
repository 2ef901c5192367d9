"""Encrypted rounds in process: real TenSEAL ciphertexts through the silo and coordinator code."""

from __future__ import annotations

import numpy as np
import pytest

from coordinator.demo import sample_cohorts
from coordinator.rounds import StudyState
from policies.ckks import has_secret_key, load_context, sum_encrypted_uint8
from policies.errors import PolicyError
from policies.metrics import metrics_from_counts
from policies.study import load_study, shipped_study
from silo_node.worker import Silo

ROUNDS = 3


def _study(encryption: str):
    base = load_study(shipped_study())
    return base.model_copy(update={"encryption": encryption, "privacy": "none",
                                   "training": base.training.model_copy(update={"rounds": ROUNDS})})


def _run(study, tmp_path, ceremony: bool):
    silos = [Silo.from_cohort(n, study, p, state_dir=tmp_path / study.encryption / n) for n, p in sample_cohorts().items()]
    state = StudyState(study.id, study.policy_hash())
    if ceremony:
        aggregator, sealed = silos[0].make_study_key({s.name: s.enrolment_public() for s in silos[1:]})
        for s in silos[1:]:
            s.receive_study_key(sealed[s.name])
        ctx = load_context(aggregator, study.ckks)
        assert not has_secret_key(ctx)
        with pytest.raises(Exception):
            ctx.secret_key()
        state.adder = lambda arrays: sum_encrypted_uint8(ctx, arrays)
    state.add_stats([s.stats_contribution() for s in silos])
    for r in range(1, ROUNDS + 1):
        state.add_round([s.train(r, state.stats_sum, state.aggregates).update for s in silos])
    evals = state.adder([s.encode_eval(s.evaluate(state.stats_sum, state.aggregates)) for s in silos])
    return silos, state, silos[1].reveal(evals)


def test_ckks_rounds_match_plaintext_rounds(tmp_path):
    silos, state, pooled = _run(_study("ckks"), tmp_path, ceremony=True)
    assert all(a.dtype == np.uint8 for a in state.aggregates)  # the coordinator only ever held ciphertexts
    _, _, plain = _run(_study("none"), tmp_path, ceremony=False)
    enc, ref = metrics_from_counts(pooled), metrics_from_counts(plain)
    assert enc["n"] == ref["n"] == 254
    assert enc["accuracy"] == pytest.approx(ref["accuracy"], abs=1 / 254)
    assert enc["loss"] == pytest.approx(ref["loss"], abs=1e-3)
    w_enc = silos[0].global_weights(state.aggregates)
    w_again = silos[3].global_weights(state.aggregates)
    np.testing.assert_allclose(w_enc, w_again, atol=1e-12)  # every silo holds the same model


def test_revealed_counts_are_rounded_and_need_the_minimum(tmp_path):
    silos, state, pooled = _run(_study("ckks"), tmp_path, ceremony=True)
    counts = np.delete(pooled, 4)
    assert np.array_equal(counts, np.round(counts))  # nothing un-rounded leaves a silo (IND-CPA-D)
    two = sum_encrypted_uint8(load_context(silos[0].make_study_key({})[0], silos[0].study.ckks),
                              [silos[0].encode_eval(silos[0].evaluate(state.stats_sum, []))] * 2)
    with pytest.raises(PolicyError, match="contributors"):
        silos[0].reveal(two)


def test_plaintext_vector_is_refused_by_an_encrypted_silo(tmp_path):
    silos, state, _ = _run(_study("ckks"), tmp_path, ceremony=True)
    with pytest.raises(PolicyError, match="ciphertext"):
        silos[0].global_weights([np.zeros(16)])


def test_key_holder_seals_only_to_pinned_peers(tmp_path):
    """A key the coordinator substituted (not pinned by silo IT) gets no sealed study key."""
    from silo_node.approval import approve, require_approval
    from silo_node.keys import EnrolmentKey

    study = _study("ckks")
    silos = [Silo.from_cohort(n, study, p, state_dir=tmp_path / n) for n, p in sample_cohorts().items()]
    holder, peers = silos[0], silos[1:]
    pins = [EnrolmentKey.load_or_create(tmp_path / s.name).fingerprint() for s in peers]
    approve(tmp_path / holder.name, study, pins, "test")
    assert require_approval(tmp_path / holder.name, study).pins
    impostor = EnrolmentKey.load_or_create(tmp_path / "coordinator-impostor").public_bytes()
    relayed = {s.name: s.enrolment_public() for s in peers[:2]} | {peers[2].name: impostor}
    _, sealed = holder.make_study_key(relayed)
    assert set(sealed) == {peers[0].name, peers[1].name}
    peers[0].receive_study_key(sealed[peers[0].name])
    with pytest.raises(PolicyError):
        peers[2].receive_study_key(holder.make_study_key({peers[2].name: peers[0].enrolment_public()})[1][peers[2].name])


def test_changed_policy_needs_new_approval(tmp_path):
    from silo_node.approval import approve, require_approval

    study = _study("ckks")
    approve(tmp_path, study, [], "test")
    changed = study.model_copy(update={"min_silos": 4})
    with pytest.raises(PolicyError, match="approved again"):
        require_approval(tmp_path, changed)


def _pinned_silos(tmp_path, study):
    """Four silos whose IT pinned every peer by name, as `silo-node approve --pin NAME=FP` does."""
    from silo_node.approval import approve
    from silo_node.keys import EnrolmentKey

    silos = [Silo.from_cohort(n, study, p, state_dir=tmp_path / n) for n, p in sample_cohorts().items()]
    fps = {s.name: EnrolmentKey.load_or_create(tmp_path / s.name).fingerprint() for s in silos}
    for s in silos:
        approve(tmp_path / s.name, study, [f"{n}={fp}" for n, fp in fps.items() if n != s.name], "test")
    return silos


def test_silos_accept_the_key_only_from_the_pinned_holder(tmp_path):
    """Honest ceremony and a late joiner work; a context the coordinator made and sealed
    with its own key, or one from another pinned hospital that is not the named holder,
    is refused and nothing is stored."""
    from silo_node.keys import EnrolmentKey, load_study_secret

    study = _study("ckks")
    assert study.ckks.key_holder == "cleveland"
    holder, hungary, switzerland, va = _pinned_silos(tmp_path, study)
    _, sealed = holder.make_study_key({s.name: s.enrolment_public() for s in (hungary, switzerland)})
    sender, pinned = hungary.receive_study_key(sealed["hungary"])
    assert sender == holder.enrolment_public() and pinned
    switzerland.receive_study_key(sealed["switzerland"])
    late = holder.share_study_key({"va": va.enrolment_public()})  # a silo joining later
    va.receive_study_key(late["va"])
    assert load_study_secret(tmp_path / "va", study.id) == load_study_secret(tmp_path / "cleveland", study.id)

    # the coordinator makes a context of its own and seals it with its own key to a fresh silo
    from policies.ckks import new_secret_context, secret_context_bytes

    newcomer = Silo.from_cohort("va", study, sample_cohorts()["va"], state_dir=tmp_path / "va2")
    from silo_node.approval import approve

    approve(tmp_path / "va2", study, [f"cleveland={EnrolmentKey.load_or_create(tmp_path / 'cleveland').fingerprint()}"], "t")
    own = secret_context_bytes(new_secret_context(study.ckks))
    coordinator_key = EnrolmentKey.load_or_create(tmp_path / "coordinator")
    forged = coordinator_key.seal_to(newcomer.enrolment_public(), own, newcomer._context_info())
    with pytest.raises(PolicyError, match="not the pinned key holder"):
        newcomer.receive_study_key(forged)
    # another hospital (pinned, but not the policy's key holder) cannot hand out a key either
    by_hungary = EnrolmentKey.load_or_create(tmp_path / "hungary").seal_to(newcomer.enrolment_public(), own,
                                                                            newcomer._context_info())
    with pytest.raises(PolicyError, match="not the pinned key holder"):
        newcomer.receive_study_key(by_hungary)
    with pytest.raises(PolicyError, match="no secret stored"):
        load_study_secret(tmp_path / "va2", study.id)


def test_only_the_named_holder_makes_the_key_and_unnamed_pins_are_refused(tmp_path):
    from silo_node.approval import approve

    study = _study("ckks")
    holder, hungary, *_ = _pinned_silos(tmp_path, study)
    with pytest.raises(PolicyError, match="names 'cleveland' as key holder, not this silo"):
        hungary.make_study_key({"va": holder.enrolment_public()})
    _, sealed = holder.make_study_key({"hungary": hungary.enrolment_public()})
    approve(tmp_path / "hungary", study, [holder.enrolment_public().hex()[:8]], "pinned without names")
    with pytest.raises(PolicyError, match="--pin cleveland=FINGERPRINT"):
        hungary.receive_study_key(sealed["hungary"])


def test_refused_key_is_audit_logged_and_nothing_stored(tmp_path):
    """Through the silo service's handler: the refusal names the key and lands in the silo's log;
    the holder's log names every key it sealed to and every unpinned one it refused."""
    import hashlib
    import json

    from policies import messages as msg
    from policies.audit import open_party_log
    from silo_node.keys import EnrolmentKey
    from silo_node.service import handle

    study = _study("ckks")
    holder, hungary, *_ = _pinned_silos(tmp_path, study)
    log = open_party_log(tmp_path / "hungary", "hungary", "silo")
    hungary.audit = log
    impostor = EnrolmentKey.load_or_create(tmp_path / "impostor")
    forged = impostor.seal_to(hungary.enrolment_public(), b"not the study key", hungary._context_info())
    req = msg.Request(study_id=study.id, policy_hash=study.policy_hash(), round=0, nonce=msg.new_nonce())
    arrays = {msg.SEALED: np.frombuffer(forged, dtype=np.uint8)}
    reply, out = handle(hungary, log, msg.KEYRECV, req.model_dump(), arrays)
    assert reply["status"] == "refused" and "not the pinned key holder" in reply["reason"] and out == {}
    assert not (tmp_path / "hungary" / "keys" / f"study-{study.id}.ckks-secret").exists()
    holder.audit = open_party_log(tmp_path / "cleveland", "cleveland", "silo")
    peers = {"7": np.frombuffer(hungary.enrolment_public(), dtype=np.uint8),
             "8": np.frombuffer(impostor.public_bytes(), dtype=np.uint8)}
    reply, out = handle(holder, holder.audit, msg.KEYGEN, req.model_dump(), {msg.peer_key(n): v for n, v in peers.items()})
    assert reply["status"] == "ok" and set(out) == {msg.AGG_CTX, msg.sealed_key("7")}
    sealed = {"hungary": out[msg.sealed_key("7")].tobytes()}
    holder_log = [json.loads(line) for line in holder.audit.path.read_text().splitlines()]
    assert [(e["action"], e["subject"], e["details"]["fingerprint"]) for e in holder_log if e["action"].startswith("key.")] == [
        ("key.sealed", "node-7", hashlib.sha256(hungary.enrolment_public()).hexdigest()),
        ("key.refused_unpinned", "node-8", hashlib.sha256(impostor.public_bytes()).hexdigest())]
    reply, _ = handle(hungary, log, msg.KEYRECV, req.model_copy(update={"nonce": msg.new_nonce()}).model_dump(),
                      {msg.SEALED: np.frombuffer(sealed["hungary"], dtype=np.uint8)})
    assert reply["status"] == "ok"
    entries = [json.loads(line) for line in log.path.read_text().splitlines()]
    refused = [e for e in entries if e["action"] == "keyrecv.refused"]
    assert len(refused) == 1 and impostor.fingerprint() in refused[0]["details"]["reason"]
    received = [e for e in entries if e["action"] == "key.received"]
    assert received[0]["details"] == {"sealed_by_fingerprint": hashlib.sha256(holder.enrolment_public()).hexdigest(),
                                      "holder_pinned": True}
