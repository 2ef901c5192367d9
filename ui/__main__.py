"""`python -m ui --state-dir STATE`: serve the web UI with Streamlit (what `coordinator ui` runs).

Why a launcher: Streamlit needs its own flags (headless, no usage statistics, no file
watcher on a server) and the UI finds its state through the environment. If the store has
no account at all, the demo's `lead` account is made with a random password (printed once,
kept in a 0600 file), so there is never a default password and never a locked-out first start.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ui import UPLOAD_LIMIT_MB

APP = Path(__file__).resolve().parent / "app.py"


def streamlit_argv(port: int, address: str) -> list[str]:
    """The exact command that serves the UI (also used by the browser test)."""
    return [sys.executable, "-m", "streamlit", "run", str(APP), "--server.headless", "true",
            "--server.address", address, "--server.port", str(port), "--browser.gatherUsageStats", "false",
            "--server.fileWatcherType", "none", "--client.toolbarMode", "viewer",
            "--server.maxUploadSize", str(UPLOAD_LIMIT_MB)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="coordinator ui", description="serve the fedcohort web UI")
    parser.add_argument("--state-dir", default=".fedcohort", help="the coordinator's state dir (default .fedcohort)")
    parser.add_argument("--db-url", help="SQLAlchemy URL of a shared store (default: SQLite under the state dir)")
    parser.add_argument("--address", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8501)
    args = parser.parse_args(argv)
    state = Path(args.state_dir).resolve()
    state.mkdir(parents=True, exist_ok=True)
    from coordinator.store import open_store
    from coordinator.users import ensure_demo_lead

    with open_store(args.db_url, state) as store:
        if not store.list_users():
            name, password = ensure_demo_lead(store, state)
            if password:
                print(f"created user '{name}' (role lead); password: {password}\n"
                      f"(also in {state / 'coordinator' / 'lead-password.txt'}, readable only by you)")
    env = {**os.environ, "FEDCOHORT_STATE_DIR": str(state)}
    if args.db_url:
        env["FEDCOHORT_DB_URL"] = args.db_url
    print(f"fedcohort UI on http://{args.address}:{args.port} (state {state})", flush=True)
    cmd = streamlit_argv(args.port, args.address)
    os.execve(sys.executable, cmd, env)
    return 0  # not reached


if __name__ == "__main__":
    raise SystemExit(main())
