"""Key custody at the silo: the enrolment key, sealed study secrets, the stored study key.

Each silo has an X25519 enrolment key. The study's CKKS secret context, made at one silo
in the key ceremony, reaches the others sealed to their enrolment public keys and bound to
the study (id + policy hash), so the coordinator, which relays the sealed blobs, can open
none of them and cannot replay one into another study. Silos compare enrolment
fingerprints out of band before sealing: the coordinator relays the public keys too.

Everything lives under `state_dir/keys/` (mode 0700), every file mode 0600, written
atomically (temp file, fsync, rename) so a crash never leaves half a key behind.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from policies.durable import fsync_dir, private_dir, read_private, write_all, write_atomic
from policies.errors import PolicyError

KEYS_DIR = "keys"
ENROLMENT_FILE = "enrolment.key"
_STUDY_ID = re.compile(r"^[a-z0-9][a-z0-9-]{1,62}$")  # same rule as StudySpec.id

# sealed blob: magic+version | recipient key id | ephemeral public key | nonce | AEAD ciphertext+tag
_SEAL_MAGIC = b"FCS\x01"
_KEY_ID_LEN = 8
_PUB_LEN = 32
_NONCE_LEN = 12
_SEAL_HEAD_LEN = len(_SEAL_MAGIC) + _KEY_ID_LEN + _PUB_LEN + _NONCE_LEN
_HKDF_INFO = b"fedcohort seal v1: X25519-HKDF-SHA256-ChaCha20Poly1305"


def fingerprint(public_bytes: bytes) -> str:
    """sha256 of a raw enrolment public key, hex in groups of 4, for reading aloud or
    comparing on paper: how silos pin each other's keys out of band."""
    digest = hashlib.sha256(public_bytes).hexdigest()
    return " ".join(digest[i:i + 4] for i in range(0, len(digest), 4))


def fingerprint_matches(public_bytes: bytes, pinned: str) -> bool:
    """Whether a relayed public key is the one pinned out of band (spaces, colons and
    case in the pinned text are ignored; constant-time comparison)."""
    normalised = re.sub(r"[\s:]", "", pinned).lower()
    return hmac.compare_digest(normalised, hashlib.sha256(public_bytes).hexdigest())


def _key_id(public_bytes: bytes) -> bytes:
    return hashlib.sha256(public_bytes).digest()[:_KEY_ID_LEN]


def _derive(shared: bytes, ephemeral_public: bytes, recipient_public: bytes) -> bytes:
    """Both public keys go into the salt so a key is bound to this exact exchange."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=ephemeral_public + recipient_public,
                info=_HKDF_INFO).derive(shared)


def seal(recipient_public: bytes, plaintext: bytes, context_info: bytes) -> bytes:
    """Encrypt to a silo's enrolment key (ephemeral X25519 + HKDF-SHA256 + ChaCha20-Poly1305).

    `context_info` (e.g. study id + policy hash) is authenticated, not sent: the recipient
    must supply the same bytes to open, so a sealed secret cannot be replayed into another
    study or policy version.
    """
    try:
        recipient = X25519PublicKey.from_public_bytes(recipient_public)
    except ValueError:
        raise PolicyError("the recipient's enrolment public key is not a raw 32-byte X25519 key") from None
    ephemeral = X25519PrivateKey.generate()
    ephemeral_public = ephemeral.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    try:
        shared = ephemeral.exchange(recipient)
    except ValueError:
        raise PolicyError("the recipient's enrolment public key is a degenerate X25519 point; refusing") from None
    key = _derive(shared, ephemeral_public, recipient_public)
    nonce = secrets.token_bytes(_NONCE_LEN)
    head = _SEAL_MAGIC + _key_id(recipient_public) + ephemeral_public + nonce
    return head + ChaCha20Poly1305(key).encrypt(nonce, plaintext, head + context_info)


class EnrolmentKey:
    """This silo's X25519 enrolment key, kept at `state_dir/keys/enrolment.key` (PKCS8 PEM, 0600)."""

    def __init__(self, private_key: X25519PrivateKey, path: Path) -> None:
        self._private = private_key
        self.path = path

    @classmethod
    def load_or_create(cls, state_dir: str | Path) -> "EnrolmentKey":
        """Load the silo's key, creating it once; two processes starting together end up
        with the same key (the file is linked into place, never replaced)."""
        path = _keys_dir(state_dir) / ENROLMENT_FILE
        if not path.exists():
            pem = X25519PrivateKey.generate().private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
            write_atomic(path, pem, replace=False)
        return cls(_load_private_key(path), path)

    def public_bytes(self) -> bytes:
        return self._private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    def fingerprint(self) -> str:
        return fingerprint(self.public_bytes())

    def open(self, sealed: bytes, context_info: bytes) -> bytes:
        """Decrypt a blob sealed to this key for this `context_info`; PolicyError otherwise."""
        sealed = bytes(sealed)
        if len(sealed) < _SEAL_HEAD_LEN + 16 or not sealed.startswith(_SEAL_MAGIC):
            raise PolicyError("not a sealed fedcohort blob (wrong format or truncated)")
        key_id = sealed[len(_SEAL_MAGIC):len(_SEAL_MAGIC) + _KEY_ID_LEN]
        mine = self.public_bytes()
        if not hmac.compare_digest(key_id, _key_id(mine)):
            raise PolicyError(
                f"this blob was sealed to another enrolment key (key id {key_id.hex()}), "
                f"not this silo's ({_key_id(mine).hex()}); ask the sender to re-seal to fingerprint {self.fingerprint()}"
            )
        ephemeral_public = sealed[_SEAL_HEAD_LEN - _NONCE_LEN - _PUB_LEN:_SEAL_HEAD_LEN - _NONCE_LEN]
        nonce = sealed[_SEAL_HEAD_LEN - _NONCE_LEN:_SEAL_HEAD_LEN]
        try:
            shared = self._private.exchange(X25519PublicKey.from_public_bytes(ephemeral_public))
            key = _derive(shared, ephemeral_public, mine)
            return ChaCha20Poly1305(key).decrypt(nonce, sealed[_SEAL_HEAD_LEN:], sealed[:_SEAL_HEAD_LEN] + context_info)
        except (InvalidTag, ValueError):
            raise PolicyError(
                "cannot open the sealed blob: it was sealed for another study or policy version "
                "(context_info differs) or altered in transit"
            ) from None


# ---------------------------------------------------------------------------- study secret


def _study_secret_path(state_dir: str | Path, study_id: str) -> Path:
    if not _STUDY_ID.match(study_id):
        raise PolicyError(f"study id {study_id!r} is not a valid study id (lowercase letters, digits, '-')")
    return _keys_dir(state_dir) / f"study-{study_id}.ckks-secret"


def store_study_secret(state_dir: str | Path, study_id: str, secret_ctx_bytes: bytes, *, replace: bool = False) -> Path:
    """Keep the study's CKKS secret context (mode 0600, atomic). Refuses to overwrite an
    existing one unless `replace`: losing it makes every aggregate of the study unreadable."""
    path = _study_secret_path(state_dir, study_id)
    if path.exists() and not replace:
        raise PolicyError(f"{path}: a secret for study {study_id} is already stored; destroy it first or pass replace=True")
    write_atomic(path, bytes(secret_ctx_bytes), replace=True)
    return path


def load_study_secret(state_dir: str | Path, study_id: str) -> bytes:
    path = _study_secret_path(state_dir, study_id)
    if not path.exists():
        raise PolicyError(f"{path}: no secret stored for study {study_id} (key ceremony not done at this silo?)")
    return read_private(path, "study secret")


def destroy_study_secret(state_dir: str | Path, study_id: str) -> bool:
    """Overwrite with zeros, fsync, unlink (best effort: SSDs and copy-on-write filesystems
    may keep old blocks). Returns whether a secret was there."""
    path = _study_secret_path(state_dir, study_id)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        write_all(fd, bytes(os.fstat(fd).st_size))
        os.fsync(fd)
    finally:
        os.close(fd)
    path.unlink()
    fsync_dir(path.parent)
    return True


# ---------------------------------------------------------------------------- files


def _keys_dir(state_dir: str | Path) -> Path:
    return private_dir(Path(state_dir) / KEYS_DIR)


def _load_private_key(path: Path) -> X25519PrivateKey:
    pem = read_private(path, "enrolment key")
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise PolicyError(f"{path}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, X25519PrivateKey):
        raise PolicyError(f"{path}: the enrolment key must be X25519, found {type(key).__name__}")
    return key


