"""Silos: who enrolled, how their cohorts validated (counts and rule results only), key
ceremony, privacy spent against budget, and who is online. Read-only for every role."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from ui import charts, data
from ui.common import PageContext, page_context, show_study


def enrolments(ctx: PageContext, study: data.StudyView) -> None:
    st.subheader("Enrolments and validation")
    rows = ctx.store.list_enrolments(study.id, version=study.version) if study.in_store else []
    if not rows:
        st.caption("No enrolments recorded in the store for this study version.")
        return
    plaintext = study.spec is not None and study.spec.encryption == "none"
    table = [{"silo": e.silo, "status": e.status,
              "key ceremony": "not needed (no encryption)" if plaintext else e.key_ceremony,
              **data.validation_summary(e.validation_report), "updated": e.updated_at} for e in rows]
    st.dataframe(pd.DataFrame(table), hide_index=True, width="stretch")
    for e in rows:
        results = (e.validation_report or {}).get("results") or []
        if not results:
            continue
        with st.expander(f"{e.silo}: validation rules"):
            st.dataframe(pd.DataFrame([
                {"rule": r.get("rule"), "column": r.get("column"), "severity": r.get("severity"),
                 "result": "PASS" if r.get("passed") else ("FAIL" if r.get("severity") == "error" else "WARN"),
                 "rows affected": str(r.get("violations")), "description": r.get("description")}
                for r in results]), hide_index=True, width="stretch")


def connections(ctx: PageContext) -> None:
    st.subheader("Connections")
    silos = ctx.store.list_silos()
    if not silos:
        st.caption("No silo is known to this coordinator yet.")
        return
    states = [data.connection_state(s) for s in silos]
    st.dataframe(pd.DataFrame([
        {"silo": s.name, "state": state, "last seen": s.last_seen, "enrolment key": (s.key_fingerprint or "-")[:24]}
        for s, state in zip(silos, states)]), hide_index=True, width="stretch")
    if data.NOT_RECORDED in states:
        st.caption(f"\"{data.NOT_RECORDED}\": the coordinator has recorded no heartbeat from that silo, so whether it "
                   "is connected is not known here; the Rounds page shows who replied in each round.")


def privacy(ctx: PageContext, study: data.StudyView) -> None:
    st.subheader("Privacy budget")
    spend = data.privacy_table(ctx.store, study, ctx.summary)
    if spend.empty:
        dp = study.spec.dp if study.spec else None
        st.caption("No privacy spend reported yet." if dp else "This study's policy uses no differential privacy.")
        return
    st.altair_chart(charts.privacy_chart(spend), width="stretch")
    st.dataframe(spend, hide_index=True, width="stretch")
    st.caption("Each silo's own ledger is the authority; these are the totals it reported after each round.")


ctx = page_context()
st.title("Silos")
study = show_study(ctx)
enrolments(ctx, study)
privacy(ctx, study)
connections(ctx)
if not study.in_store and ctx.summary:
    replied = sorted({s for h in ctx.summary.get("history") or [] for s in h.get("replied") or []})
    st.caption(f"Silos that replied in this run (summary.json): {', '.join(replied) or 'none'}")
