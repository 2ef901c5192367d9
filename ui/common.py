"""What every page starts from: the store, the state dir, the signed-in user and the study shown.

Why: each page is a script Streamlit re-runs on every click; building this context in one
function keeps the pages short and makes every page re-read the user's role from the store.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import streamlit as st

from coordinator.store import Store, UserRow
from policies.errors import PolicyError
from ui import data
from ui.actions import WRITERS
from ui.auth import USER

STUDY = "study"  # the sidebar's study selector
NEXT_STUDY = "study_next"  # a page asks for a different selection on the next run
_GENERATION = "study_select_generation"  # bumped to give the selector a fresh widget


@dataclass(frozen=True)
class PageContext:
    store: Store
    state: Path
    user: UserRow
    views: list[data.StudyView]
    study: data.StudyView | None

    @property
    def can_write(self) -> bool:
        """Only decides what the page offers; `ui.actions` checks the role again on every write."""
        return self.user.role in WRITERS

    @property
    def summary(self) -> dict[str, Any] | None:
        return data.summary_for(self.state, self.study) if self.study else None


def page_context() -> PageContext:
    """Stops the page (with a message) if nobody is signed in."""
    store, state = data.get_store(), data.state_dir()
    user = store.get_user(st.session_state.get(USER, "")) if st.session_state.get(USER) else None
    if user is None:
        st.warning("Please sign in.")
        st.stop()
    views = data.study_views(store, state)
    return PageContext(store, state, user, views, data.find_view(views, st.session_state.get(STUDY)))


def select_study(store: Store, state: Path) -> None:
    """The sidebar's study selector, shared by all pages.

    The choice lives in a plain session key (STUDY). When a page selects a study itself (after
    creating one), the widget gets a fresh key, so its old state cannot override the new choice.
    """
    views = data.study_views(store, state)
    if NEXT_STUDY in st.session_state:
        st.session_state[STUDY] = st.session_state.pop(NEXT_STUDY)
        st.session_state[_GENERATION] = st.session_state.get(_GENERATION, 0) + 1
    if not views:
        st.sidebar.caption("No studies yet.")
        return
    keys = [v.key for v in views]
    current = st.session_state.get(STUDY)
    labels = {v.key: v.label for v in views}
    st.session_state[STUDY] = st.sidebar.selectbox(
        "Study", keys, index=keys.index(current) if current in keys else 0, format_func=lambda k: labels[k],
        key=f"study_select_{st.session_state.get(_GENERATION, 0)}")


def show_study(ctx: PageContext) -> data.StudyView:
    """Header line for study pages; stops the page if there is no study to show."""
    if ctx.study is None:
        st.info("No study yet: create one on the Studies page, or run `coordinator demo`.")
        st.stop()
    s = ctx.study
    st.caption(f"**{s.id} v{s.version}** · {s.status} · policy `{s.policy_hash[:12]}`")
    if not s.in_store:
        st.info("The store has no studies yet: this study is shown read-only from "
                f"{ctx.state / 'coordinator' / 'summary.json'}.")
    return s


def refused(exc: PolicyError) -> None:
    """A refused write shown where the user clicked, in the words of the rule that refused it."""
    st.error(str(exc))


def no_write_hint(ctx: PageContext, what: str) -> None:
    if not ctx.can_write:
        st.caption(f"Your role ({ctx.user.role}) may read but not {what}.")


FLASH = "flash"


def flash(message: str) -> None:
    """A success message that survives the rerun a write triggers."""
    st.session_state[FLASH] = message


def show_flash() -> None:
    message = st.session_state.pop(FLASH, "")
    if message:
        st.success(message)
