"""Sign-in, idle timeout and sign-out for the Streamlit session.

Why the session keeps only a name: the role is re-read from the store on every run (and
again by each write in `ui.actions`), so demoting or locking someone takes effect at their
next click, and nothing a browser sends can raise a role. Sign-ins go through
`coordinator.users.authenticate`, which counts failures, locks after five and audits.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import streamlit as st

from coordinator import users
from coordinator.store import Store, UserRow
from ui.actions import coordinator_log, mirror_audit

USER = "user"
LAST_SEEN = "last_seen"
NOTICE = "auth_notice"


def _now() -> datetime:
    return datetime.now(timezone.utc)


def sign_out(notice: str = "") -> None:
    """Forget the session's user (and everything it had selected)."""
    for key in list(st.session_state.keys()):
        del st.session_state[key]
    if notice:
        st.session_state[NOTICE] = notice


def current_user(store: Store) -> UserRow | None:
    """The signed-in user as the store knows them now, or None (never signed in, idle too long, locked)."""
    name = st.session_state.get(USER)
    if not name:
        return None
    if users.session_expired(st.session_state.get(LAST_SEEN), _now()):
        sign_out(f"Signed out after {users.SESSION_MINUTES} minutes without activity.")
        return None
    row = store.get_user(name)
    if row is None or row.is_locked():
        sign_out("Your account is no longer available; ask an admin.")
        return None
    st.session_state[LAST_SEEN] = _now()
    return row


def idle_expired() -> bool:
    """For auto-refreshing fragments: they must not keep an idle session alive, only notice its end."""
    return users.session_expired(st.session_state.get(LAST_SEEN), _now())


def login_form(store: Store, state: Path) -> None:
    """The sign-in form; on success the next run shows the pages."""
    _, middle, _ = st.columns([1, 2, 1])
    with middle:
        _login(store, state)


def _login(store: Store, state: Path) -> None:
    st.title("fedcohort")
    st.caption("Sign in to run and review federated studies.")
    notice = st.session_state.pop(NOTICE, "")
    if notice:
        st.info(notice)
    if not store.list_users():
        st.warning("No accounts yet. On the coordinator host run `coordinator users add NAME --role lead` "
                   f"(or start the demo, which writes the `lead` password to {state / users.DEMO_PASSWORD_FILE}).")
    with st.form("login"):
        name = st.text_input("Username", key="login_name")
        password = st.text_input("Password", type="password", key="login_password")
        submitted = st.form_submit_button("Sign in", type="primary")
    if not submitted:
        return
    user = users.authenticate(store, name.strip(), password, audit_log=coordinator_log(state))
    mirror_audit(store, state)
    if user is None:
        st.error("Sign-in failed: wrong username or password, or the account is locked after "
                 f"{users.MAX_FAILED_ATTEMPTS} failed tries (it unlocks after "
                 f"{int(users.LOCK_FOR.total_seconds() // 60)} minutes, or ask an admin).")
        return
    st.session_state[USER] = user.name
    st.session_state[LAST_SEEN] = _now()
    st.rerun()


def sidebar(user: UserRow) -> None:
    """Who is signed in, with which role, and the way out."""
    with st.sidebar:
        st.markdown(f"Signed in as **{user.name}**  \nrole: `{user.role}`")
        if st.button("Sign out", key="sign_out"):
            sign_out("Signed out.")
            st.rerun()
