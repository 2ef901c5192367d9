"""Local accounts for the web UI: salted scrypt hashes, lockout, audited sign-ins.

Why local accounts: a hospital coordinator often runs without an identity provider it may
reach (Streamlit's `st.login` needs OIDC online), and the audit trail must still say which
person approved a round. So passwords are stored only as slow, salted hashes, five wrong
tries lock an account for a while (the store counts them atomically), and every sign-in,
failed or not, lands in the coordinator's hash-chained audit log. There are no default
passwords: the demo's `lead` account gets a random one, written once to a 0600 file.

`register_cli` adds `coordinator users add|unlock|reset-password|list` to the coordinator CLI.
"""

from __future__ import annotations

import argparse
import base64
import getpass
import hashlib
import hmac
import os
import re
import secrets
import sys
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import get_args

from coordinator.store import Role, Store, UserRow, open_store
from policies.audit import AuditLog, open_party_log
from policies.errors import PolicyError

ROLES: tuple[str, ...] = get_args(Role)
MIN_PASSWORD_CHARS = 12
MAX_PASSWORD_CHARS = 1024  # scrypt hashes any length; a cap keeps a pasted novel from costing memory
MAX_FAILED_ATTEMPTS = 5
LOCK_FOR = timedelta(minutes=15)
SESSION_MINUTES = 30
DEMO_LEAD = "lead"
DEMO_PASSWORD_FILE = Path("coordinator") / "lead-password.txt"

_SCHEME = "scrypt"
_N, _R, _P = 2**14, 8, 1
_SALT_BYTES = 16
_KEY_BYTES = 32
_MAXMEM = 64 * 1024 * 1024
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
# Verified against when the user does not exist, so an unknown name costs as long as a wrong password.
_DUMMY_HASH: str | None = None


# ----------------------------------------------------------------------------- hashing


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=_MAXMEM, dklen=_KEY_BYTES)


def hash_password(password: str) -> str:
    """`scrypt$n$r$p$salt$hash` (base64): the parameters travel with the hash, so they can rise later."""
    if not isinstance(password, str) or not password:
        raise PolicyError("a password must be a non-empty text")
    salt = secrets.token_bytes(_SALT_BYTES)
    return f"{_SCHEME}${_N}${_R}${_P}${_b64(salt)}${_b64(_scrypt(password, salt, _N, _R, _P))}"


def verify_password(password: str, stored: str) -> bool:
    """True if `password` matches `stored`; a malformed or unknown hash string is simply no match."""
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        n_, r_, p_ = int(n), int(r), int(p)
        if scheme != _SCHEME or not (2 <= n_ <= 2**20 and 1 <= r_ <= 32 and 1 <= p_ <= 16):
            return False
        expected = base64.b64decode(salt, validate=True), base64.b64decode(digest, validate=True)
        got = _scrypt(password, expected[0], n_, r_, p_)
    except (ValueError, TypeError, AttributeError):
        return False
    return hmac.compare_digest(got, expected[1])


def _dummy_hash() -> str:
    global _DUMMY_HASH
    if _DUMMY_HASH is None:
        _DUMMY_HASH = hash_password(secrets.token_urlsafe(16))
    return _DUMMY_HASH


# ----------------------------------------------------------------------------- rules


def check_password_policy(password: str) -> None:
    """At least 12 characters: length is what makes a password hard to guess, not symbols."""
    if not isinstance(password, str) or len(password) < MIN_PASSWORD_CHARS:
        raise PolicyError(f"a password needs at least {MIN_PASSWORD_CHARS} characters")
    if len(password) > MAX_PASSWORD_CHARS:
        raise PolicyError(f"a password may have at most {MAX_PASSWORD_CHARS} characters")
    if not password.strip():
        raise PolicyError("a password cannot be only spaces")


def check_user_name(name: str) -> str:
    """Names appear in audit entries and CSV exports: keep them plain (letters, digits, _.@-)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise PolicyError("a user name has 1-64 characters: letters, digits and _ . @ -, starting with a letter or digit")
    return name


def check_role(role: str) -> str:
    if role not in ROLES:
        raise PolicyError(f"'{role}' is not a role; use one of: {', '.join(ROLES)}")
    return role


def session_expired(last_seen: datetime | None, now: datetime | None = None, minutes: int = SESSION_MINUTES) -> bool:
    """An idle session ends after `minutes`: a shared ward PC must not stay signed in as the lead."""
    if last_seen is None:
        return True
    now = now or datetime.now(timezone.utc)
    return now - last_seen >= timedelta(minutes=minutes)


# ----------------------------------------------------------------------------- audit


def coordinator_log(state_dir: str | Path) -> AuditLog:
    """The coordinator's own audit log, where account events go."""
    return open_party_log(Path(state_dir) / "coordinator", "coordinator", "coordinator")


def _log(audit_log: AuditLog | None, action: str, subject: str, details: dict, actor: str, role: str) -> None:
    if audit_log is not None:
        audit_log.append(action, subject, details, actor=actor, role=role)


def _require_admin(store: Store, admin: str) -> UserRow:
    """Re-read the acting user's role from the store: a session's idea of it may be stale or forged."""
    row = store.get_user(admin)
    if row is None or row.role != "admin":
        raise PolicyError(f"only an admin may manage accounts; {admin} is not one")
    return row


# ----------------------------------------------------------------------------- accounts


def add_user(store: Store, name: str, role: str, password: str, *, by: str | None = None,
             audit_log: AuditLog | None = None) -> UserRow:
    """Create an account; refuses duplicates, unknown roles and short passwords.

    `by` (an admin) is checked when given; the CLI, run by whoever owns the state dir, passes None.
    """
    check_user_name(name)
    check_role(role)
    check_password_policy(password)
    if by is not None:
        _require_admin(store, by)
    if store.get_user(name) is not None:
        raise PolicyError(f"user {name} already exists")
    row = store.add_user(name, role, hash_password(password))
    _log(audit_log, "user.added", name, {"role": role}, by or "coordinator-cli", "admin" if by else "system")
    return row


def authenticate(store: Store, name: str, password: str, audit_log: AuditLog | None = None) -> UserRow | None:
    """The user if `password` is right and the account is not locked, else None; always audited.

    The attempted name of an unknown account is not logged: people type passwords into the
    name field, and the log is exported to auditors.
    """
    user = store.get_user(name) if isinstance(name, str) and name else None
    if user is None:
        verify_password(password, _dummy_hash())
        _log(audit_log, "user.login_failed", "(unknown user)", {"reason": "unknown_user"}, "coordinator", "system")
        return None
    if user.is_locked():
        _log(audit_log, "user.login_failed", name, {"reason": "locked"}, "coordinator", "system")
        return None
    if not verify_password(password, user.password_hash):
        after = store.note_login_failure(name, max_attempts=MAX_FAILED_ATTEMPTS, lock_for=LOCK_FOR)
        locked = after is not None and after.is_locked()
        _log(audit_log, "user.login_failed", name, {"reason": "bad_password", "locked": locked},
             "coordinator", "system")
        return None
    user = store.note_login_success(name)
    _log(audit_log, "user.login", name, {"role": user.role}, name, user.role)
    return user


def unlock(store: Store, admin: str, name: str, audit_log: AuditLog | None = None) -> UserRow:
    """Clear a lockout early (an admin who has checked it was the real user)."""
    _require_admin(store, admin)
    if store.get_user(name) is None:
        raise PolicyError(f"no user {name}")
    row = store.note_login_success(name)
    _log(audit_log, "user.unlocked", name, {}, admin, "admin")
    return row


def reset_password(store: Store, admin: str, name: str, new_password: str,
                   audit_log: AuditLog | None = None) -> UserRow:
    """Set a new password (and clear any lockout, since the admin hands it over in person)."""
    _require_admin(store, admin)
    check_password_policy(new_password)
    if store.get_user(name) is None:
        raise PolicyError(f"no user {name}")
    store.set_password_hash(name, hash_password(new_password))
    row = store.note_login_success(name)
    _log(audit_log, "user.password_reset", name, {}, admin, "admin")
    return row


def ensure_demo_lead(store: Store, state_dir: str | Path) -> tuple[str, str | None]:
    """Make the demo's `lead` account once, with a random password written to a 0600 file.

    Returns (name, password) the first time and (name, None) afterwards: the password is
    shown once and kept only in that file, which the person running the demo owns.
    """
    if store.get_user(DEMO_LEAD) is not None:
        return DEMO_LEAD, None
    password = secrets.token_urlsafe(18)
    try:  # the store decides who wins if two processes race; only the winner writes the file
        store.add_user(DEMO_LEAD, "lead", hash_password(password))
    except PolicyError:
        if store.get_user(DEMO_LEAD) is not None:
            return DEMO_LEAD, None
        raise
    path = Path(state_dir) / DEMO_PASSWORD_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)  # a stale file from an earlier store must not keep its old mode
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(password + "\n")
    os.chmod(path, 0o600)  # the umask can only narrow the mode; say it explicitly anyway
    coordinator_log(state_dir).append("user.added", DEMO_LEAD, {"role": "lead", "demo": True},
                                      actor="coordinator", role="system")
    return DEMO_LEAD, password


# ----------------------------------------------------------------------------- CLI


def _read_new_password(args: argparse.Namespace, prompt: Callable[[str], str] = getpass.getpass) -> tuple[str, bool]:
    """From stdin (`--password-stdin`), generated (`--generate`) or typed twice; never from argv."""
    if args.generate:
        return secrets.token_urlsafe(18), True
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\n"), False
    first = prompt("new password: ")
    if first != prompt("again: "):
        raise PolicyError("the two passwords differ")
    return first, False


def _cli_store(args: argparse.Namespace) -> tuple[Store, Path]:
    state_dir = Path(args.state_dir).resolve()
    return open_store(args.db_url or os.environ.get("FEDCOHORT_DB_URL"), state_dir), state_dir


def _cli_add(args: argparse.Namespace) -> int:
    password, generated = _read_new_password(args)
    store, state_dir = _cli_store(args)
    with store:
        add_user(store, args.name, args.role, password, audit_log=coordinator_log(state_dir))
    print(f"user {args.name} ({args.role}) added" + (f"; password: {password}" if generated else ""))
    return 0


def _cli_unlock(args: argparse.Namespace) -> int:
    store, state_dir = _cli_store(args)
    with store:
        if store.get_user(args.name) is None:
            raise PolicyError(f"no user {args.name}")
        store.note_login_success(args.name)
        coordinator_log(state_dir).append("user.unlocked", args.name, {}, actor="coordinator-cli", role="system")
    print(f"user {args.name} unlocked")
    return 0


def _cli_reset(args: argparse.Namespace) -> int:
    password, generated = _read_new_password(args)
    check_password_policy(password)
    store, state_dir = _cli_store(args)
    with store:
        if store.get_user(args.name) is None:
            raise PolicyError(f"no user {args.name}")
        store.set_password_hash(args.name, hash_password(password))
        store.note_login_success(args.name)
        coordinator_log(state_dir).append("user.password_reset", args.name, {}, actor="coordinator-cli", role="system")
    print(f"password of {args.name} reset" + (f"; new password: {password}" if generated else ""))
    return 0


def _cli_list(args: argparse.Namespace) -> int:
    store, _ = _cli_store(args)
    with store:
        for u in store.list_users():
            print(f"{u.name:24s} {u.role:8s} {'locked' if u.is_locked() else ''}")
    return 0


def register_cli(sub: argparse._SubParsersAction) -> None:
    """Add `users add|unlock|reset-password|list` to the coordinator's subcommands.

    Run by whoever owns the state dir (a shell on the coordinator host), so no admin login is asked.
    """
    users = sub.add_parser("users", help="local accounts for the web UI")
    users_sub = users.add_subparsers(dest="users_command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--state-dir", default=".fedcohort")
        p.add_argument("--db-url", help="SQLAlchemy URL of the store (default: SQLite under the state dir)")

    def password_source(p: argparse.ArgumentParser) -> None:
        group = p.add_mutually_exclusive_group()
        group.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
        group.add_argument("--generate", action="store_true", help="generate a random password and print it once")

    a = users_sub.add_parser("add", help="add an account (password typed twice, from stdin or generated)")
    a.add_argument("name")
    a.add_argument("--role", required=True, choices=ROLES)
    common(a)
    password_source(a)
    a.set_defaults(func=_cli_add)
    u = users_sub.add_parser("unlock", help="clear an account's lockout")
    u.add_argument("name")
    common(u)
    u.set_defaults(func=_cli_unlock)
    r = users_sub.add_parser("reset-password", help="set a new password for an account")
    r.add_argument("name")
    common(r)
    password_source(r)
    r.set_defaults(func=_cli_reset)
    ls = users_sub.add_parser("list", help="list accounts and lockouts")
    common(ls)
    ls.set_defaults(func=_cli_list)


__all__ = [
    "DEMO_LEAD", "DEMO_PASSWORD_FILE", "MAX_FAILED_ATTEMPTS", "MIN_PASSWORD_CHARS", "ROLES", "SESSION_MINUTES",
    "add_user", "authenticate", "check_password_policy", "check_role", "check_user_name", "coordinator_log",
    "ensure_demo_lead", "hash_password", "register_cli", "reset_password", "session_expired", "unlock",
    "verify_password",
]
