"""Users (admins only): add accounts, clear lockouts, reset passwords; every change audited."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from coordinator import users
from policies.errors import PolicyError
from ui import actions
from ui.common import PageContext, flash, page_context, refused, show_flash


def listing(ctx: PageContext) -> list[str]:
    rows = ctx.store.list_users()
    st.dataframe(pd.DataFrame([{"user": u.name, "role": u.role, "locked": u.is_locked(),
                                "failed tries": u.failed_attempts, "created": u.created_at} for u in rows]),
                 hide_index=True, width="stretch")
    return [u.name for u in rows]


def add_form(ctx: PageContext) -> None:
    with st.form("add_user", clear_on_submit=True):
        st.markdown("**Add a user**")
        name = st.text_input("New user name", key="new_user")
        role = st.selectbox("Role", users.ROLES, key="new_role")
        password = st.text_input(f"Initial password (at least {users.MIN_PASSWORD_CHARS} characters)",
                                 type="password", key="new_password")
        submitted = st.form_submit_button("Add user")
    if submitted:
        try:
            actions.add_user(ctx.store, ctx.state, ctx.user.name, name.strip(), role, password)
        except PolicyError as exc:
            refused(exc)
            return
        flash(f"User {name.strip()} ({role}) added.")
        st.rerun()


def manage(ctx: PageContext, names: list[str]) -> None:
    st.markdown("**Unlock or reset**")
    who = st.selectbox("User", names, key="manage_user")
    if st.button("Unlock", key="unlock_user") and who:
        try:
            actions.unlock_user(ctx.store, ctx.state, ctx.user.name, who)
        except PolicyError as exc:
            refused(exc)
        else:
            flash(f"{who} unlocked.")
            st.rerun()
    with st.form("reset_password", clear_on_submit=True):
        password = st.text_input("New password", type="password", key="reset_pw")
        submitted = st.form_submit_button("Reset password")
    if submitted and who:
        try:
            actions.reset_password(ctx.store, ctx.state, ctx.user.name, who, password)
        except PolicyError as exc:
            refused(exc)
        else:
            flash(f"Password of {who} reset (and any lockout cleared).")
            st.rerun()


ctx = page_context()
st.title("Users")
if ctx.user.role != "admin":  # the page is not in a non-admin's navigation; refuse anyway
    st.error("Only admins manage users.")
    st.stop()
show_flash()
names = listing(ctx)
c1, c2 = st.columns(2)
with c1:
    add_form(ctx)
with c2:
    manage(ctx, names)
