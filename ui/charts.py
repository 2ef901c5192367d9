"""Altair charts for the pages: a metric per round with its 95% interval, privacy spent vs budget.

Why Altair: it ships with Streamlit, draws intervals and labelled reference lines in one
chart, and renders to a static spec (no server-side plotting libraries needed).
"""

from __future__ import annotations

from collections.abc import Sequence

import altair as alt
import pandas as pd

from ui.data import Reference

STUDY_COLOUR = "#222222"
CHART_HEIGHT = 340
EPSILON_TITLE = "epsilon (bar: spent so far, tick: budget)"
LABELS = {"accuracy": "Accuracy", "sensitivity": "Sensitivity", "specificity": "Specificity",
          "auroc": "AUROC", "loss": "Loss (mean log-loss)"}


def metric_chart(history: pd.DataFrame, metric: str, references: Sequence[Reference] = ()) -> alt.LayerChart:
    """One pooled metric per round; a band where the data has *_ci_low/_ci_high; dashed references."""
    title = LABELS.get(metric, metric)
    frame = history[["round", metric] + [c for c in (f"{metric}_ci_low", f"{metric}_ci_high") if c in history]].copy()
    frame = frame.dropna(subset=[metric])
    x = alt.X("round:O", title="training rounds the model has had (0 = initial model)", axis=alt.Axis(labelAngle=0))
    scale = alt.Scale(zero=False, nice=True)
    line = alt.Chart(frame).mark_line(point=alt.OverlayMarkDef(color=STUDY_COLOUR, size=60), color=STUDY_COLOUR, strokeWidth=3).encode(
        x=x, y=alt.Y(f"{metric}:Q", title=title, scale=scale),
        tooltip=[alt.Tooltip("round:O"), alt.Tooltip(f"{metric}:Q", format=".3f")],
    )
    layers: list[alt.Chart] = []
    low, high = f"{metric}_ci_low", f"{metric}_ci_high"
    if low in frame and high in frame and frame[low].notna().any():
        layers.append(alt.Chart(frame).mark_area(opacity=0.18, color=STUDY_COLOUR).encode(
            x=x, y=alt.Y(f"{low}:Q", scale=scale), y2=alt.Y2(f"{high}:Q"),
            tooltip=[alt.Tooltip(f"{low}:Q", title="95% CI low", format=".3f"),
                     alt.Tooltip(f"{high}:Q", title="95% CI high", format=".3f")],
        ))
    layers.append(line)
    if references:
        refs = pd.DataFrame([{"reference": r.label, "value": r.value, "kind": r.kind} for r in references])
        layers.append(alt.Chart(refs).mark_rule(strokeDash=[6, 4]).encode(
            y="value:Q",
            color=alt.Color("reference:N", title="reference lines (from bench/results/accuracy_heart.json)",
                            scale=alt.Scale(scheme="tableau10"),
                            legend=alt.Legend(orient="bottom", columns=2, labelLimit=400, titleLimit=600)),
            tooltip=["reference:N", alt.Tooltip("value:Q", format=".4f"), "kind:N"],
        ))
    return alt.layer(*layers).properties(height=CHART_HEIGHT, title=f"{title}: this study (line, 95% band)")


def privacy_chart(spend: pd.DataFrame) -> alt.LayerChart:
    """Each silo's cumulative epsilon as a bar, its budget as a black tick above it."""
    bars = alt.Chart(spend).mark_bar(color="#4c78a8").encode(
        x=alt.X("silo:N", title="silo", axis=alt.Axis(labelAngle=0)),
        y=alt.Y("epsilon_spent:Q", title=EPSILON_TITLE),
        tooltip=["silo:N", alt.Tooltip("epsilon_spent:Q", format=".3f"),
                 alt.Tooltip("epsilon_budget:Q", format=".3f"), "rounds_left:Q"],
    )
    budget = alt.Chart(spend).mark_tick(color="black", thickness=3, size=40).encode(
        x="silo:N", y=alt.Y("epsilon_budget:Q", title=EPSILON_TITLE),
    )
    return alt.layer(bars, budget).properties(height=260)
