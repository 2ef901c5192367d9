"""fedcohort web UI entry point: `streamlit run ui/app.py` (or `python -m ui --state-dir STATE`).

Reads FEDCOHORT_STATE_DIR (and FEDCOHORT_DB_URL for a shared store), asks for a sign-in,
then shows the pages the signed-in user's role may see. Users is for admins only; every
write re-checks the role in the store anyway (`ui.actions`).
"""

from __future__ import annotations

import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:  # `streamlit run ui/app.py` puts ui/ on the path, not the project
    sys.path.insert(0, str(_ROOT))

import streamlit as st  # noqa: E402

from ui import auth, data  # noqa: E402
from ui.common import select_study  # noqa: E402

st.set_page_config(page_title="fedcohort", page_icon=":material/hub:", layout="wide")

state = data.state_dir()
try:
    store = data.get_store()
except Exception as exc:  # a wrong URL or an unreachable database: say so instead of a traceback
    st.error(f"Cannot open the coordinator store ({data.db_url() or state}): {exc}")
    st.stop()

# Page scripts live in ui/views/, not ui/pages/: Streamlit would list a pages/ folder in the
# sidebar of the sign-in screen, which runs before (and without) st.navigation.
user = auth.current_user(store)
if user is None:
    auth.login_form(store, state)
    st.stop()

pages = [
    st.Page("views/studies.py", title="Studies", icon=":material/science:", default=True),
    st.Page("views/silos.py", title="Silos", icon=":material/local_hospital:"),
    st.Page("views/rounds.py", title="Rounds", icon=":material/published_with_changes:"),
    st.Page("views/evaluations.py", title="Evaluations", icon=":material/monitoring:"),
    st.Page("views/audit.py", title="Audit", icon=":material/verified_user:"),
]
if user.role == "admin":
    pages.append(st.Page("views/users.py", title="Users", icon=":material/group:"))
navigation = st.navigation(pages)
auth.sidebar(user)
select_study(store, state)
navigation.run()
