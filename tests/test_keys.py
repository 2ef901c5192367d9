"""Key custody at the silo with real keys and real files: sealing, modes, atomic storage."""

from __future__ import annotations

import hashlib
import os
import stat

import numpy as np
import pytest

from policies import ckks
from policies.errors import PolicyError
from silo_node import keys
from silo_node.keys import EnrolmentKey

CONTEXT = b"study=heart-disease;policy=3f2a9c"


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_enrolment_key_is_created_once_with_mode_0600(tmp_path):
    key = EnrolmentKey.load_or_create(tmp_path)
    path = tmp_path / "keys" / "enrolment.key"
    assert key.path == path and path.exists()
    assert _mode(path) == 0o600
    assert _mode(tmp_path / "keys") == 0o700
    assert b"PRIVATE KEY" in path.read_bytes()
    again = EnrolmentKey.load_or_create(tmp_path)
    assert again.fingerprint() == key.fingerprint()
    assert again.public_bytes() == key.public_bytes() and len(key.public_bytes()) == 32
    assert not list((tmp_path / "keys").glob(".*.tmp"))  # no temp file left behind


def test_fingerprint_is_grouped_sha256(tmp_path):
    key = EnrolmentKey.load_or_create(tmp_path)
    fp = keys.fingerprint(key.public_bytes())
    groups = fp.split(" ")
    assert len(groups) == 16 and all(len(g) == 4 for g in groups)
    assert keys.fingerprint_matches(key.public_bytes(), fp.upper().replace(" ", ":"))
    other = EnrolmentKey.load_or_create(tmp_path / "other")
    assert not keys.fingerprint_matches(other.public_bytes(), fp)


def test_key_readable_by_others_is_refused(tmp_path):
    EnrolmentKey.load_or_create(tmp_path)
    path = tmp_path / "keys" / "enrolment.key"
    path.chmod(0o644)
    with pytest.raises(PolicyError, match="readable by others"):
        EnrolmentKey.load_or_create(tmp_path)


def _pins(key: EnrolmentKey) -> list[str]:
    return [key.fingerprint()]


def test_seal_open_round_trip(tmp_path):
    holder = EnrolmentKey.load_or_create(tmp_path / "holder")
    recipient = EnrolmentKey.load_or_create(tmp_path / "recipient")
    secret = os.urandom(62_000)  # the size of a sealed CKKS secret context
    sealed = holder.seal_to(recipient.public_bytes(), secret, CONTEXT)
    assert secret not in sealed and len(sealed) < len(secret) + 120
    opened = recipient.open(sealed, CONTEXT, _pins(holder))
    assert opened.plaintext == secret and opened.sender_public == holder.public_bytes()
    assert holder.seal_to(recipient.public_bytes(), secret, CONTEXT) != sealed  # fresh ephemeral key
    assert recipient.open(sealed, CONTEXT, None).plaintext == secret  # trust on first use: any sender


def test_wrong_recipient_cannot_open(tmp_path):
    holder = EnrolmentKey.load_or_create(tmp_path / "holder")
    alice = EnrolmentKey.load_or_create(tmp_path / "alice")
    mallory = EnrolmentKey.load_or_create(tmp_path / "mallory")
    sealed = holder.seal_to(alice.public_bytes(), b"study secret", CONTEXT)
    with pytest.raises(PolicyError, match="sealed to another enrolment key"):
        mallory.open(sealed, CONTEXT, _pins(holder))
    forged_id = sealed[:4] + _key_id(mallory) + sealed[12:]
    with pytest.raises(PolicyError, match="cannot open the sealed blob"):
        mallory.open(forged_id, CONTEXT, _pins(holder))  # claiming to be for mallory does not help


def _key_id(key: EnrolmentKey) -> bytes:
    return hashlib.sha256(key.public_bytes()).digest()[:8]


def test_blob_from_an_unpinned_key_is_refused(tmp_path):
    """The coordinator (or anyone) seals a context of its own making with its own key."""
    holder = EnrolmentKey.load_or_create(tmp_path / "holder")
    coordinator = EnrolmentKey.load_or_create(tmp_path / "coordinator")
    silo = EnrolmentKey.load_or_create(tmp_path / "silo")
    forged = coordinator.seal_to(silo.public_bytes(), b"a context the coordinator can read", CONTEXT)
    with pytest.raises(PolicyError, match=r"not the pinned key holder's") as err:
        silo.open(forged, CONTEXT, _pins(holder))
    assert coordinator.fingerprint() in str(err.value)  # names the key that sealed it


def test_blob_rewrapped_under_the_holders_name_is_refused(tmp_path):
    """Keeping the holder's public key in the head but sealing its own secret (ephemeral-
    static only, as v1 did) does not work: the coordinator lacks the static-static secret."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    holder = EnrolmentKey.load_or_create(tmp_path / "holder")
    silo = EnrolmentKey.load_or_create(tmp_path / "silo")
    honest = holder.seal_to(silo.public_bytes(), b"the real study key", CONTEXT)
    eph = X25519PrivateKey.generate()
    eph_pub = keys._raw(eph.public_key())
    shared = eph.exchange(X25519PublicKey.from_public_bytes(silo.public_bytes()))
    head = honest[:keys._EPHEMERAL_AT] + eph_pub + os.urandom(12)
    # the coordinator's best guess for the static-static part: its own exchange with the silo
    guess = X25519PrivateKey.generate().exchange(X25519PublicKey.from_public_bytes(silo.public_bytes()))
    key = keys._derive(shared, guess, head, CONTEXT)
    rewrapped = head + ChaCha20Poly1305(key).encrypt(head[keys._NONCE_AT:], b"the coordinator's key", head + CONTEXT)
    with pytest.raises(PolicyError, match="re-wrapped"):
        silo.open(rewrapped, CONTEXT, _pins(holder))
    spliced = honest[:keys._SENDER_AT] + silo.public_bytes() + honest[keys._EPHEMERAL_AT:]
    with pytest.raises(PolicyError, match="cannot open"):
        silo.open(spliced, CONTEXT, [silo.fingerprint()])  # swapping the sender field breaks the tag
    assert silo.open(honest, CONTEXT, _pins(holder)).plaintext == b"the real study key"


def test_unauthenticated_v1_blob_is_refused(tmp_path):
    silo = EnrolmentKey.load_or_create(tmp_path)
    with pytest.raises(PolicyError, match="format v1"):
        silo.open(b"FCS\x01" + os.urandom(120), CONTEXT, None)


def test_wrong_context_or_tampering_cannot_open(tmp_path):
    holder = EnrolmentKey.load_or_create(tmp_path / "holder")
    alice = EnrolmentKey.load_or_create(tmp_path)
    sealed = holder.seal_to(alice.public_bytes(), b"study secret", CONTEXT)
    with pytest.raises(PolicyError, match="context_info differs"):
        alice.open(sealed, b"study=heart-disease;policy=000000", _pins(holder))
    tampered = sealed[:-1] + bytes([sealed[-1] ^ 1])
    with pytest.raises(PolicyError, match="altered"):
        alice.open(tampered, CONTEXT, _pins(holder))
    with pytest.raises(PolicyError, match="not a sealed fedcohort blob"):
        alice.open(b"nonsense", CONTEXT, None)
    with pytest.raises(PolicyError, match="not a raw 32-byte X25519 key"):
        holder.seal_to(b"short", b"x", CONTEXT)


def test_study_secret_storage(tmp_path):
    path = keys.store_study_secret(tmp_path, "heart-disease", b"secret context bytes")
    assert path.parent == tmp_path / "keys" and _mode(path) == 0o600
    assert keys.load_study_secret(tmp_path, "heart-disease") == b"secret context bytes"
    with pytest.raises(PolicyError, match="already stored"):
        keys.store_study_secret(tmp_path, "heart-disease", b"another")
    keys.store_study_secret(tmp_path, "heart-disease", b"replacement", replace=True)
    assert keys.load_study_secret(tmp_path, "heart-disease") == b"replacement"
    assert _mode(path) == 0o600
    assert keys.destroy_study_secret(tmp_path, "heart-disease") is True
    assert not path.exists()
    assert keys.destroy_study_secret(tmp_path, "heart-disease") is False
    with pytest.raises(PolicyError, match="no secret stored"):
        keys.load_study_secret(tmp_path, "heart-disease")


def test_study_id_cannot_escape_the_key_directory(tmp_path):
    for bad in ("../evil", "a/b", "", "UPPER"):
        with pytest.raises(PolicyError, match="not a valid study id"):
            keys.store_study_secret(tmp_path, bad, b"x")


def test_umask_does_not_widen_modes(tmp_path):
    old = os.umask(0)
    try:
        EnrolmentKey.load_or_create(tmp_path)
        path = keys.store_study_secret(tmp_path, "s1", b"x")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "keys" / "enrolment.key") == 0o600 and _mode(path) == 0o600


def test_sealed_ckks_secret_context_end_to_end(tmp_path):
    """Key ceremony: silo A makes the study key, seals it to B, B stores it and decrypts."""
    params = ckks.CkksParams()
    ctx_a = ckks.new_secret_context(params)
    a = EnrolmentKey.load_or_create(tmp_path / "a")
    b = EnrolmentKey.load_or_create(tmp_path / "b")
    sealed = a.seal_to(b.public_bytes(), ckks.secret_context_bytes(ctx_a), CONTEXT)
    keys.store_study_secret(tmp_path / "b", "heart-disease", b.open(sealed, CONTEXT, _pins(a)).plaintext)
    ctx_b = ckks.load_context(keys.load_study_secret(tmp_path / "b", "heart-disease"), params)
    blob = ckks.encrypt_vector(ctx_a, np.arange(5.0), params=params)
    assert np.allclose(ckks.decrypt_vector(ctx_b, blob), np.arange(5.0), atol=1e-6)


def test_pins_name_peers_and_bad_pins_record_nothing(tmp_path):
    from policies.study import load_study, shipped_study
    from silo_node.approval import approve, key_holder_pins, load_approval

    study = load_study(shipped_study())
    cleveland = EnrolmentKey.load_or_create(tmp_path / "cleveland").fingerprint()
    va = EnrolmentKey.load_or_create(tmp_path / "va").fingerprint()
    for bad, why in (("cleveland=", "not FINGERPRINT"), ("=abcd", "not FINGERPRINT"), ("xyz", "not FINGERPRINT")):
        with pytest.raises(PolicyError, match=why):
            approve(tmp_path / "me", study, [bad], "it")
    with pytest.raises(PolicyError, match="two different fingerprints"):
        approve(tmp_path / "me", study, [f"cleveland={cleveland}", f"cleveland={va}"], "it")
    assert load_approval(tmp_path / "me", study) is None  # nothing recorded
    approval = approve(tmp_path / "me", study, [f"cleveland={cleveland.upper()}", va.replace(" ", ":")], "it")
    assert approval.pin_for("cleveland") == cleveland.replace(" ", "") and approval.pin_for("va") is None
    assert load_approval(tmp_path / "me", study) == approval  # survives the round trip to disk
    assert key_holder_pins(approval, study) == (cleveland.replace(" ", ""),)  # only the named holder counts
    assert key_holder_pins(None, study) is None  # no approval, no pins: trust on first use
