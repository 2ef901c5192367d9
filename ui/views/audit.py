"""Audit: the coordinator's hash-chained log (and a local demo's silo logs), filterable;
Verify runs the same check as `audit verify`; Export makes the auditor's bundle (logged)."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from policies.errors import PolicyError
from ui import actions, data
from ui.common import PageContext, page_context, refused

EXPORT = "audit_export"  # (party, file name, bytes) of the last export, offered for download


def filters(frame: pd.DataFrame) -> pd.DataFrame:
    c1, c2, c3 = st.columns(3)
    parties = c1.multiselect("Party", sorted(frame["party"].unique()), key="f_party")
    acts = c2.multiselect("Action", sorted(frame["action"].unique()), key="f_action")
    actors = c3.multiselect("User / actor", sorted(frame["actor"].unique()), key="f_actor")
    times = frame["time"].dropna()
    if parties:
        frame = frame[frame["party"].isin(parties)]
    if acts:
        frame = frame[frame["action"].isin(acts)]
    if actors:
        frame = frame[frame["actor"].isin(actors)]
    if not times.empty:
        first, last = times.min().date(), times.max().date()
        span = st.date_input("Between", (first, last), min_value=first, max_value=last, key="f_time")
        if isinstance(span, tuple) and len(span) == 2:
            day = frame["time"].dt.date
            frame = frame[(day >= span[0]) & (day <= span[1])]
    return frame


def checks(ctx: PageContext, logs: list[data.PartyLog]) -> None:
    st.subheader("Verify and export")
    names = [log.party for log in logs]
    party = st.selectbox("Log", names, key="audit_party")
    log = logs[names.index(party)]
    c1, c2 = st.columns(2)
    if c1.button("Verify", key="audit_verify"):
        try:
            result, text = actions.verify_log(ctx.store, ctx.state, ctx.user.name, log)
        except PolicyError as exc:
            refused(exc)
        else:
            (st.success if result.ok else st.error)(text)
    if c2.button("Export bundle", key="audit_export_btn"):
        try:
            name, blob = actions.export_log(ctx.store, ctx.state, ctx.user.name, log)
        except PolicyError as exc:
            refused(exc)
        else:
            st.session_state[EXPORT] = (log.party, name, blob)
    exported = st.session_state.get(EXPORT)
    if exported and exported[0] == log.party:
        st.download_button(f"Download {exported[1]}", exported[2], file_name=exported[1], mime="application/zip",
                           key="audit_download")
        st.caption("The export is recorded in the coordinator's audit log (audit.exported). Auditors check the "
                   "bundle with `coordinator audit verify BUNDLE.zip`.")


ctx = page_context()
st.title("Audit trail")
logs = data.party_logs(ctx.state)
if not logs:
    st.info(f"No audit log under {ctx.state} yet.")
    st.stop()
frame, problems = data.audit_frame(logs)
for problem in problems:
    st.warning(problem)
shown = filters(frame)
st.dataframe(shown.drop(columns=["time"], errors="ignore").sort_values(["ts", "party", "seq"], ascending=False),
             hide_index=True, width="stretch")
st.caption(f"{len(shown)} of {len(frame)} entries. Details hold counts, ids and hashes only.")
checks(ctx, logs)
