"""Evaluations: pooled test metrics per round (with 95% intervals), each silo's suppressed
report, reference lines for the heart study, and the table as CSV."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from ui import charts, data
from ui.common import PageContext, page_context, show_study


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


ctx = page_context()
st.title("Evaluations")
study = show_study(ctx)
history = data.pooled_history(ctx.store, study, ctx.summary)
silos = data.per_silo_table(ctx.store, study, ctx.summary)
headline(ctx, study)
pooled(study, history)
per_silo(silos)
if not history.empty or not silos.empty:
    st.download_button("Download table (CSV)", data.evaluation_csv(history, silos),
                       file_name=f"{study.id}-v{study.version}-evaluations.csv", mime="text/csv", key="eval_csv")
