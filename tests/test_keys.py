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


def test_seal_open_round_trip(tmp_path):
    recipient = EnrolmentKey.load_or_create(tmp_path)
    secret = os.urandom(62_000)  # the size of a sealed CKKS secret context
    sealed = keys.seal(recipient.public_bytes(), secret, CONTEXT)
    assert secret not in sealed and len(sealed) < len(secret) + 100
    assert recipient.open(sealed, CONTEXT) == secret
    assert keys.seal(recipient.public_bytes(), secret, CONTEXT) != sealed  # fresh ephemeral key


def test_wrong_recipient_cannot_open(tmp_path):
    alice = EnrolmentKey.load_or_create(tmp_path / "alice")
    mallory = EnrolmentKey.load_or_create(tmp_path / "mallory")
    sealed = keys.seal(alice.public_bytes(), b"study secret", CONTEXT)
    with pytest.raises(PolicyError, match="sealed to another enrolment key"):
        mallory.open(sealed, CONTEXT)
    forged_id = sealed[:4] + _key_id(mallory) + sealed[12:]
    with pytest.raises(PolicyError, match="cannot open the sealed blob"):
        mallory.open(forged_id, CONTEXT)  # claiming to be for mallory does not help


def _key_id(key: EnrolmentKey) -> bytes:
    return hashlib.sha256(key.public_bytes()).digest()[:8]


def test_wrong_context_or_tampering_cannot_open(tmp_path):
    alice = EnrolmentKey.load_or_create(tmp_path)
    sealed = keys.seal(alice.public_bytes(), b"study secret", CONTEXT)
    with pytest.raises(PolicyError, match="context_info differs"):
        alice.open(sealed, b"study=heart-disease;policy=000000")
    tampered = sealed[:-1] + bytes([sealed[-1] ^ 1])
    with pytest.raises(PolicyError, match="altered"):
        alice.open(tampered, CONTEXT)
    with pytest.raises(PolicyError, match="not a sealed fedcohort blob"):
        alice.open(b"nonsense", CONTEXT)
    with pytest.raises(PolicyError, match="not a raw 32-byte X25519 key"):
        keys.seal(b"short", b"x", CONTEXT)


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
    b = EnrolmentKey.load_or_create(tmp_path / "b")
    sealed = keys.seal(b.public_bytes(), ckks.secret_context_bytes(ctx_a), CONTEXT)
    keys.store_study_secret(tmp_path / "b", "heart-disease", b.open(sealed, CONTEXT))
    ctx_b = ckks.load_context(keys.load_study_secret(tmp_path / "b", "heart-disease"), params)
    blob = ckks.encrypt_vector(ctx_a, np.arange(5.0), params=params)
    assert np.allclose(ckks.decrypt_vector(ctx_b, blob), np.arange(5.0), atol=1e-6)
