"""The audit trail every party keeps: an append-only, hash-chained, signed JSONL log.

Why: hospitals and the coordinator must be able to show an auditor, after the fact, who
approved which round, which silos replied or refused, how much privacy budget was spent
and who exported what -- and that nobody rewrote that history afterwards.

How the pieces stop tampering:
- every entry carries the hash of the previous one, so editing, removing or reordering
  an entry breaks the chain at that exact entry;
- every entry is signed with the party's Ed25519 key, so recomputing the chain after an
  edit needs the private key;
- parties log each other's chain heads (``witness_details``), so even the key holder
  cannot rewrite history another party has already seen (``check_witnesses``).

What goes into ``details``: counts and ids only (row counts, silo and round ids, epsilon
spent, short reason codes). Never patient-level values, never free text that could hold
them, never secrets: logs are exported to auditors as CSV and Parquet.

Format: one entry per line, canonical JSON (sorted keys, ASCII). ``hash`` is sha256 of the
canonical JSON of ``seq, ts, actor, role, action, subject, details, prev_hash``; the first
entry has ``seq`` 1 and ``prev_hash`` 64 zeros. ``signature`` is base64 Ed25519 over the 64
hex characters of ``hash`` (as ASCII); ``key_id`` is the first 16 hex characters of sha256
of the signer's raw 32-byte public key.
"""

from __future__ import annotations

import base64
import csv
import errno
import fcntl
import hashlib
import io
import json
import operator
import os
import re
import zipfile
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, Literal, NamedTuple

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from policies.durable import fsync_dir, read_private, temp_name, write_atomic, write_new_file
from policies.errors import PolicyError
from policies.study import canonical_json

GENESIS_HASH = "0" * 64
ROLES = ("coordinator", "silo", "lead", "auditor", "admin", "system")
Role = Literal["coordinator", "silo", "lead", "auditor", "admin", "system"]
HASHED_FIELDS = ("seq", "ts", "actor", "role", "action", "subject", "details", "prev_hash")
COLUMNS = (*HASHED_FIELDS[:-1], "prev_hash", "hash", "signature", "key_id")
WITNESS_ACTION = "audit.witnessed"
EXPORT_ACTION = "audit.exported"
MAX_DETAILS_BYTES = 64 * 1024  # counts and ids fit easily; data dumps do not
MAX_LINE_BYTES = 1024 * 1024
MAX_BUNDLE_MEMBER_BYTES = 1024 * 1024 * 1024
KEY_ID_CHARS = 16

EXPORT_FORMAT = "fedcohort-audit-export"
DATA_FILES = ("audit.jsonl", "audit.csv", "audit.parquet")
MANIFEST = "manifest.json"

_HEX64 = r"^[0-9a-f]{64}$"
_ACTION = r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$"
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


# --------------------------------------------------------------------------- entries


class AuditEntry(BaseModel):
    """One line of a party's audit log; ``details`` holds counts and ids only (see module doc)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seq: int = Field(ge=1)
    ts: str = Field(min_length=1, max_length=64)
    actor: str = Field(min_length=1, max_length=256)
    role: Role
    action: str = Field(pattern=_ACTION, max_length=64)
    subject: str = Field(max_length=512)
    details: dict[str, Any]
    prev_hash: str = Field(pattern=_HEX64)
    hash: str = Field(pattern=_HEX64)
    signature: str = Field(min_length=1, max_length=200)
    key_id: str = Field(pattern=r"^[0-9a-f]{16,64}$")

    def to_line(self) -> bytes:
        """The exact bytes written to the log: canonical JSON plus a newline."""
        return (canonical_json(self.model_dump(mode="json")) + "\n").encode("ascii")

    def flat(self) -> dict[str, Any]:
        """Spreadsheet form: ``details`` as a canonical JSON string column."""
        return {  # COLUMNS order; every other field is a plain JSON value already
            "seq": self.seq, "ts": self.ts, "actor": self.actor, "role": self.role, "action": self.action,
            "subject": self.subject, "details": canonical_json(self.details), "prev_hash": self.prev_hash,
            "hash": self.hash, "signature": self.signature, "key_id": self.key_id,
        }


def entry_hash(fields: Mapping[str, Any]) -> str:
    """sha256 over the canonical JSON of the chained fields (extra keys such as hash are ignored)."""
    missing = [name for name in HASHED_FIELDS if name not in fields]
    if missing:
        raise PolicyError(f"cannot hash an audit entry without {', '.join(missing)}")
    payload = {name: fields[name] for name in HASHED_FIELDS}
    return hashlib.sha256(canonical_json(payload).encode("ascii")).hexdigest()


def _validated_entry(data: Mapping[str, Any]) -> AuditEntry:
    """Strict validation (no '5' for 5, no true for 1) so a parsed entry hashes like the original."""
    return AuditEntry.model_validate(dict(data), strict=True)


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "(top level)"
    return f"{where}: {err['msg']}"


# --------------------------------------------------------------------------- keys


def key_id_for(public_bytes: bytes) -> str:
    """Fingerprint of a raw Ed25519 public key: what entries name as their signer."""
    return hashlib.sha256(public_bytes).hexdigest()[:KEY_ID_CHARS]


class PartyKey:
    """A party's Ed25519 signing key; the private half never leaves its 0600 PEM file."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._private = private_key
        self._public = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @classmethod
    def generate(cls) -> "PartyKey":
        """A fresh key that lives only in memory (tests, throwaway demos)."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, path: str | Path) -> "PartyKey":
        """Load the party's key, creating it once; racing creators all end up with the same key."""
        path = Path(path)
        if not path.exists():
            _create_key_file(path, Ed25519PrivateKey.generate())
        return cls(_load_key_file(path))

    def public_bytes(self) -> bytes:
        """Raw 32-byte public key: what auditors need to verify this party's entries."""
        return self._public

    @property
    def key_id(self) -> str:
        return key_id_for(self._public)

    def public_keys(self) -> dict[str, bytes]:
        """``{key_id: public_bytes}``, the shape ``verify`` and ``export_bundle`` take."""
        return {self.key_id: self._public}

    def sign(self, data: bytes) -> bytes:
        return self._private.sign(data)


def _create_key_file(path: Path, key: Ed25519PrivateKey) -> None:
    """Written without replace (hard link): a key another process created meanwhile is kept,
    since entries signed with a lost key could not be explained."""
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise PolicyError(f"{path}: cannot create the party key: {exc.strerror or exc}") from exc
    write_atomic(path, pem, replace=False)


def _load_key_file(path: Path) -> Ed25519PrivateKey:
    """Refuse keys others can read (like ssh does) and anything that is not Ed25519."""
    pem = read_private(path, "party's private key")
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise PolicyError(f"{path}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise PolicyError(f"{path}: the party key must be Ed25519, found {type(key).__name__}")
    return key


def _public_key(key_id: str, raw: bytes | str) -> Ed25519PublicKey | str:
    """A verifier for one listed key, or the reason it cannot be trusted under that id."""
    if isinstance(raw, str):
        try:
            raw = base64.b64decode(raw, validate=True)
        except ValueError:
            return f"public key {key_id}: not valid base64"
    if len(raw) != 32:
        return f"public key {key_id}: not a raw 32-byte Ed25519 public key"
    actual = key_id_for(raw)
    if actual != key_id:
        return f"public key listed as {key_id} has key id {actual} (keys and ids mixed up?)"
    return Ed25519PublicKey.from_public_bytes(raw)


def _public_keys(public_keys: Mapping[str, bytes | str]) -> tuple[dict[str, Ed25519PublicKey], str]:
    keys: dict[str, Ed25519PublicKey] = {}
    for key_id, raw in public_keys.items():
        key = _public_key(key_id, raw)
        if isinstance(key, str):
            return {}, key
        keys[key_id] = key
    return keys, ""


# --------------------------------------------------------------------------- file helpers


def _replace_file(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Atomic write for exports: a reader never sees half a file."""
    tmp = temp_name(path)
    try:
        write_new_file(tmp, data, mode)
        os.replace(tmp, path)
    except OSError as exc:
        raise PolicyError(f"{path}: cannot write: {exc.strerror or exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def _snapshot(path: Path) -> Iterator[tuple[IO[bytes], int]]:
    """Open for reading and take the size under a shared lock: writers append whole lines under
    an exclusive lock, so the first ``size`` bytes never end in a line still being written."""
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read the audit log: {exc.strerror or exc}") from exc
    with f:
        fcntl.flock(f.fileno(), fcntl.LOCK_SH)
        try:
            size = os.fstat(f.fileno()).st_size
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        yield f, size


def _snapshot_bytes(path: Path) -> bytes:
    with _snapshot(path) as (f, size):
        return f.read(size)


# --------------------------------------------------------------------------- reading lines


class _BadLine(Exception):
    """A line that is not an audit entry; the message is phrased to follow 'line N: '."""


def _raw_lines(f: IO[bytes], size: int) -> Iterator[tuple[int, bytes, bool]]:
    """(line number, bytes without newline, complete?) for the first ``size`` bytes."""
    remaining = size
    for lineno, raw in enumerate(f, start=1):
        if remaining <= 0:
            return
        raw = raw[:remaining]
        remaining -= len(raw)
        complete = raw.endswith(b"\n")
        yield lineno, raw[:-1] if complete else raw, complete


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Duplicate keys would let two JSON readers see two different entries."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# One decoder for every line: json.loads with a hook would build a new one per call.
_LINE_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)


def _parse_line(text: bytes) -> AuditEntry:
    if len(text) > MAX_LINE_BYTES:
        raise _BadLine(f"line is {len(text)} bytes, longer than any audit entry can be")
    if not text.strip():
        raise _BadLine("empty line")
    try:
        obj = _LINE_DECODER.decode(text.decode(json.detect_encoding(text), "surrogatepass"))  # = json.loads
    except ValueError as exc:
        raise _BadLine(f"not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise _BadLine("not a JSON object")
    try:
        return _validated_entry(obj)
    except ValidationError as exc:
        raise _BadLine(f"not a valid audit entry ({_first_error(exc)})") from None


def _torn_message(source: str, lineno: int) -> str:
    return (
        f"{source}: line {lineno} is incomplete (the file does not end with a newline: a write "
        f"was cut off). Refusing to read or append past it; nothing was truncated. Inspect that "
        f"line; if it is only a torn write, an administrator can remove it and log having done so."
    )


def _strict_entries(f: IO[bytes], size: int, source: str) -> Iterator[AuditEntry]:
    """Entries of a log a party is about to use: any damaged line is an error, never skipped."""
    for lineno, text, complete in _raw_lines(f, size):
        if not complete:
            raise PolicyError(_torn_message(source, lineno))
        try:
            yield _parse_line(text)
        except _BadLine as exc:
            raise PolicyError(f"{source}: line {lineno}: {exc}") from None


def _parse_log_bytes(data: bytes, source: str) -> list[AuditEntry]:
    return list(_strict_entries(io.BytesIO(data), len(data), source))


# --------------------------------------------------------------------------- the log


class _Tail(NamedTuple):
    """What an append needs to know, valid while the file keeps this inode and size."""

    ino: int
    size: int
    seq: int
    hash: str


def _utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _check_ts(ts: str) -> str:
    try:
        parsed = datetime.fromisoformat(ts)
    except (TypeError, ValueError):
        raise PolicyError(f"audit timestamp {ts!r} is not ISO 8601") from None
    if parsed.utcoffset() is None or parsed.utcoffset().total_seconds() != 0:
        raise PolicyError(f"audit timestamp {ts!r} must be UTC (end with Z or +00:00)")
    return ts


def _check_role(role: str) -> str:
    if role not in ROLES:
        raise PolicyError(f"audit role {role!r} is not one of: {', '.join(ROLES)}")
    return role


def _check_action(action: str) -> str:
    if not isinstance(action, str) or not re.fullmatch(_ACTION, action) or len(action) > 64:
        raise PolicyError(f"audit action {action!r} must look like 'round.approved' (lowercase, dotted)")
    return action


def _normalise_details(details: Mapping[str, Any] | None) -> dict[str, Any]:
    """Round-trip through JSON so the entry returned equals the entry read back from disk."""
    if details is None:
        return {}
    if not isinstance(details, Mapping):
        raise PolicyError("audit details must be a mapping of counts and ids")
    try:
        text = json.dumps(dict(details), sort_keys=True, allow_nan=False, ensure_ascii=True)
    except (TypeError, ValueError) as exc:
        raise PolicyError(
            f"audit details must be plain JSON (str keys; numbers, strings, lists): {exc}"
        ) from None
    if len(text) > MAX_DETAILS_BYTES:
        raise PolicyError(
            f"audit details are {len(text)} bytes (limit {MAX_DETAILS_BYTES}): log counts and ids, not data"
        )
    return json.loads(text)


class AuditLog:
    """One party's log file. Appends are serialised across processes with ``flock`` on the file
    (local filesystems only: flock is not reliable over NFS)."""

    def __init__(self, path: str | Path, key: PartyKey, party: str, role: str) -> None:
        self.path = Path(path)
        self.key = key
        self.party = party
        self.role = _check_role(role)
        self._tail: _Tail | None = None

    # -- public

    def append(
        self,
        action: str,
        subject: str,
        details: Mapping[str, Any] | None = None,
        actor: str | None = None,
        role: str | None = None,
        ts: str | None = None,
    ) -> AuditEntry:
        """Record one event durably (fsync) and return it; on any write error nothing is recorded."""
        fields = {
            "ts": _check_ts(ts) if ts is not None else _utc_now(),
            "actor": actor if actor is not None else self.party,
            "role": _check_role(role) if role is not None else self.role,
            "action": _check_action(action),
            "subject": subject,
            "details": _normalise_details(details),
        }
        self._prevalidate(fields)
        created = not self.path.exists()
        fd = self._open_for_append()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            tail = self._current_tail(fd)
            entry = self._seal(fields, tail)
            line = entry.to_line()
            self._write_line(fd, line, tail.size)
            self._tail = tail._replace(size=tail.size + len(line), seq=entry.seq, hash=entry.hash)
        finally:
            os.close(fd)  # also releases the lock
        if created:
            fsync_dir(self.path.parent)
        return entry

    def witness(self, other_party: str, seq: int, head: str, actor: str | None = None) -> AuditEntry:
        """Log that this party saw ``other_party``'s chain head at ``(seq, head)``."""
        return self.append(WITNESS_ACTION, other_party, witness_details(other_party, seq, head), actor=actor)

    def head(self) -> tuple[int, str]:
        """(seq, hash) of the last entry; (0, 64 zeros) for an empty or missing log."""
        if not self.path.exists():
            return 0, GENESIS_HASH
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise PolicyError(f"{self.path}: cannot read the audit log: {exc.strerror or exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            self._tail = self._current_tail(fd)
        finally:
            os.close(fd)
        return self._tail.seq, self._tail.hash

    def entries(self) -> Iterator[AuditEntry]:
        """Every entry in order; a damaged or torn line raises PolicyError naming its line."""
        if not self.path.exists():
            return
        with _snapshot(self.path) as (f, size):
            yield from _strict_entries(f, size, str(self.path))

    def export(
        self, out_dir: str | Path, public_keys: Mapping[str, bytes] | None = None, actor: str | None = None
    ) -> Path:
        """Export a bundle (own key always included) and log the export itself, as the design asks."""
        keys = {**(public_keys or {}), **self.key.public_keys()}
        bundle = export_bundle(self.path, out_dir, keys, party=self.party)
        manifest = json.loads((Path(out_dir) / MANIFEST).read_text(encoding="utf-8"))
        details = {
            "head_seq": manifest["head_seq"],
            "entries": manifest["entries"],
            "bundle_sha256": hashlib.sha256(bundle.read_bytes()).hexdigest(),
        }
        self.append(EXPORT_ACTION, bundle.name, details, actor=actor)
        return bundle

    # -- internals

    def _open_for_append(self) -> int:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            return os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise PolicyError(f"{self.path}: cannot open the audit log: {exc.strerror or exc}") from exc

    def _current_tail(self, fd: int) -> _Tail:
        """The cached head if nobody appended since (same inode and size), else re-read the tail."""
        st = os.fstat(fd)
        cached = self._tail
        if cached is not None and (cached.ino, cached.size) == (st.st_ino, st.st_size):
            return cached
        seq, digest = _read_tail(fd, st.st_size, str(self.path))
        return _Tail(st.st_ino, st.st_size, seq, digest)

    def _prevalidate(self, fields: dict[str, Any]) -> None:
        """Reject bad input before touching the file, so a refused entry creates nothing."""
        placeholder = {"seq": 1, "prev_hash": GENESIS_HASH, "hash": GENESIS_HASH, "signature": "-"}
        try:
            _validated_entry({**fields, **placeholder, "key_id": self.key.key_id})
        except ValidationError as exc:
            raise PolicyError(f"audit entry not recorded: {_first_error(exc)}") from None

    def _seal(self, fields: dict[str, Any], tail: _Tail) -> AuditEntry:
        body = {**fields, "seq": tail.seq + 1, "prev_hash": tail.hash}
        digest = entry_hash(body)
        signature = base64.b64encode(self.key.sign(digest.encode("ascii"))).decode("ascii")
        try:
            return _validated_entry(
                {**body, "hash": digest, "signature": signature, "key_id": self.key.key_id}
            )
        except ValidationError as exc:
            raise PolicyError(f"audit entry not recorded: {_first_error(exc)}") from None

    def _write_line(self, fd: int, line: bytes, size_before: int) -> None:
        """One os.write on an O_APPEND fd, then fsync; on failure cut back to ``size_before``."""
        try:
            written = os.write(fd, line)
            if written != len(line):
                raise OSError(errno.EIO, f"short write ({written} of {len(line)} bytes)")
            os.fsync(fd)  # os.write is unbuffered: there is nothing to flush before this
        except OSError as exc:
            restored = _truncate_back(fd, size_before)
            state = "the log was left as it was" if restored else "the log could not be restored"
            raise PolicyError(
                f"{self.path}: could not append to the audit log ({exc.strerror or exc}); "
                f"{state} and nothing was recorded"
            ) from exc


def _truncate_back(fd: int, size: int) -> bool:
    """Undo a partial append; we still hold the exclusive lock, so no other line follows ours."""
    try:
        if os.fstat(fd).st_size > size:
            os.ftruncate(fd, size)
            os.fsync(fd)
        return True
    except OSError:
        return False


def _count_lines(fd: int, size: int) -> int:
    """Newlines in the first ``size`` bytes (error messages only: reads the whole file)."""
    count, offset = 0, 0
    while offset < size:
        chunk = os.pread(fd, min(1 << 20, size - offset), offset)
        if not chunk:
            break
        count += chunk.count(b"\n")
        offset += len(chunk)
    return count


def _last_line(fd: int, size: int) -> bytes:
    """The last complete line (without its newline), read backwards from the end."""
    end = size - 1  # index of the final newline
    parts: list[bytes] = []
    pos, total = end, 0
    while pos > 0 and total <= MAX_LINE_BYTES:
        start = max(0, pos - 65536)
        chunk = os.pread(fd, pos - start, start)
        cut = chunk.rfind(b"\n")
        parts.insert(0, chunk[cut + 1 :])
        total += len(chunk)
        if cut >= 0:
            break
        pos = start
    return b"".join(parts)


def _read_tail(fd: int, size: int, source: str) -> tuple[int, str]:
    """(seq, hash) of the last entry, refusing a torn or unreadable last line."""
    if size == 0:
        return 0, GENESIS_HASH
    if os.pread(fd, 1, size - 1) != b"\n":
        raise PolicyError(_torn_message(source, _count_lines(fd, size) + 1))
    try:
        entry = _parse_line(_last_line(fd, size))
    except _BadLine as exc:
        raise PolicyError(f"{source}: line {_count_lines(fd, size)}: {exc}") from None
    return entry.seq, entry.hash


# --------------------------------------------------------------------------- witnessing


def witness_details(other_party: str, seq: int, head: str) -> dict[str, Any]:
    """Details for ``audit.witnessed``: 'I saw other_party's head at (seq, head)'."""
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        raise PolicyError(f"witnessed seq must be a non-negative integer, got {seq!r}")
    if not isinstance(head, str) or not re.fullmatch(_HEX64, head):
        raise PolicyError(f"witnessed head must be a 64-character sha256 hex digest, got {head!r}")
    return {"party": other_party, "seq": seq, "head": head}


def check_witnesses(
    witness_entries: Iterable[AuditEntry],
    other_party: str,
    other_entries: Iterable[AuditEntry],
    witness_party: str = "witness",
) -> list[str]:
    """Heads one party recorded for ``other_party`` that the other's log no longer contains.

    A key holder can re-sign a rewritten chain of its own; it cannot change what another
    party already logged about it. Any mismatch here means history was rewritten or cut.
    Each finding names the witnessing entry, the witnessed seq and what differs.
    """
    hashes = {e.seq: e.hash for e in other_entries}
    last = max(hashes, default=0)
    problems: list[str] = []
    for w in witnessed_heads(witness_entries, other_party):
        seq, head = w.details.get("seq"), w.details.get("head")
        where = f"{witness_party} entry {w.seq} witnessed {other_party} at seq {seq}"
        if not isinstance(seq, int) or isinstance(seq, bool) or not isinstance(head, str):
            problems.append(f"{witness_party} entry {w.seq}: malformed witness details {canonical_json(w.details)[:200]}")
        elif seq == 0:
            continue
        elif seq not in hashes:
            problems.append(
                f"{where}, but {other_party}'s log ends at seq {last} (truncated or rolled back?)"
            )
        elif hashes[seq] != head:
            problems.append(
                f"{where} with hash {head[:16]}..., but {other_party}'s entry {seq} has hash "
                f"{hashes[seq][:16]}... (rewritten?)"
            )
    return problems


def witnessed_heads(entries: Iterable[AuditEntry], other_party: str) -> list[AuditEntry]:
    """The ``audit.witnessed`` entries in which this log recorded ``other_party``'s head."""
    return [e for e in entries if e.action == WITNESS_ACTION and e.details.get("party") == other_party]


# --------------------------------------------------------------------------- verification


class VerifyResult(BaseModel):
    """Outcome of a check; on failure ``problem`` names the first entry that broke the chain,
    ``first_bad_seq`` is its position (the seq it should have had) and ``entries``/``head``
    describe the intact prefix before it."""

    model_config = ConfigDict(frozen=True)

    ok: bool
    entries: int
    head: str
    head_seq: int = 0
    first_bad_seq: int | None = None
    problem: str = ""


def _failed(problem: str) -> VerifyResult:
    return VerifyResult(ok=False, entries=0, head=GENESIS_HASH, problem=problem)


class _Chain:
    """Walks entries in order; each check phrases its finding for an auditor.

    The Ed25519 check itself is not done here but handed to ``_Signatures`` (it is ~85% of
    the cost of verifying); everything else about an entry, including whether its key is
    known, is checked in order as before."""

    def __init__(self, keys: dict[str, Ed25519PublicKey]) -> None:
        self.keys = keys
        self.count = 0
        self.head = GENESIS_HASH
        self.head_seq = 0

    def check(self, n: int, e: AuditEntry) -> str:
        problem = self._seq(n, e) or self._link(n, e) or self._content(n, e) or self._known_key(n, e)
        if not problem:
            self.count, self.head, self.head_seq = n, e.hash, e.seq
        return problem

    def result(self, problem: str = "", n: int | None = None) -> VerifyResult:
        return VerifyResult(
            ok=not problem,
            entries=self.count,
            head=self.head,
            head_seq=self.head_seq,
            first_bad_seq=n if problem else None,
            problem=problem,
        )

    def _seq(self, n: int, e: AuditEntry) -> str:
        if e.seq == self.head_seq + 1:
            return ""
        if n == 1:
            return f"entry 1: seq {e.seq} but a log starts at seq 1 (beginning removed?)"
        kind = "gap" if e.seq > self.head_seq else "out of order or repeated"
        return f"entry {n}: seq {e.seq} follows seq {self.head_seq} ({kind})"

    def _link(self, n: int, e: AuditEntry) -> str:
        if e.prev_hash == self.head:
            return ""
        if n == 1:
            return "entry 1: prev_hash is not the genesis hash (beginning removed?)"
        return f"entry {n}: prev_hash does not match entry {n - 1}'s hash (entry removed or reordered?)"

    def _content(self, n: int, e: AuditEntry) -> str:
        if entry_hash(e.__dict__) == e.hash:  # the model's field values (entry_hash picks HASHED_FIELDS)
            return ""
        return f"entry {n}: hash does not match its content (edited?)"

    def _known_key(self, n: int, e: AuditEntry) -> str:
        return "" if e.key_id in self.keys else f"entry {n}: unknown signing key"


def _bad_signature(key: Ed25519PublicKey, signature: str, digest: str) -> bool:
    try:
        key.verify(base64.b64decode(signature, validate=True), digest.encode("ascii"))
    except (InvalidSignature, ValueError):
        return True
    return False


_SigJob = tuple[int, str, Ed25519PublicKey, str, str]  # entry position, key id, key, signature, hash


def _first_bad_signature(jobs: list[_SigJob]) -> tuple[int, str] | None:
    for n, key_id, key, signature, digest in jobs:
        if _bad_signature(key, signature, digest):
            return n, f"entry {n}: signature invalid for key {key_id}"
    return None


def _verify_threads() -> int:
    """Threads for signatures: the CPUs this process may use (cryptography releases the GIL in
    verify, so they run truly in parallel with the main thread's parsing and hashing)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 8))


class _Signatures:
    """Every signature is still checked; batches go to a thread pool while the main thread
    reads on, and ``first_failure`` reports the earliest bad one (the order the log has)."""

    BATCH = 2048

    def __init__(self, threads: int | None = None) -> None:
        threads = _verify_threads() if threads is None else threads
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="audit-verify") if threads > 1 else None
        self._batch: list[_SigJob] = []
        self._done: list[Future[tuple[int, str] | None] | tuple[int, str] | None] = []

    def add(self, n: int, e: AuditEntry, key: Ed25519PublicKey) -> None:
        self._batch.append((n, e.key_id, key, e.signature, e.hash))
        if len(self._batch) >= self.BATCH:
            self._flush()

    def _flush(self) -> None:
        if self._batch:
            batch, self._batch = self._batch, []
            self._done.append(self._pool.submit(_first_bad_signature, batch) if self._pool else _first_bad_signature(batch))

    def first_failure(self) -> tuple[int, str] | None:
        """Wait for all batches; (entry position, finding) of the earliest bad signature."""
        self._flush()
        try:
            for done in self._done:
                found = done.result() if isinstance(done, Future) else done
                if found is not None:
                    return found
            return None
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)


def _entries_with_problems(f: IO[bytes], size: int) -> Iterator[tuple[int, AuditEntry | None, str]]:
    """Like the strict reader, but a bad line becomes a finding instead of an exception."""
    for lineno, text, complete in _raw_lines(f, size):
        if not complete:
            yield lineno, None, f"entry {lineno}: incomplete last line (write cut off?)"
            return
        try:
            yield lineno, _parse_line(text), ""
        except _BadLine as exc:
            yield lineno, None, f"entry {lineno}: {exc}"
            return


class _Walk(NamedTuple):
    """A verification and the entries it read (the whole log when ``result.ok``)."""

    result: VerifyResult
    entries: list[AuditEntry]


class _PendingWalk:
    """The in-order checks are done; signatures may still be running in threads, so a caller
    can do other work (compare the CSV and Parquet copies) before ``finish``."""

    def __init__(self, chain: _Chain, entries: list[AuditEntry], signatures: _Signatures, problem: str, bad_n: int) -> None:
        self.chain, self.entries, self.signatures = chain, entries, signatures
        self.problem, self.bad_n = problem, bad_n

    def finish(self) -> _Walk:
        """A bad signature earlier than the in-order finding wins, so the report names the
        first bad entry exactly as a one-entry-at-a-time check would."""
        bad_signature = self.signatures.first_failure()
        if bad_signature is None:
            return _Walk(self.chain.result(self.problem, self.bad_n or None), self.entries)
        n, problem = bad_signature
        prefix, chain = self.entries[: n - 1], self.chain
        chain.count, chain.head, chain.head_seq = (n - 1, prefix[-1].hash, prefix[-1].seq) if prefix else (0, GENESIS_HASH, 0)
        return _Walk(chain.result(problem, n), prefix)


def _start_walk(items: Iterable[tuple[int, AuditEntry | None, str]], keys: dict[str, Ed25519PublicKey]) -> _PendingWalk:
    """Check entries in order up to the first finding, handing each signature to the threads."""
    chain, signatures = _Chain(keys), _Signatures()
    entries: list[AuditEntry] = []
    problem, bad_n = "", 0
    try:
        for n, entry, problem in items:
            problem = problem or chain.check(n, entry)  # type: ignore[arg-type]
            if problem:
                bad_n = n
                break
            entries.append(entry)  # type: ignore[arg-type]
            signatures.add(n, entry, keys[entry.key_id])  # type: ignore[union-attr]
    except BaseException:
        signatures.first_failure()  # do not leave threads behind
        raise
    return _PendingWalk(chain, entries, signatures, problem, bad_n)


def _walk(items: Iterable[tuple[int, AuditEntry | None, str]], keys: dict[str, Ed25519PublicKey]) -> _Walk:
    return _start_walk(items, keys).finish()


def verify(
    source: Iterable[AuditEntry] | str | os.PathLike[str], public_keys: Mapping[str, bytes | str]
) -> VerifyResult:
    """Check a whole log from seq 1: order, links, content hashes and signatures.

    ``public_keys`` maps key_id to the raw public key (bytes, or base64 text); keys should come
    from the parties themselves (out of band), not from the log being checked. "entry N" in
    findings is the N-th entry (line N of the file), which is seq N in an intact log.
    """
    keys, problem = _public_keys(public_keys)
    if problem:
        return _failed(problem)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise PolicyError(f"{path}: no such audit log")
        with _snapshot(path) as (f, size):
            return _walk(_entries_with_problems(f, size), keys).result
    return _walk(((n, e, "") for n, e in enumerate(source, start=1)), keys).result


def _start_verify_bytes(data: bytes, public_keys: Mapping[str, bytes | str]) -> _PendingWalk | VerifyResult:
    keys, problem = _public_keys(public_keys)
    if problem:
        return _failed(problem)
    return _start_walk(_entries_with_problems(io.BytesIO(data), len(data)), keys)


# --------------------------------------------------------------------------- export


class ManifestKey(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    key_id: str
    public_key: str  # base64 of the raw 32 bytes


class ExportManifest(BaseModel):
    """What an auditor checks a bundle against. Not signed itself: its trust comes from the
    signed JSONL it describes and from keys the auditor obtains from the parties."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["fedcohort-audit-export"]
    format_version: Literal[1]
    party: str
    head_seq: int
    head_hash: str
    entries: int
    actions: dict[str, int]
    public_keys: list[ManifestKey]
    files: dict[str, str]
    exported_at: str
    chain_ok: bool
    chain_problem: str

    def key_map(self) -> dict[str, str]:
        return {k.key_id: k.public_key for k in self.public_keys}


def _csv_cell(value: Any) -> str:
    """Neutralise spreadsheet formulas (=, +, -, @ ...) in names a user typed; JSONL stays exact."""
    text = value if type(value) is str else str(value)
    return "'" + text if text[:1] in _FORMULA_START else text


def _csv_rows(flats: list[dict[str, Any]]) -> list[list[str]]:
    cell = _csv_cell
    return [[cell(value) for value in row.values()] for row in flats]  # flat() keeps COLUMNS order


def _csv_bytes(flats: list[dict[str, Any]]) -> bytes:
    """The CSV copy of entries given in their ``flat()`` form (computed once per export or check)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\r\n")
    writer.writerow(COLUMNS)
    writer.writerows(_csv_rows(flats))
    return buf.getvalue().encode("utf-8")


def _entry_columns(entries: list[AuditEntry]) -> dict[str, Any]:
    """The entries as Arrow arrays in COLUMNS order (``details`` as canonical JSON, as in
    ``flat()``): the Parquet copy is written from these and both copies are checked against
    them, column by column instead of row by row."""
    import pyarrow as pa  # lazy: only exports and bundle checks need it

    rows = map(operator.attrgetter(*COLUMNS), entries)  # C-level transpose: 100k entries in ~0.1 s
    columns = dict(zip(COLUMNS, zip(*rows))) if entries else {name: () for name in COLUMNS}
    columns["details"] = tuple(canonical_json(details) for details in columns["details"])
    return {name: pa.array(columns[name], pa.int64() if name == "seq" else pa.string()) for name in COLUMNS}


def _parquet_bytes(columns: dict[str, Any]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.table(columns), buf)
    return buf.getvalue()


def _parquet_rows(data: bytes) -> list[dict[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pq.read_table(pa.BufferReader(data)).to_pylist()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _manifest_keys(public_keys: Mapping[str, bytes | str]) -> list[ManifestKey]:
    """Validated now, so a bundle never ships a key under someone else's id."""
    out = []
    for key_id, raw in sorted(public_keys.items()):
        key = _public_key(key_id, raw)
        if isinstance(key, str):
            raise PolicyError(f"cannot export: {key}")
        raw_bytes = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        out.append(ManifestKey(key_id=key_id, public_key=base64.b64encode(raw_bytes).decode("ascii")))
    return out


def _build_manifest(
    party: str,
    entries: list[AuditEntry],
    keys: list[ManifestKey],
    files: dict[str, bytes],
    chain: VerifyResult,
) -> ExportManifest:
    last = entries[-1] if entries else None
    return ExportManifest(
        format=EXPORT_FORMAT,
        format_version=1,
        party=party,
        head_seq=last.seq if last else 0,
        head_hash=last.hash if last else GENESIS_HASH,
        entries=len(entries),
        actions=dict(sorted(Counter(e.action for e in entries).items())),
        public_keys=keys,
        files={name: _sha256(files[name]) for name in DATA_FILES},
        exported_at=_utc_now(),
        chain_ok=chain.ok,
        chain_problem=chain.problem,
    )


def _safe_name(party: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", party).strip("._") or "party"


def _zip_bytes(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def export_bundle(
    log_path: str | Path,
    out_dir: str | Path,
    public_keys: Mapping[str, bytes | str],
    party: str | None = None,
) -> Path:
    """Write audit.jsonl (exact copy), audit.csv, audit.parquet, manifest.json and a zip of the four.

    A log whose chain is broken is still exported (it is evidence); the manifest records the
    finding. A torn or unparseable line is refused, since it cannot be flattened faithfully.
    ``party`` defaults to the log file's stem. Returns the zip's path.
    """
    log_path, out_dir = Path(log_path), Path(out_dir)
    data = _snapshot_bytes(log_path)
    entries = _parse_log_bytes(data, str(log_path))
    keys = _manifest_keys(public_keys)
    party = party or log_path.stem
    files = {
        "audit.jsonl": data,
        "audit.csv": _csv_bytes([e.flat() for e in entries]),
        "audit.parquet": _parquet_bytes(_entry_columns(entries)),
    }
    manifest = _build_manifest(party, entries, keys, files, verify(entries, public_keys))
    files[MANIFEST] = (json.dumps(manifest.model_dump(mode="json"), indent=2, sort_keys=True) + "\n").encode()
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, blob in files.items():
        _replace_file(out_dir / name, blob)
    bundle = out_dir / f"audit-export-{_safe_name(party)}-{manifest.head_seq}.zip"
    _replace_file(bundle, _zip_bytes(files))
    return bundle


def _read_zip(path: Path) -> tuple[dict[str, bytes], list[str]]:
    """Members we know, read into memory (never extracted), with size and duplicate checks."""
    files: dict[str, bytes] = {}
    problems: list[str] = []
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if info.filename not in (*DATA_FILES, MANIFEST):
                    continue
                if info.filename in files:
                    problems.append(f"{info.filename}: appears twice in the bundle")
                    continue
                if info.file_size > MAX_BUNDLE_MEMBER_BYTES:
                    raise PolicyError(f"{path}: {info.filename} is too large to be an audit export")
                files[info.filename] = zf.read(info)
    except (zipfile.BadZipFile, OSError) as exc:
        raise PolicyError(f"{path}: cannot read the bundle: {exc}") from exc
    return files, problems


def _read_dir(path: Path) -> dict[str, bytes]:
    files = {}
    for name in (*DATA_FILES, MANIFEST):
        member = path / name
        if member.is_file():
            files[name] = member.read_bytes()
    return files


def _read_bundle(path: Path) -> tuple[dict[str, bytes], list[str]]:
    if path.is_dir():
        return _read_dir(path), []
    if path.is_file() and zipfile.is_zipfile(path):
        return _read_zip(path)
    raise PolicyError(f"{path}: not an audit export (expected a directory or a .zip bundle)")


def _file_problems(files: dict[str, bytes], manifest: ExportManifest) -> list[str]:
    problems = []
    for name in DATA_FILES:
        if name not in files:
            problems.append(f"{name}: missing from the bundle")
        elif name not in manifest.files:
            problems.append(f"{name}: not listed in the manifest")
        elif _sha256(files[name]) != manifest.files[name]:
            problems.append(f"{name}: sha256 does not match the manifest (file changed after export?)")
    return problems


def _head_problems(entries: list[AuditEntry], line_count: int, manifest: ExportManifest) -> list[str]:
    problems = []
    if line_count != manifest.entries:
        problems.append(f"manifest says {manifest.entries} entries, audit.jsonl has {line_count}")
    last_seq = entries[-1].seq if entries else 0
    last_hash = entries[-1].hash if entries else GENESIS_HASH
    if (last_seq, last_hash) != (manifest.head_seq, manifest.head_hash):
        problems.append(
            f"manifest head is seq {manifest.head_seq} hash {manifest.head_hash[:16]}..., "
            f"audit.jsonl ends at seq {last_seq} hash {last_hash[:16]}..."
        )
    return problems


def _first_diff(name: str, got: list[Any], want: list[Any]) -> list[str]:
    if len(got) != len(want):
        return [f"{name}: {len(got)} rows, audit.jsonl has {len(want)} entries"]
    for i, (g, w) in enumerate(zip(got, want), start=1):
        if g != w:
            return [f"{name}: row {i} differs from audit.jsonl"]
    return []


# _csv_cell's test as an RE2 pattern, for whole Arrow columns at once
_FORMULA_PATTERN = "^[" + "".join(f"\\x{ord(c):02x}" for c in _FORMULA_START) + "]"


def _csv_cells(column: Any) -> Any:
    """``_csv_cell`` over a whole Arrow column (computed in C++, without the GIL)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    text = column if column.type == pa.string() else pc.cast(column, pa.string())
    formula = pc.match_substring_regex(text, _FORMULA_PATTERN)
    return pc.if_else(formula, pc.binary_join_element_wise("'", text, ""), text)


def _same_columns(table: Any, want: dict[str, Any]) -> bool:
    """Same column names in COLUMNS order, and each column equal (type and every value)."""
    import pyarrow as pa

    if tuple(table.column_names) != COLUMNS:
        return False
    return all(table.column(name).equals(pa.chunked_array([want[name]])) for name in COLUMNS)


def _csv_copy_matches(data: bytes, want: dict[str, Any]) -> bool:
    """Fast path: pyarrow parses the CSV as text cells (no type or null guessing, no skipped
    lines) and every column must equal the cells this tool writes. False means "look closer"
    (the row-by-row check decides), never "fine"."""
    import pyarrow as pa
    import pyarrow.csv as pa_csv

    if data.startswith(b"\xef\xbb\xbf"):  # a BOM is part of the first header cell for csv.reader
        return False
    options = pa_csv.ConvertOptions(
        column_types={name: pa.string() for name in COLUMNS}, null_values=[],
        strings_can_be_null=False, quoted_strings_can_be_null=False, check_utf8=True,
    )
    try:
        table = pa_csv.read_csv(
            pa.BufferReader(data),
            parse_options=pa_csv.ParseOptions(newlines_in_values=True, ignore_empty_lines=False),
            convert_options=options,
        )
    except (pa.ArrowException, ValueError):  # ragged rows, bad UTF-8, empty file: decided row by row
        return False
    return _same_columns(table, {name: _csv_cells(want[name]) for name in COLUMNS})


def _parquet_copy_matches(data: bytes, want: dict[str, Any]) -> bool:
    """Fast path for the Parquet copy: same schema and values as the JSONL's columns."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(pa.BufferReader(data))
    except Exception:  # pyarrow raises several types for damaged files: decided row by row
        return False
    return _same_columns(table, want)


def _csv_copy_problems(data: bytes, flats: list[dict[str, Any]]) -> list[str]:
    """Row by row, as csv.reader sees the file: names the first row that differs."""
    try:
        rows = list(csv.reader(io.StringIO(data.decode("utf-8"))))
    except (UnicodeDecodeError, csv.Error):
        return ["audit.csv: not readable as UTF-8 CSV"]
    header, body = (rows[0], rows[1:]) if rows else ([], [])
    if tuple(header) != COLUMNS:
        return ["audit.csv: unexpected columns"]
    return _first_diff("audit.csv", body, _csv_rows(flats))


def _parquet_copy_problems(data: bytes, flats: list[dict[str, Any]]) -> list[str]:
    """Row by row, as Python values: names the first row that differs."""
    try:
        rows = _parquet_rows(data)
    except Exception:  # pyarrow raises several types for damaged files
        return ["audit.parquet: not readable as Parquet"]
    return _first_diff("audit.parquet", rows, flats)


def _copy_problems(files: dict[str, bytes], entries: list[AuditEntry]) -> list[str]:
    """The spreadsheet copies are not signed: they are trusted only if they match the JSONL.

    Each copy is first compared column by column in Arrow (C++ that releases the GIL, so the
    signature threads keep running); only a copy that differs there, or that Arrow cannot
    read, is compared row by row in Python, which names the first differing row."""
    problems: list[str] = []
    want = _entry_columns(entries)
    checks = (
        ("audit.csv", _csv_copy_matches, _csv_copy_problems),
        ("audit.parquet", _parquet_copy_matches, _parquet_copy_problems),
    )
    flats: list[dict[str, Any]] | None = None
    for name, matches, row_problems in checks:
        if name in files and not matches(files[name], want):
            flats = flats if flats is not None else [e.flat() for e in entries]
            problems += row_problems(files[name], flats)
    return problems


def _lenient_entries(data: bytes) -> tuple[list[AuditEntry], int] | None:
    """All entries and the line count, or None if some line cannot be parsed."""
    try:
        entries = _parse_log_bytes(data, "audit.jsonl")
    except PolicyError:
        return None
    return entries, len(entries)


def _load_manifest(files: dict[str, bytes]) -> ExportManifest | str:
    if MANIFEST not in files:
        return f"{MANIFEST}: missing from the bundle"
    try:
        return ExportManifest.model_validate_json(files[MANIFEST])
    except ValidationError as exc:
        return f"{MANIFEST}: not a valid audit export manifest ({_first_error(exc)})"


class VerifiedExport(NamedTuple):
    """One export after ``verify_export``: the finding, whose it is and what it holds
    (``entries`` is None when audit.jsonl is missing or has a line that does not parse)."""

    source: str
    result: VerifyResult
    party: str
    entries: list[AuditEntry] | None


def verify_export(
    zip_or_dir: str | Path, trusted_keys: Mapping[str, bytes | str] | None = None
) -> VerifiedExport:
    """``verify_bundle``, also handing back the party and entries read (for cross-checks)."""
    files, problems = _read_bundle(Path(zip_or_dir))
    manifest = _load_manifest(files)
    if isinstance(manifest, str):
        return VerifiedExport(str(zip_or_dir), _failed(manifest), "", None)
    problems += _file_problems(files, manifest)
    if "audit.jsonl" not in files:
        return VerifiedExport(str(zip_or_dir), _failed("; ".join(problems)), manifest.party, None)
    keys = trusted_keys if trusted_keys is not None else manifest.key_map()
    pending = _start_verify_bytes(files["audit.jsonl"], keys)
    chain_at = len(problems)  # the chain's finding goes before those about head and copies
    # while signatures are checked in threads, compare the head and copies with what was read
    whole = isinstance(pending, _PendingWalk) and not pending.problem
    parsed = (pending.entries, len(pending.entries)) if whole else _lenient_entries(files["audit.jsonl"])  # type: ignore[union-attr]
    if parsed is not None:
        entries, line_count = parsed
        problems += _head_problems(entries, line_count, manifest)
        problems += _copy_problems(files, entries)
    chain = pending if isinstance(pending, VerifyResult) else pending.finish().result
    if not chain.ok:
        problems.insert(chain_at, chain.problem)
    result = chain.model_copy(update={"ok": not problems, "problem": "; ".join(problems)})
    return VerifiedExport(str(zip_or_dir), result, manifest.party, parsed[0] if parsed else None)


def verify_bundle(
    zip_or_dir: str | Path, trusted_keys: Mapping[str, bytes | str] | None = None
) -> VerifyResult:
    """Check an export: file hashes against the manifest, the chain of audit.jsonl, the manifest's
    head and count, and that the CSV/Parquet copies say what the JSONL says. All findings are
    joined in ``problem``. Pass ``trusted_keys`` (obtained from the parties) to verify signatures
    with those instead of the keys the manifest itself lists."""
    return verify_export(zip_or_dir, trusted_keys).result


AUDIT_FILE = "audit.jsonl"
AUDIT_KEY_FILE = Path("keys") / "audit_ed25519.pem"


def open_party_log(party_dir: str | Path, party: str, role: str) -> AuditLog:
    """The one place a party's log and signing key live inside its state directory."""
    party_dir = Path(party_dir)
    return AuditLog(party_dir / AUDIT_FILE, PartyKey.load_or_create(party_dir / AUDIT_KEY_FILE), party, role)


def describe(result: VerifyResult, source: str) -> str:
    """One paragraph an auditor can act on, used by every CLI that verifies."""
    if result.ok:
        return f"{source}: OK, {result.entries} entries, chain intact, head seq {result.head_seq} {result.head}"
    return f"{source}: BROKEN: {result.problem} (intact prefix: {result.entries} entries)"
