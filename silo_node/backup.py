"""Encrypted backup and restore of a silo's state directory.

Why: a hospital runs its node for years; a dead disk must not cost it its keys (without
the enrolment key it cannot rejoin a study, without a study's CKKS secret it cannot read
aggregates), its privacy ledgers (spend is never reset) or its audit log (evidence).

What is in an archive: every regular file of the state directory that is state (keys,
ledgers and their index, approvals, the outbox, the audit log, certificates), never the
service's per-start socket and key, lock and temp files, audit exports (re-exportable),
nor anything that looks like cohort data (patient rows never leave the silo's data
store, not even into its backups): ``EXCLUDED``, ``DATA_SUFFIXES``.

Archive format (version 1), one file, mode 0600, written atomically:

    MAGIC (8 bytes) | header length (4 bytes, big endian) | header (canonical JSON) | ciphertext

The header names the format version, the KDF (scrypt with its salt and cost, or a 32-byte
key file) and the AEAD nonce; the ciphertext is AES-256-GCM over a tar of the files plus
``backup-manifest.json`` (each file's sha256, size and mode, and each ledger's head), with
MAGIC, length and header as associated data: changing any byte of the file, header
included, fails authentication, so a wrong passphrase and a tampered archive are both
refused before anything is written.

Restoring an *older* archive rolls the privacy ledger back. The silo cannot tell by
itself; the coordinator can: every training request carries the ledger head
(seq, hash) the coordinator last witnessed from this silo, and ``PrivacyLedger.check_witness``
refuses to train while the ledger holds fewer charges than that. Silo IT resolves it by
restoring a backup at least as new as the coordinator's witness (``restore`` keeps the
state it replaced next to the state directory); nothing ever resets the spend.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import io
import json
import os
import secrets
import shutil
import socket
import stat
import struct
import tarfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from policies.audit import AUDIT_FILE, open_party_log
from policies.durable import fsync_dir, read_private, write_atomic, write_new_file
from policies.errors import PolicyError
from policies.study import canonical_json

MAGIC = b"FCSILOBK"
FORMAT = "fedcohort-silo-backup"
VERSION = 1
MANIFEST = "backup-manifest.json"
KEY_BYTES = 32
NONCE_BYTES = 12
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1  # ~32 MiB and ~0.1-0.3 s per derivation
MAX_SCRYPT_N = 2**20  # refuse headers that would make restore eat gigabytes
MIN_PASSPHRASE = 12
MAX_HEADER = 4096
BACKUP_ACTION = "state.backed_up"
RESTORE_ACTION = "state.restored"

# transient or derived, never state: the service's socket and per-start key, locks, exports
EXCLUDED = frozenset({"silo.sock", "silo.key", "ledger/.lock", "exports"})
DATA_SUFFIXES = (".parquet", ".csv", ".tsv", ".feather", ".arrow", ".xlsx", ".xls", ".sav", ".dta")


# ---- what is backed up ---------------------------------------------------------------------


@dataclass(frozen=True)
class Selection:
    """The state files to archive (relative POSIX paths) and what was left out, and why."""

    files: list[str]
    skipped: dict[str, str]


def _skip_reason(rel: PurePosixPath, path: Path) -> str:
    if str(rel) in EXCLUDED or rel.parts[0] in EXCLUDED:
        return "transient or re-exportable, not state"
    if rel.name.endswith(".tmp"):
        return "temp file of an unfinished write"
    if path.is_symlink():
        return "symbolic link (not followed)"
    if rel.suffix.lower() in DATA_SUFFIXES:
        return "looks like cohort data: patient rows are never backed up with the node's state"
    if not path.is_file():
        return "not a regular file"
    return ""


def select_state(state_dir: Path) -> Selection:
    """Walk the state directory (links not followed) and sort files into state and skipped."""
    files, skipped = [], {}
    for root, dirs, names in os.walk(state_dir):
        root_path = Path(root)
        for name in sorted(dirs):
            rel = PurePosixPath((root_path / name).relative_to(state_dir).as_posix())
            if str(rel) in EXCLUDED or (root_path / name).is_symlink():
                skipped[str(rel)] = _skip_reason(rel, root_path / name) or "excluded"
                dirs.remove(name)
        for name in sorted(names):
            path = root_path / name
            rel = PurePosixPath(path.relative_to(state_dir).as_posix())
            reason = _skip_reason(rel, path)
            if reason:
                skipped[str(rel)] = reason
            else:
                files.append(str(rel))
    return Selection(sorted(files), skipped)


# ---- keys ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Secret:
    """How the archive key is obtained: a passphrase (scrypt) or a raw 32-byte key file."""

    passphrase: bytes | None = None
    key: bytes | None = None


def passphrase_from_file(path: Path) -> Secret:
    """The first line of a 0600 file (trailing newline removed)."""
    data = read_private(Path(path), "backup passphrase file")
    return _passphrase(data.split(b"\n", 1)[0].rstrip(b"\r"), str(path))


def passphrase_from_text(text: str, source: str = "stdin") -> Secret:
    return _passphrase(text.split("\n", 1)[0].rstrip("\r").encode("utf-8"), source)


def _passphrase(value: bytes, source: str) -> Secret:
    if len(value) < MIN_PASSPHRASE:
        raise PolicyError(f"backup passphrase from {source} is {len(value)} characters; use at least {MIN_PASSPHRASE}")
    return Secret(passphrase=value)


def key_from_file(path: Path) -> Secret:
    """A 0600 file holding exactly 32 random bytes, raw or as 64 hex digits."""
    data = read_private(Path(path), "backup key file")
    text = data.strip()
    if len(data) == KEY_BYTES:
        return Secret(key=data)
    if len(text) == 2 * KEY_BYTES:
        try:
            return Secret(key=bytes.fromhex(text.decode("ascii")))
        except (UnicodeDecodeError, ValueError):
            pass
    raise PolicyError(f"{path}: a backup key file holds exactly {KEY_BYTES} bytes (raw, or {2 * KEY_BYTES} hex "
                      f"digits), found {len(data)} bytes; make one with: head -c {KEY_BYTES} /dev/urandom > FILE")


def _kdf_header(secret: Secret) -> dict[str, Any]:
    if secret.key is not None:
        return {"name": "key-file"}
    salt = secrets.token_bytes(16)
    return {"name": "scrypt", "salt": base64.b64encode(salt).decode("ascii"), "n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P}


def _derive(secret: Secret, kdf: dict[str, Any], source: str) -> bytes:
    name = kdf.get("name")
    if name == "key-file":
        if secret.key is None:
            raise PolicyError(f"{source} was made with a key file: restore it with --key-file")
        return secret.key
    if name != "scrypt":
        raise PolicyError(f"{source}: unknown key derivation {name!r}")
    if secret.passphrase is None:
        raise PolicyError(f"{source} was made with a passphrase: restore it with --passphrase-file or --passphrase-stdin")
    try:
        salt, n, r, p = base64.b64decode(kdf["salt"], validate=True), int(kdf["n"]), int(kdf["r"]), int(kdf["p"])
    except (KeyError, TypeError, ValueError):
        raise PolicyError(f"{source}: damaged header (scrypt parameters)") from None
    if not (2 <= n <= MAX_SCRYPT_N and n & (n - 1) == 0 and 1 <= r <= 32 and 1 <= p <= 16 and len(salt) >= 16):
        raise PolicyError(f"{source}: scrypt parameters out of range (n={n}, r={r}, p={p}): refusing to derive")
    return Scrypt(salt=salt, length=KEY_BYTES, n=n, r=r, p=p).derive(secret.passphrase)


# ---- the archive file -----------------------------------------------------------------------


def _snapshot(state_dir: Path, selection: Selection) -> tuple[dict[str, bytes], dict[str, Any]]:
    """Read every file once, the ledgers' lock held (no charge half-way), and describe it."""
    from silo_node.ledger import _locked  # the ledgers' own lock: one writer at a time

    contents: dict[str, bytes] = {}
    described: dict[str, Any] = {}
    with _locked(state_dir):
        for rel in selection.files:
            path = state_dir / rel
            try:
                mode = stat.S_IMODE(path.stat().st_mode) & 0o700 or 0o600
                data = _read_whole_lines(path) if rel == AUDIT_FILE else path.read_bytes()
            except FileNotFoundError:
                continue  # removed meanwhile (an outbox entry rotated out): not state any more
            contents[rel] = data
            described[rel] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "mode": mode}
    return contents, described


def _read_whole_lines(path: Path) -> bytes:
    """The audit log under a shared lock: appenders hold an exclusive one while they write a line."""
    with open(path, "rb") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_SH)
        return fh.read()


def _plaintext(contents: dict[str, bytes], manifest: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
        for name, data, mode in [(MANIFEST, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode(), 0o600),
                                 *((rel, data, manifest["files"][rel]["mode"]) for rel, data in contents.items())]:
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _seal(plaintext: bytes, secret: Secret, meta: dict[str, Any]) -> bytes:
    kdf = _kdf_header(secret)
    nonce = secrets.token_bytes(NONCE_BYTES)
    header = {"format": FORMAT, "version": VERSION, "aead": "AES-256-GCM", "kdf": kdf,
              "nonce": base64.b64encode(nonce).decode("ascii"), **meta}
    header_bytes = canonical_json(header).encode("ascii")
    prefix = MAGIC + struct.pack(">I", len(header_bytes)) + header_bytes
    key = _derive(secret, kdf, "backup")
    return prefix + AESGCM(key).encrypt(nonce, plaintext, prefix)


def _open(blob: bytes, secret: Secret, source: str) -> tuple[dict[str, Any], bytes]:
    """(header, plaintext) or PolicyError: not an archive, another version, wrong key, altered."""
    if not blob.startswith(MAGIC) or len(blob) < len(MAGIC) + 4:
        raise PolicyError(f"{source}: not a fedcohort silo backup (no {MAGIC.decode()} header)")
    (length,) = struct.unpack(">I", blob[len(MAGIC):len(MAGIC) + 4])
    if length > MAX_HEADER or len(blob) < len(MAGIC) + 4 + length:
        raise PolicyError(f"{source}: damaged header (length {length})")
    prefix = blob[: len(MAGIC) + 4 + length]
    try:
        header = json.loads(prefix[len(MAGIC) + 4:])
        nonce = base64.b64decode(header["nonce"], validate=True)
    except (ValueError, KeyError, TypeError):
        raise PolicyError(f"{source}: damaged header (not the JSON this tool writes)") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise PolicyError(f"{source}: not a fedcohort silo backup (format {header.get('format')!r})")
    if header.get("version") != VERSION:
        raise PolicyError(f"{source}: backup format version {header.get('version')!r}; this silo-node reads version "
                          f"{VERSION}: restore it with the silo-node release that wrote it")
    if header.get("aead") != "AES-256-GCM" or len(nonce) != NONCE_BYTES:
        raise PolicyError(f"{source}: unsupported encryption {header.get('aead')!r}")
    key = _derive(secret, header.get("kdf") or {}, source)
    try:
        return header, AESGCM(key).decrypt(nonce, blob[len(prefix):], prefix)
    except InvalidTag:
        raise PolicyError(f"{source}: wrong passphrase or key, or the archive was altered or truncated "
                          f"(authentication failed); nothing was written") from None


# ---- backup ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class BackupResult:
    path: Path
    sha256: str
    size: int
    files: int
    ledgers: dict[str, dict[str, Any]]
    skipped: dict[str, str]


def backup(state_dir: Path, out: Path, secret: Secret, *, actor: str = "silo-it") -> BackupResult:
    """Write the encrypted archive of the state directory to ``out`` (0600, temp + fsync +
    rename; an existing file is refused), then record it in the silo's audit log."""
    state_dir, out = Path(state_dir).resolve(), Path(out).resolve()
    if not state_dir.is_dir():
        raise PolicyError(f"{state_dir}: no such state directory")
    if out.exists():
        raise PolicyError(f"{out}: already exists; choose a new file name (backups are never overwritten)")
    if out.is_relative_to(state_dir):
        raise PolicyError(f"{out}: write the backup outside the state directory it backs up")
    if not out.parent.is_dir():
        raise PolicyError(f"{out.parent}: no such directory for the backup")
    selection = select_state(state_dir)
    contents, described = _snapshot(state_dir, selection)
    ledgers = _ledger_heads(contents)
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    manifest = {"format": FORMAT, "version": VERSION, "created_at": created, "files": described, "ledgers": ledgers,
                "audit_head": _audit_head(contents)}
    blob = _seal(_plaintext(contents, manifest), secret, {"created_at": created})
    write_atomic(out, blob, replace=False)
    if not out.exists() or out.stat().st_size != len(blob):
        raise PolicyError(f"{out}: another file appeared there meanwhile; the backup was not written")
    digest = hashlib.sha256(blob).hexdigest()
    if AUDIT_FILE in contents:
        _log(state_dir, BACKUP_ACTION, out.name, {
            "sha256": digest, "bytes": len(blob), "files": len(contents), "created_at": created,
            "audit_head_seq": manifest["audit_head"]["seq"],
            "ledgers": {study: h["seq"] for study, h in ledgers.items()},
        }, actor)
    return BackupResult(out, digest, len(blob), len(contents), ledgers, selection.skipped)


def _ledger_heads(contents: dict[str, bytes]) -> dict[str, dict[str, Any]]:
    heads = {}
    for rel, data in contents.items():
        parts = PurePosixPath(rel).parts
        if len(parts) != 2 or parts[0] != "ledger" or parts[1] in ("index.json", "silo_ceiling.json"):
            continue
        if not parts[1].endswith(".json"):
            continue
        try:
            state = json.loads(data)
            heads[str(state["study_id"])] = {"seq": int(state["seq"]), "head": str(state["head"])}
        except (ValueError, KeyError, TypeError):
            heads[parts[1][: -len(".json")]] = {"seq": -1, "head": "unreadable"}
    return heads


def _audit_head(contents: dict[str, bytes]) -> dict[str, Any]:
    """(seq, hash) of the archived audit log's last entry: the chain a restore gives back."""
    data = contents.get(AUDIT_FILE, b"")
    last = data.rstrip(b"\n").rsplit(b"\n", 1)[-1] if data.strip() else b""
    if not last:
        return {"seq": 0, "hash": "0" * 64}
    try:
        entry = json.loads(last)
        return {"seq": int(entry["seq"]), "hash": str(entry["hash"])}
    except (ValueError, KeyError, TypeError):
        return {"seq": -1, "hash": "unreadable"}


def _log(state_dir: Path, action: str, subject: str, details: dict[str, Any], actor: str) -> None:
    name = state_dir.name
    open_party_log(state_dir, name, "silo").append(action, subject, details, actor=actor, role="admin")


# ---- restore ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class RestoreResult:
    state_dir: Path
    files: int
    created_at: str
    ledgers: dict[str, dict[str, Any]]
    audit_head: dict[str, Any]
    replaced: Path | None  # where the state that was there before now is (with --force)


def _members(plaintext: bytes, source: str) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The manifest and the files, each checked: safe relative path, regular file, listed,
    sha256 as listed. Nothing is extracted to disk here."""
    files: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(plaintext), mode="r:gz") as tar:
            for info in tar.getmembers():
                rel = PurePosixPath(info.name)
                if not info.isfile() or rel.is_absolute() or ".." in rel.parts or str(rel) in files:
                    raise PolicyError(f"{source}: archive member {info.name!r} is not a plain relative file")
                files[str(rel)] = tar.extractfile(info).read()  # type: ignore[union-attr]
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise PolicyError(f"{source}: the archive's contents cannot be read ({exc}); nothing was written") from None
    try:
        manifest = json.loads(files.pop(MANIFEST))
        listed = manifest["files"]
    except (KeyError, ValueError, TypeError):
        raise PolicyError(f"{source}: the archive has no readable {MANIFEST}; nothing was written") from None
    if set(listed) != set(files):
        raise PolicyError(f"{source}: files and manifest disagree ({sorted(set(listed) ^ set(files))[:5]})")
    for rel, data in files.items():
        if hashlib.sha256(data).hexdigest() != listed[rel]["sha256"]:
            raise PolicyError(f"{source}: {rel} does not match its sha256 in the manifest; nothing was written")
    return manifest, files


def service_running(state_dir: Path) -> bool:
    """Does a `silo-node start` service answer on this state directory's socket?"""
    from silo_node.service import socket_path

    path = socket_path(state_dir)
    if not path.exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2.0)
        return s.connect_ex(str(path)) == 0


def _write_tree(root: Path, files: dict[str, bytes], manifest: dict[str, Any]) -> None:
    """Every file 0600 (keys/ 0700), fsynced, then every directory fsynced."""
    root.mkdir(mode=0o700)
    dirs = {root}
    for rel, data in sorted(files.items()):
        path = root / rel
        for parent in reversed(path.relative_to(root).parents[:-1]):
            directory = root / parent
            if directory not in dirs:
                directory.mkdir(mode=0o700)
                dirs.add(directory)
        mode = int(manifest["files"][rel].get("mode", 0o600)) & 0o700 or 0o600
        write_new_file(path, data, mode)
    for directory in sorted(dirs, key=lambda d: len(d.parts), reverse=True):
        fsync_dir(directory)


def restore(archive: Path, state_dir: Path, secret: Secret, *, force: bool = False,
            actor: str = "silo-it") -> RestoreResult:
    """Decrypt and check the whole archive in memory, then put the state back in one step.

    The files go to a new directory next to ``state_dir`` first; only when every one is on
    disk does a rename make it the state directory. With ``force`` an existing state
    directory is renamed aside (kept, never deleted: it may hold the newer ledger), which
    is refused while the silo's service is running on it.
    """
    archive, state_dir = Path(archive).resolve(), Path(state_dir).resolve()
    try:
        blob = archive.read_bytes()
    except OSError as exc:
        raise PolicyError(f"{archive}: cannot read the backup: {exc.strerror or exc}") from None
    header, plaintext = _open(blob, secret, str(archive))
    manifest, files = _members(plaintext, str(archive))
    occupied = state_dir.exists() and any(state_dir.iterdir())
    if occupied and not force:
        raise PolicyError(f"{state_dir}: not empty; restoring replaces a silo's state, so pass --force to move the "
                          f"current state aside (it is kept as {state_dir.name}.before-restore-TIMESTAMP)")
    if occupied and service_running(state_dir):
        raise PolicyError(f"{state_dir}: `silo-node start` is running on this state directory; stop it first")
    if state_dir.exists() and not state_dir.is_dir():
        raise PolicyError(f"{state_dir}: exists and is not a directory")
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    staging = state_dir.with_name(f".{state_dir.name}.restore-{stamp}-{secrets.token_hex(3)}")
    state_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        _write_tree(staging, files, manifest)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise PolicyError(f"{staging}: cannot write the restored state: {exc.strerror or exc}; nothing was "
                          f"changed in {state_dir}") from None
    replaced = _swap_in(staging, state_dir, occupied, stamp)
    result = RestoreResult(state_dir, len(files), str(header.get("created_at", "")), dict(manifest.get("ledgers", {})),
                           dict(manifest.get("audit_head", {})), replaced)
    if AUDIT_FILE in files:
        _log(state_dir, RESTORE_ACTION, archive.name, {
            "sha256": hashlib.sha256(blob).hexdigest(), "backup_created_at": result.created_at,
            "files": len(files), "audit_head_seq": result.audit_head.get("seq"),
            "ledgers": {study: h.get("seq") for study, h in result.ledgers.items()},
        }, actor)
    return result


def _swap_in(staging: Path, state_dir: Path, occupied: bool, stamp: str) -> Path | None:
    """Rename the staged state into place (the old one aside first, if any)."""
    aside = state_dir.with_name(f"{state_dir.name}.before-restore-{stamp}") if occupied else None
    try:
        if aside is not None:
            os.rename(state_dir, aside)
        elif state_dir.exists():
            state_dir.rmdir()  # empty
        os.rename(staging, state_dir)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if aside is not None and aside.exists() and not state_dir.exists():
            os.rename(aside, state_dir)
        raise PolicyError(f"{state_dir}: cannot put the restored state in place: {exc.strerror or exc}; "
                          f"the state directory was left as it was") from None
    fsync_dir(state_dir.parent)
    return aside
