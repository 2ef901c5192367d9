"""Key custody at the silo: the enrolment key, sealed study secrets, the stored study key.

Each silo has an X25519 enrolment key. The study's CKKS secret context, made at one silo
in the key ceremony, reaches the others sealed to their enrolment public keys, authenticated
to the key holder's enrolment key and bound to the study (id + policy hash): the
coordinator, which relays the sealed blobs, can open none of them, cannot replay one into
another study, and cannot hand a silo a context it made itself. Silos compare enrolment
fingerprints out of band: the coordinator relays the public keys too.

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
from typing import NamedTuple, Sequence

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

# sealed blob: magic+version | recipient key id | sender's enrolment public key | ephemeral public key
# | nonce | AEAD ciphertext+tag. Version 1 (no sender, anyone could seal) is refused.
_SEAL_MAGIC = b"FCS\x02"
_SEAL_MAGIC_V1 = b"FCS\x01"
_KEY_ID_LEN = 8
_PUB_LEN = 32
_NONCE_LEN = 12
_SENDER_AT = len(_SEAL_MAGIC) + _KEY_ID_LEN
_EPHEMERAL_AT = _SENDER_AT + _PUB_LEN
_NONCE_AT = _EPHEMERAL_AT + _PUB_LEN
_SEAL_HEAD_LEN = _NONCE_AT + _NONCE_LEN
_HKDF_INFO = b"fedcohort seal v2: X25519(eph,static)+X25519(static,static)-HKDF-SHA256-ChaCha20Poly1305"


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


def _derive(ephemeral_shared: bytes, static_shared: bytes, head: bytes, context_info: bytes) -> bytes:
    """One AEAD key from both X25519 secrets, bound to this exchange and this study.

    The salt is the blob's head (recipient key id, sender and ephemeral public keys, nonce)
    and the info carries `context_info` (study id + policy hash), so a key derived for one
    sender, recipient, blob or study opens nothing else.
    """
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=head,
                info=_HKDF_INFO + b"|" + context_info).derive(ephemeral_shared + static_shared)


def _x25519_public(raw: bytes, whose: str) -> X25519PublicKey:
    try:
        return X25519PublicKey.from_public_bytes(bytes(raw))
    except ValueError:
        raise PolicyError(f"the {whose} enrolment public key is not a raw 32-byte X25519 key") from None


def _exchange(private: X25519PrivateKey, public: X25519PublicKey, whose: str) -> bytes:
    try:
        return private.exchange(public)
    except ValueError:  # a low-order point gives the all-zero secret: no key agreement at all
        raise PolicyError(f"the {whose} public key is a degenerate X25519 point; refusing") from None


def _raw(public: X25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


class Opened(NamedTuple):
    plaintext: bytes
    sender_public: bytes  # the enrolment key that sealed it (authenticated by the AEAD tag)


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

    def seal_to(self, recipient_public: bytes, plaintext: bytes, context_info: bytes) -> bytes:
        """Encrypt to a peer's enrolment key so that only that peer opens it and it can tell
        that this silo's enrolment key sealed it.

        Why two key agreements rather than a signature: the AEAD key comes from
        X25519(ephemeral, recipient) and X25519(this silo's key, recipient) (HPKE's Auth mode
        in spirit). The static-static secret proves the sender, with the very key whose
        fingerprint silo IT already pinned by phone; an Ed25519 signature would need a second
        key, and a second fingerprint to compare, for the same guarantee. The ephemeral
        secret keeps every blob's key fresh. The coordinator, holding neither private key,
        can neither make a blob that opens under the holder's name nor re-wrap one.

        `context_info` (study id + policy hash) is authenticated (HKDF info and AEAD
        associated data), not sent: a sealed secret cannot be replayed into another study
        or policy version.
        """
        recipient = _x25519_public(recipient_public, "recipient's")
        ephemeral = X25519PrivateKey.generate()
        ephemeral_shared = _exchange(ephemeral, recipient, "recipient's enrolment")
        static_shared = _exchange(self._private, recipient, "recipient's enrolment")
        head = (_SEAL_MAGIC + _key_id(_raw(recipient)) + self.public_bytes() + _raw(ephemeral.public_key())
                + secrets.token_bytes(_NONCE_LEN))
        key = _derive(ephemeral_shared, static_shared, head, context_info)
        return head + ChaCha20Poly1305(key).encrypt(head[_NONCE_AT:], plaintext, head + context_info)

    def open(self, sealed: bytes, context_info: bytes, sender_pins: Sequence[str] | None) -> Opened:
        """Decrypt a blob sealed to this key for this `context_info` by a pinned sender.

        `sender_pins`: fingerprints the sender's enrolment key must match (the key holder's,
        pinned out of band); None only in trust-on-first-use demos, where any sender is
        taken and the caller should log who it was. PolicyError, nothing returned, otherwise.
        """
        sealed = bytes(sealed)
        if sealed.startswith(_SEAL_MAGIC_V1):
            raise PolicyError("sealed blob is format v1, which does not say who sealed it: refused; "
                              "the key holder must run this version and seal again")
        if len(sealed) < _SEAL_HEAD_LEN + 16 or not sealed.startswith(_SEAL_MAGIC):
            raise PolicyError("not a sealed fedcohort blob (wrong format or truncated)")
        key_id = sealed[len(_SEAL_MAGIC):_SENDER_AT]
        mine = self.public_bytes()
        if not hmac.compare_digest(key_id, _key_id(mine)):
            raise PolicyError(
                f"this blob was sealed to another enrolment key (key id {key_id.hex()}), "
                f"not this silo's ({_key_id(mine).hex()}); ask the sender to re-seal to fingerprint {self.fingerprint()}"
            )
        sender_public = sealed[_SENDER_AT:_EPHEMERAL_AT]
        if sender_pins is not None and not any(fingerprint_matches(sender_public, pin) for pin in sender_pins):
            raise PolicyError(
                f"sealed blob comes from enrolment key {fingerprint(sender_public)}, which is not the pinned "
                f"key holder's: refused (a key the coordinator or an unpinned party made)"
            )
        head = sealed[:_SEAL_HEAD_LEN]
        try:
            sender = X25519PublicKey.from_public_bytes(sender_public)
            ephemeral = X25519PublicKey.from_public_bytes(sealed[_EPHEMERAL_AT:_NONCE_AT])
            key = _derive(self._private.exchange(ephemeral), self._private.exchange(sender), head, context_info)
            plaintext = ChaCha20Poly1305(key).decrypt(head[_NONCE_AT:], sealed[_SEAL_HEAD_LEN:], head + context_info)
        except (InvalidTag, ValueError):
            raise PolicyError(
                f"cannot open the sealed blob: it was not sealed by enrolment key {fingerprint(sender_public)} "
                "for this study and policy version (context_info differs), or it was altered or re-wrapped in transit"
            ) from None
        return Opened(plaintext, sender_public)


# ---------------------------------------------------------------------------- study secret


def _study_secret_path(state_dir: str | Path, study_id: str, epoch: int = 0) -> Path:
    """Key epoch 0 (the first ceremony) keeps its original name; each re-key adds `.eN`."""
    if not _STUDY_ID.match(study_id):
        raise PolicyError(f"study id {study_id!r} is not a valid study id (lowercase letters, digits, '-')")
    if not isinstance(epoch, int) or epoch < 0:
        raise PolicyError(f"key epoch {epoch!r} is not a non-negative integer")
    suffix = "" if epoch == 0 else f".e{epoch}"
    return _keys_dir(state_dir) / f"study-{study_id}{suffix}.ckks-secret"


def study_secret_files(state_dir: str | Path, study_id: str) -> list[Path]:
    """Every key epoch's secret file of a study at this silo."""
    first = _study_secret_path(state_dir, study_id)
    return sorted(p for p in first.parent.glob(f"study-{study_id}*.ckks-secret")
                  if p == first or re.fullmatch(rf"study-{re.escape(study_id)}\.e\d+\.ckks-secret", p.name))


def study_ids_with_secrets(state_dir: str | Path) -> list[str]:
    """Studies this silo holds any secret key for."""
    directory = Path(state_dir) / KEYS_DIR
    found = (re.fullmatch(r"study-([a-z0-9][a-z0-9-]{1,62}?)(?:\.e\d+)?\.ckks-secret", p.name)
             for p in directory.glob("study-*.ckks-secret")) if directory.exists() else ()
    return sorted({m.group(1) for m in found if m})


def store_study_secret(state_dir: str | Path, study_id: str, secret_ctx_bytes: bytes, *, replace: bool = False,
                       epoch: int = 0) -> Path:
    """Keep the study's CKKS secret context of one key epoch (mode 0600, atomic). Refuses to
    overwrite an existing one unless `replace`: losing it makes every aggregate of the study unreadable."""
    path = _study_secret_path(state_dir, study_id, epoch)
    if path.exists() and not replace:
        raise PolicyError(f"{path}: a secret for study {study_id} is already stored; destroy it first or pass replace=True")
    write_atomic(path, bytes(secret_ctx_bytes), replace=True)
    return path


def load_study_secret(state_dir: str | Path, study_id: str, epoch: int = 0) -> bytes:
    path = _study_secret_path(state_dir, study_id, epoch)
    if not path.exists():
        what = "key ceremony not done at this silo?" if epoch == 0 else \
            "this silo was not in that re-key ceremony: revoked, withdrawn or not connected then"
        raise PolicyError(f"{path}: no secret stored for study {study_id} key epoch {epoch} ({what})")
    return read_private(path, "study secret")


def shred_file(path: Path) -> dict | None:
    """Overwrite with zeros, fsync, unlink (best effort: SSDs and copy-on-write filesystems
    may keep old blocks). Returns what an audit log may keep about it (name, size, sha256
    of the contents before), or None if there was no file."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        data = b"".join(iter(lambda: os.read(fd, 1 << 20), b""))
        os.lseek(fd, 0, os.SEEK_SET)
        write_all(fd, bytes(len(data)))
        os.fsync(fd)
    finally:
        os.close(fd)
    path.unlink()
    fsync_dir(path.parent)
    return {"file": path.name, "bytes": len(data), "sha256_before": hashlib.sha256(data).hexdigest()}


def destroy_study_secret(state_dir: str | Path, study_id: str) -> bool:
    """Shred the first key epoch's secret (see `silo_node.key_lifecycle` for every epoch,
    with the audit record). Returns whether a secret was there."""
    return shred_file(_study_secret_path(state_dir, study_id)) is not None


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


