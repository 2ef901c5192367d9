"""Local accounts: slow salted hashes, lockout, unlock and reset by an admin, no default password.

Every sign-in is audited, so these tests also read the coordinator's log back and check that
no password ever reaches it.
"""

from __future__ import annotations

import stat
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from coordinator import users
from coordinator.store import Store, open_store
from policies.audit import verify
from policies.errors import PolicyError

GOOD = "correct horse battery staple"


@pytest.fixture()
def store(tmp_path: Path) -> Store:
    st = open_store(None, tmp_path)
    yield st
    st.close()


def entries(state: Path) -> list:
    return list(users.coordinator_log(state).entries())


def test_hash_is_salted_scrypt_and_verifies() -> None:
    a, b = users.hash_password(GOOD), users.hash_password(GOOD)
    assert a != b, "a random salt makes equal passwords hash differently"
    scheme, n, r, p, salt, digest = a.split("$")
    assert (scheme, n, r, p) == ("scrypt", str(2**14), "8", "1")
    assert len(salt) == 24 and len(digest) == 44  # base64 of 16 and 32 bytes
    assert users.verify_password(GOOD, a) and users.verify_password(GOOD, b)
    assert not users.verify_password(GOOD + "x", a)
    assert not users.verify_password("", a)


@pytest.mark.parametrize("stored", ["", "plain", "scrypt$1$8$1$AA==$AA==", "md5$16384$8$1$AA==$AA==",
                                    "scrypt$16384$8$1$not base64$AA==", "scrypt$99999999$8$1$AA==$AA=="])
def test_malformed_hashes_never_match(stored: str) -> None:
    assert users.verify_password(GOOD, stored) is False


def test_password_policy_and_duplicates(store: Store) -> None:
    with pytest.raises(PolicyError, match="at least 12"):
        users.add_user(store, "ann", "lead", "short-pw")
    with pytest.raises(PolicyError, match="not a role"):
        users.add_user(store, "ann", "superuser", GOOD)
    with pytest.raises(PolicyError, match="user name"):
        users.add_user(store, "=cmd()", "lead", GOOD)
    row = users.add_user(store, "ann", "lead", GOOD)
    assert row.role == "lead" and row.password_hash.startswith("scrypt$") and GOOD not in row.password_hash
    with pytest.raises(PolicyError, match="already exists"):
        users.add_user(store, "ann", "auditor", GOOD + "!")


def test_login_success_and_failure_are_audited_without_passwords(store: Store, tmp_path: Path) -> None:
    users.add_user(store, "ann", "lead", GOOD)
    log = users.coordinator_log(tmp_path)
    assert users.authenticate(store, "ann", GOOD, audit_log=log).name == "ann"
    assert users.authenticate(store, "ann", "wrong password!!", audit_log=log) is None
    assert users.authenticate(store, "nobody", GOOD, audit_log=log) is None
    got = entries(tmp_path)
    assert [e.action for e in got] == ["user.login", "user.login_failed", "user.login_failed"]
    assert got[0].actor == "ann" and got[0].role == "lead"
    assert got[1].subject == "ann" and got[1].details == {"reason": "bad_password", "locked": False}
    assert got[2].subject == "(unknown user)", "a mistyped name may be a password: not logged"
    text = (tmp_path / "coordinator" / "audit.jsonl").read_text()
    assert GOOD not in text and "wrong password" not in text and "nobody" not in text
    assert verify(tmp_path / "coordinator" / "audit.jsonl", log.key.public_keys()).ok


def test_five_failures_lock_even_the_right_password(store: Store, tmp_path: Path) -> None:
    users.add_user(store, "ann", "lead", GOOD)
    log = users.coordinator_log(tmp_path)
    for _ in range(users.MAX_FAILED_ATTEMPTS - 1):
        assert users.authenticate(store, "ann", "not the password", audit_log=log) is None
    assert not store.get_user("ann").is_locked()
    assert users.authenticate(store, "ann", "not the password", audit_log=log) is None
    assert store.get_user("ann").is_locked()
    assert users.authenticate(store, "ann", GOOD, audit_log=log) is None, "locked: the right password is refused"
    reasons = [e.details.get("reason") for e in entries(tmp_path)]
    assert reasons[-1] == "locked" and entries(tmp_path)[-2].details["locked"] is True


def test_admin_unlocks_and_resets_others_cannot(store: Store, tmp_path: Path) -> None:
    users.add_user(store, "root", "admin", GOOD)
    users.add_user(store, "ann", "lead", GOOD)
    users.add_user(store, "aud", "auditor", GOOD)
    for _ in range(users.MAX_FAILED_ATTEMPTS):
        users.authenticate(store, "ann", "not the password")
    assert store.get_user("ann").is_locked()
    with pytest.raises(PolicyError, match="only an admin"):
        users.unlock(store, "aud", "ann")
    with pytest.raises(PolicyError, match="only an admin"):
        users.reset_password(store, "ann", "ann", GOOD + "2")
    log = users.coordinator_log(tmp_path)
    users.unlock(store, "root", "ann", audit_log=log)
    assert not store.get_user("ann").is_locked()
    assert users.authenticate(store, "ann", GOOD) is not None
    with pytest.raises(PolicyError, match="at least 12"):
        users.reset_password(store, "root", "ann", "short")
    users.reset_password(store, "root", "ann", "a brand new passphrase", audit_log=log)
    assert users.authenticate(store, "ann", GOOD) is None
    assert users.authenticate(store, "ann", "a brand new passphrase") is not None
    assert [e.action for e in entries(tmp_path)] == ["user.unlocked", "user.password_reset"]
    assert "brand new" not in (tmp_path / "coordinator" / "audit.jsonl").read_text()


def test_no_default_password_and_demo_lead_file_is_private(store: Store, tmp_path: Path) -> None:
    assert store.list_users() == [], "a fresh store has no accounts, so no default password"
    name, password = users.ensure_demo_lead(store, tmp_path)
    assert name == "lead" and password and len(password) >= users.MIN_PASSWORD_CHARS
    path = tmp_path / users.DEMO_PASSWORD_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().strip() == password
    assert users.authenticate(store, "lead", password) is not None
    for guess in ("lead", "password", "admin", "changeme", "fedcohort"):
        assert users.authenticate(store, "lead", guess) is None
    store.note_login_success("lead")
    assert users.ensure_demo_lead(store, tmp_path) == ("lead", None), "made once, shown once"
    assert path.read_text().strip() == password


def test_demo_lead_passwords_are_random(tmp_path: Path) -> None:
    got = set()
    for i in range(2):
        with open_store(None, tmp_path / str(i)) as st:
            got.add(users.ensure_demo_lead(st, tmp_path / str(i))[1])
    assert len(got) == 2


def test_session_expiry() -> None:
    now = datetime(2026, 1, 1, 12, tzinfo=timezone.utc)
    assert users.session_expired(None, now)
    assert not users.session_expired(now - timedelta(minutes=29), now)
    assert users.session_expired(now - timedelta(minutes=30), now)
    assert not users.session_expired(now - timedelta(minutes=50), now, minutes=60)


def test_cli_adds_user_from_stdin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import argparse
    import io

    parser = argparse.ArgumentParser()
    users.register_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["users", "add", "ann", "--role", "auditor", "--state-dir", str(tmp_path),
                              "--password-stdin"])
    monkeypatch.setattr("sys.stdin", io.StringIO(GOOD + "\n"))
    assert args.func(args) == 0
    assert GOOD not in capsys.readouterr().out
    with open_store(None, tmp_path) as st:
        assert users.authenticate(st, "ann", GOOD).role == "auditor"
