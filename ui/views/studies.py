"""Studies: every version with status and hash; create, change settings, open for enrolment.

Writes are for leads and admins; `ui.actions` re-checks the role in the store on each one.
"""

from __future__ import annotations

import pandas as pd
import streamlit as st

from coordinator.lifecycle import TRANSITIONS
from policies.errors import PolicyError
from policies.study import StudySpec
from policies.yamlsafe import MAX_POLICY_BYTES
from ui import UPLOAD_LIMIT_MB, actions, data
from ui.common import NEXT_STUDY, PageContext, flash, no_write_hint, page_context, refused, show_flash

MOVE_LABELS = {"open": "Open for enrolment", "running": "Start running", "completed": "Mark completed",
               "stopped": "Stop study"}


def study_list(ctx: PageContext) -> None:
    if not ctx.views:
        st.info("No studies yet.")
        return
    rows = [{"study": v.id, "version": v.version, "name": v.name, "status": v.status,
             "policy hash": v.policy_hash[:16], "created by": v.created_by or "-", "updated": v.updated_at}
            for v in ctx.views]
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")
    if not ctx.views[0].in_store:
        st.info("The store has no studies yet: the study above comes from summary.json and is read-only.")


def _create(ctx: PageContext, text: str, study_id: str, name: str) -> None:
    try:
        row = actions.create_study(ctx.store, ctx.state, ctx.user.name, text, study_id=study_id, name=name)
    except PolicyError as exc:
        refused(exc)
        return
    _show(row, f"Created {row.label} (draft), policy hash {row.policy_hash}")


def _show(row, message: str) -> None:
    """After a write: say what changed and open that study version on the next run."""
    flash(message)
    st.session_state[NEXT_STUDY] = f"{row.id}@{row.version}"
    st.rerun()


def create_form(ctx: PageContext) -> None:
    st.subheader("Create a study")
    no_write_hint(ctx, "create studies")
    study_id = st.text_input("Study id (optional; default: the policy's id)", key="new_study_id")
    name = st.text_input("Name (optional; default: the policy's name)", key="new_study_name")
    from_template, from_upload = st.tabs(["From a template", "Upload a policy (YAML)"])
    with from_template:
        shipped = data.templates()
        choice = st.selectbox("Template", list(shipped), key="template")
        if st.button("Create from template", key="create_template", disabled=not ctx.can_write) and choice:
            _create(ctx, shipped[choice].read_text(encoding="utf-8"), study_id, name)
    with from_upload:
        text = uploaded_policy()
        if st.button("Create from upload", key="create_upload", disabled=not ctx.can_write or not text):
            _create(ctx, text, study_id, name)


def uploaded_policy() -> str:
    """The uploaded policy's text if it is a valid study policy, else "" (the problem shown inline).

    Streamlit refuses files over UPLOAD_LIMIT_MB in the browser; what gets through is checked
    for size, encoding, aliases and every key before anything can be created from it.
    """
    upload = st.file_uploader(f"Study policy (YAML, at most {MAX_POLICY_BYTES:,} bytes)", type=["yaml", "yml"],
                              key="policy_upload", max_upload_size=UPLOAD_LIMIT_MB)
    if upload is None:
        st.caption(f"A file over {UPLOAD_LIMIT_MB} MB is refused by the page before it is sent (it shows in red: "
                   f"\"File must be {UPLOAD_LIMIT_MB:.1f}MB or smaller.\"); nothing is stored.")
        return ""
    try:
        text = data.upload_text(upload.name, upload.getvalue())
        spec = data.parse_policy(text, upload.name)
        actions.check_name(spec.name)
    except PolicyError as exc:
        st.error(str(exc))
        return ""
    st.caption(f"Valid policy: {spec.id} v{spec.version}, hash `{spec.policy_hash()[:16]}`")
    return text


def settings_form(ctx: PageContext, study: data.StudyView, spec: StudySpec) -> None:
    st.subheader("Settings")
    draft = study.status == "draft"
    st.caption("A draft changes in place (its hash changes). Once open, silos have validated against "
               "this hash, so a change is published as the next version.")
    k = study.key
    with st.form(f"settings_{k}"):
        name = st.text_input("Name", spec.name, key=f"name_{k}")
        c1, c2, c3 = st.columns(3)
        rounds = c1.number_input("Rounds", 1, 1000, spec.training.rounds, key=f"rounds_{k}")
        strategies = ["fedavg", "fedyogi"]
        strategy = c2.selectbox("Strategy", strategies, strategies.index(spec.training.strategy), key=f"strategy_{k}")
        modes = ["manual", "auto"]
        mode = c3.selectbox("Approval mode", modes, modes.index(spec.approval.mode), key=f"mode_{k}")
        auto_rounds = c1.number_input("Auto-approve rounds up to (auto mode)", 0, 1000,
                                      min(spec.approval.auto_rounds, 1000), key=f"auto_{k}")
        min_silos = c2.number_input("Minimum silos", 1, 100, spec.min_silos, key=f"min_silos_{k}")
        small_cell = c3.number_input("Small-cell minimum", 1, 1000, spec.small_cell_min, key=f"cell_{k}")
        dp = st.checkbox("Differential privacy (DP-SGD) at every silo", spec.dp is not None, key=f"dp_{k}")
        d1, d2 = st.columns(2)
        # No min_value on epsilon and delta: a widget would silently clamp a typed 0 or -1;
        # `actions.settings_problems` refuses it with a message instead.
        epsilon = d1.number_input("Epsilon per silo (whole study)", value=float(spec.dp.epsilon) if spec.dp else 1.0,
                                  max_value=100.0, key=f"eps_{k}")
        delta = d2.number_input("Delta", value=float(spec.dp.delta) if spec.dp else 1e-3, max_value=0.5,
                                format="%.1e", key=f"delta_{k}")
        label = "Save draft" if draft else "Publish as new version"
        submitted = st.form_submit_button(label, disabled=not ctx.can_write)
    if not submitted:
        return
    settings = actions.StudySettings(name, int(rounds), strategy, mode, int(auto_rounds), int(min_silos),
                                     int(small_cell), bool(dp), float(epsilon), float(delta))
    problems = actions.settings_problems(settings)
    if problems:
        for problem in problems:
            st.error(problem)
        st.caption("Nothing was saved.")
        return
    try:
        row = actions.change_settings(ctx.store, ctx.state, ctx.user.name, study.id, study.version, settings)
    except PolicyError as exc:
        refused(exc)
        return
    _show(row, f"Saved {row.label}: new policy hash {row.policy_hash}")


def lifecycle(ctx: PageContext, study: data.StudyView) -> None:
    st.subheader("Lifecycle")
    moves = sorted(TRANSITIONS.get(study.status, ()))  # type: ignore[call-overload]
    if not moves:
        st.caption(f"{study.label} is {study.status}; it stays that way.")
        return
    reason = st.text_input("Reason (required to stop; recorded in the audit trail, so no patient details)",
                           key=f"reason_{study.key}")
    cols = st.columns(len(moves))
    for col, to in zip(cols, moves):
        if col.button(MOVE_LABELS.get(to, to), key=f"move_{to}", disabled=not ctx.can_write):
            try:
                change = actions.change_status(ctx.store, ctx.state, ctx.user.name, study.id, study.version, to, reason)
            except PolicyError as exc:
                refused(exc)
                return
            flash(f"{study.id} v{study.version}: {change.from_status} → {change.to_status}")
            st.rerun()


ctx = page_context()
st.title("Studies")
show_flash()
study_list(ctx)
selected = ctx.study
if selected is not None and selected.in_store and selected.spec is not None:
    st.divider()
    st.markdown(f"### {selected.label}: {selected.name}")
    st.caption(f"status **{selected.status}** · policy hash `{selected.policy_hash}`")
    settings_form(ctx, selected, selected.spec)
    lifecycle(ctx, selected)
    with st.expander("Policy (YAML)"):
        st.code(ctx.store.get_study(selected.id, selected.version).policy_yaml, language="yaml")
st.divider()
create_form(ctx)
