"""Evaluations: pooled test metrics per round (with 95% intervals), each silo's suppressed
report, reference lines for the heart study, and the table as CSV."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from coordinator.release import card_json
from policies.errors import PolicyError
from ui import actions, charts, data
from ui.common import PageContext, flash, page_context, refused, show_flash, show_study


def headline(ctx: PageContext, study: data.StudyView) -> None:
    final = (ctx.summary or {}).get("final") or {}
    if final.get("mean_center_accuracy") is not None:
        st.metric("Mean of the hospitals' test accuracies (final model)", f"{final['mean_center_accuracy']:.3f}")


def pooled(study: data.StudyView, history: pd.DataFrame) -> None:
    st.subheader("Pooled test metrics")
    if history.empty:
        st.caption("No evaluation yet.")
        return
    refs = data.reference_lines() if study.id == data.HEART_STUDY else []
    tabs = st.tabs([charts.LABELS[m] for m in data.METRICS])
    for tab, metric in zip(tabs, data.METRICS):
        with tab:
            if metric not in history or history[metric].isna().all():
                st.caption("Not reported.")
                continue
            chart = charts.metric_chart(history, metric, refs if metric == "accuracy" else ())
            st.altair_chart(chart, width="stretch", height=charts.CHART_HEIGHT + (170 if refs and metric == "accuracy" else 40))
    if refs:
        st.caption(f"Reference lines {data.BENCH_LABEL}: FLamby's published numbers are the mean of the 4 "
                   "hospitals' test accuracies; local-only baselines are our measured accuracy on the pooled "
                   "test set of a model trained at one hospital alone.")
    st.caption("Shaded: 95% Wilson interval from the pooled counts.")


def per_silo(silos: pd.DataFrame) -> None:
    st.subheader("Per silo")
    if silos.empty:
        st.caption("No per-silo reports yet.")
        return
    st.dataframe(silos.astype(str), hide_index=True, width="stretch")
    st.caption("Each silo suppresses cells below the study's small-cell minimum before anything leaves it; "
               f"those cells and the metrics resting on them show as \"{data.SUPPRESSED}\".")


def release(ctx: PageContext, study: data.StudyView) -> None:
    """The model release: the lead's request button, the outcome, and the card to download."""
    st.subheader("Model release")
    row = ctx.store.get_release(study.id, version=study.version) if study.in_store else None
    if row is None:
        st.caption("Not requested. Each silo releases the final model only with its own consent.")
    else:
        st.caption(f"Release **{row.status}** (requested by {row.requested_by}){': ' + row.reason if row.reason else ''}")
        if row.consents:
            st.dataframe(pd.DataFrame(sorted(row.consents.items()), columns=["silo", "answer"]), hide_index=True)
    if row is not None and row.status == "released" and row.weights is not None and row.model_card is not None:
        st.caption(f"Model sha256 `{row.model_sha256}`")
        st.download_button("Download model card (model_card.json)", card_json(row.model_card),
                           file_name="model_card.json", mime="application/json", key="release_card")
        st.download_button("Download weights (model.safetensors)", row.weights, file_name="model.safetensors",
                           mime="application/octet-stream", key="release_weights")
        return
    if row is not None and row.status == "requested":
        st.caption("A running study's request is delivered when its run ends; for a completed study run "
                   "`coordinator study release --state-dir DIR` on the coordinator host.")
        return
    if ctx.user.role not in actions.RELEASERS:
        st.caption(f"Only a study lead requests the release; you are {ctx.user.role}.")
        return
    if study.status in ("running", "completed") and st.button("Request model release", key="release_request"):
        try:
            actions.request_release(ctx.store, ctx.state, ctx.user.name, study.id, study.version)
        except PolicyError as exc:
            refused(exc)
            return
        flash(f"Model release of {study.id} v{study.version} requested")
        st.rerun()


ctx = page_context()
st.title("Evaluations")
show_flash()
study = show_study(ctx)
history = data.pooled_history(ctx.store, study, ctx.summary)
silos = data.per_silo_table(ctx.store, study, ctx.summary)
headline(ctx, study)
pooled(study, history)
per_silo(silos)
if not history.empty or not silos.empty:
    st.download_button("Download table (CSV)", data.evaluation_csv(history, silos),
                       file_name=f"{study.id}-v{study.version}-evaluations.csv", mime="text/csv", key="eval_csv")
release(ctx, study)
