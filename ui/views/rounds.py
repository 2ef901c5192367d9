"""Rounds: decide the next gated round with what the lead needs to hand, and watch rounds run.

The decision (approve / hold / reject, with a note) goes to the store, where the ServerApp's
approval gate polls for it, and to the coordinator's audit log. The live view refreshes by
itself every few seconds without rerunning the rest of the page.
"""

from __future__ import annotations

import pandas as pd
import streamlit as st

from policies.errors import PolicyError
from ui import actions, auth, data
from ui.common import PageContext, flash, no_write_hint, page_context, refused, show_flash, show_study

LIVE_SECONDS = 3
BUTTONS = (("approve", "Approve", "primary"), ("hold", "Hold", "secondary"), ("reject", "Reject", "secondary"))


def briefing(ctx: PageContext, study: data.StudyView) -> None:
    """Last round's pooled metrics, each silo's spend, and who will take part."""
    c1, c2 = st.columns(2)
    with c1:
        latest_pooled(data.pooled_history(ctx.store, study, ctx.summary), ("accuracy", "sensitivity", "specificity"))
    with c2:
        st.markdown("**Privacy spent so far**")
        spend = data.privacy_table(ctx.store, study, ctx.summary)
        if study.spec is not None and study.spec.dp is None:
            st.caption("This study's policy uses no differential privacy.")
        elif spend.empty:
            st.caption("No spend reported yet.")
        else:
            cols = [c for c in ("silo", "epsilon_spent", "after_next_round", "epsilon_budget", "rounds_left") if c in spend]
            st.dataframe(spend[cols], hide_index=True)
            st.caption("after_next_round: the spend if the next round costs what the last one did (an estimate; "
                       "each silo's own accountant refuses a round that would exceed its budget).")
    enrolled = ctx.store.list_enrolments(study.id, version=study.version) if study.in_store else []
    silos = {s.name: s for s in ctx.store.list_silos()}
    taking_part = [f"{e.silo} (connection: {data.connection_state(silos.get(e.silo))})" for e in enrolled
                   if e.status == "validated"]
    st.markdown("**Will take part** (validated enrolments): " + (", ".join(taking_part) or "none yet"))


def latest_pooled(history: pd.DataFrame, names: tuple[str, ...]) -> None:
    """The last revealed pooled evaluation as big numbers (what a lead decides on)."""
    st.markdown("**Last pooled evaluation**")
    if history.empty:
        st.caption("No evaluation yet.")
        return
    last = history.iloc[-1]
    st.caption(f"model after {int(last['round'])} round(s), {int(last['n'] or 0)} test rows")
    for col, name in zip(st.columns(len(names)), names):
        value = last.get(name)
        col.metric(name, "-" if value is None or pd.isna(value) else f"{value:.3f}")


def decision(ctx: PageContext, study: data.StudyView) -> tuple[int, bool] | None:
    """Offer the round to decide; returns what was offered (see `data.offer`), or None."""
    st.subheader("Next round")
    if not study.in_store or study.spec is None:
        st.caption("Decisions are recorded in the store; this study is shown read-only.")
        return None
    offered = data.offer(ctx.store, study)
    if offered is None:
        mode = study.spec.approval
        st.caption(f"Nothing waits for a decision (approval: {mode.mode}"
                   + (f", rounds up to {mode.auto_rounds} approve themselves)." if mode.mode == "auto" else ")."))
        return None
    round_no, at_gate = offered
    what = (" (round 0 is the statistics round)" if round_no == 0 else "")
    st.markdown(f"Round **{round_no}** of {study.spec.training.rounds}{what} "
                + ("waits for a decision: the coordinator holds it at the approval gate." if at_gate else
                   "may be decided ahead: the coordinator has not reached it yet."))
    briefing(ctx, study)
    no_write_hint(ctx, "decide rounds")
    note = st.text_area("Note (kept in the store with the decision)", key=f"note_{study.key}_{round_no}",
                        disabled=not ctx.can_write)
    cols = st.columns(len(BUTTONS))
    for col, (choice, label, kind) in zip(cols, BUTTONS):
        if col.button(label, key=f"decide_{choice}", type=kind, disabled=not ctx.can_write):
            decide(ctx, study, round_no, choice, note)
    return offered


def decide(ctx: PageContext, study: data.StudyView, round_no: int, choice: str, note: str) -> None:
    """The click handler; the role is checked again in the store by `actions.decide_round`."""
    try:
        row = actions.decide_round(ctx.store, ctx.state, ctx.user.name, study.id, study.version, round_no, choice, note)
    except PolicyError as exc:
        refused(exc)
        return
    flash(f"Round {round_no}: {row.decision} recorded by {row.user} (policy {row.policy_hash[:12]})")
    st.rerun()


def live(ctx: PageContext, study: data.StudyView, offered: tuple[int, bool] | None) -> None:
    """Who was asked, replied and refused per round, and the pooled metrics as they are revealed.

    Refreshes itself every LIVE_SECONDS; when the coordinator starts waiting on a different
    round than the one `decision` offered, the whole page reruns to offer it.
    """
    @st.fragment(run_every=LIVE_SECONDS)
    def view() -> None:
        if auth.idle_expired():
            st.rerun(scope="app")  # the full run signs the idle session out
        if data.offer(ctx.store, study) != offered or data.status_now(ctx.store, study) != study.status:
            st.rerun(scope="app")  # a new round to decide, or the study moved on: redraw the whole page
        summary = data.summary_for(ctx.state, study)
        if summary:
            st.markdown(f"Coordinator: **{summary.get('status', '?')}**"
                        + (f" — {summary['reason']}" if summary.get("reason") else ""))
        table = data.rounds_table(ctx.store, study, summary)
        if table.empty:
            st.caption("No round has started yet.")
        else:
            st.dataframe(table, hide_index=True, width="stretch")
        metrics = data.pooled_history(ctx.store, study, summary)
        if not metrics.empty:
            latest_pooled(metrics, data.METRICS)
            shown = metrics[["round", *[c for c in data.METRICS if c in metrics], "n"]].round(4)
            st.dataframe(shown.rename(columns={"round": "model after round"}), hide_index=True, width="stretch")
            st.caption("Pooled test metrics of the model after each round's training, revealed one phase later.")
        st.caption(f"Refreshes every {LIVE_SECONDS} s.")

    st.subheader("Rounds")
    view()


def approvals(ctx: PageContext, study: data.StudyView) -> None:
    rows = ctx.store.list_approvals(study.id, version=study.version) if study.in_store else []
    if rows:
        st.subheader("Decisions")
        st.dataframe(pd.DataFrame([{"round": a.round_no, "decision": a.decision, "by": a.user, "at": a.at,
                                    "note": a.note, "policy hash": a.policy_hash[:12]} for a in rows]),
                     hide_index=True, width="stretch")


ctx = page_context()
st.title("Rounds")
study = show_study(ctx)
show_flash()
offered = decision(ctx, study)
live(ctx, study, offered)
approvals(ctx, study)
