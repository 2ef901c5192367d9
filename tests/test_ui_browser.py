"""The UI in a real browser: Debian's chromium driven by Playwright against `streamlit run`.

Why on top of AppTest: only a browser renders the charts, follows the sidebar navigation by
URL, downloads the export over HTTP, and runs the exact command the `python -m ui` launcher serves.
Screenshots go to test-artifacts/; with FEDCOHORT_UPDATE_SCREENSHOTS=1 the README's two
screenshots in docs/screenshots/ are refreshed too.

Needs /usr/bin/chromium (`apt-get install -y chromium`); never `playwright install`.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip("needs Debian's chromium: apt-get install -y chromium", allow_module_level=True)

from playwright.sync_api import Page, expect  # noqa: E402

from coordinator import users  # noqa: E402
from coordinator.store import open_store  # noqa: E402
from policies.audit import verify_bundle  # noqa: E402
from test_ui_apptest import PASSWORDS, STUDY, build_state  # noqa: E402
from ui.__main__ import streamlit_argv  # noqa: E402  (the exact command `coordinator ui` runs)

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
DOCS = ROOT / "docs" / "screenshots"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WAIT = 20_000  # ms


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args: dict) -> dict:
    """pytest-playwright's launch, pointed at the system chromium with offline-friendly flags."""
    return {**browser_type_launch_args, "executable_path": str(CHROMIUM), "args": CHROMIUM_ARGS}


@pytest.fixture(scope="session")
def browser_context_args(browser_context_args: dict) -> dict:
    return {**browser_context_args, "viewport": {"width": 1280, "height": 860}, "accept_downloads": True}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"streamlit exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                if r.read() == b"ok":
                    return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError("streamlit did not answer /_stcore/health")


@pytest.fixture()
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """`streamlit run ui/app.py` on a free port over a fresh state dir per test; stopped by its group id."""
    state = tmp_path_factory.mktemp("ui-state")
    build_state(state, finished=3).close()
    port = _free_port()
    env = {**os.environ, "FEDCOHORT_STATE_DIR": str(state)}
    env.pop("FEDCOHORT_DB_URL", None)
    log = (state / "streamlit.log").open("w")
    proc = subprocess.Popen(streamlit_argv(port, "127.0.0.1"), cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc)
        yield url, state
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()


def shot(page: Page, name: str, docs: bool = False) -> None:
    """Save a screenshot to test-artifacts/ (and, on request, a small copy for the README)."""
    ARTIFACTS.mkdir(exist_ok=True)
    page.wait_for_function("document.querySelectorAll('[data-stale=\"true\"]').length === 0", timeout=WAIT)
    page.wait_for_timeout(800)  # let charts finish their transition
    path = ARTIFACTS / f"ui-{name}.png"
    page.screenshot(path=str(path))
    if docs and os.environ.get("FEDCOHORT_UPDATE_SCREENSHOTS") == "1":
        DOCS.mkdir(parents=True, exist_ok=True)
        try:
            from PIL import Image

            Image.open(path).convert("RGB").quantize(colors=96).save(DOCS / f"{name}.png", optimize=True)
        except ImportError:
            (DOCS / f"{name}.png").write_bytes(path.read_bytes())


def sign_in(page: Page, url: str, user: str, path: str = "") -> None:
    page.goto(f"{url}/{path}")
    page.get_by_label("Username").fill(user)
    page.get_by_label("Password", exact=True).fill(PASSWORDS[user])
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_text(f"Signed in as {user}")).to_be_visible(timeout=WAIT)


def go(page: Page, title: str) -> None:
    page.get_by_test_id("stSidebarNav").get_by_text(title, exact=True).click()
    expect(page.get_by_role("heading", name=re.compile(f"^{title}"), level=1)).to_be_visible(timeout=WAIT)


def test_lead_runs_a_study_end_to_end(server: tuple[str, Path], page: Page, tmp_path: Path) -> None:
    url, state = server
    sign_in(page, url, "lead")
    expect(page.get_by_text("role: lead")).to_be_visible()
    expect(page.get_by_text("Publish as new version")).to_be_visible(timeout=WAIT)
    shot(page, "studies", docs=True)

    go(page, "Evaluations")
    expect(page.get_by_test_id("stVegaLiteChart").first).to_be_visible(timeout=WAIT)
    expect(page.get_by_text("Reference lines from bench/results/accuracy_heart.json")).to_be_visible()
    shot(page, "evaluations", docs=True)

    go(page, "Rounds")
    expect(page.get_by_text("waits for a decision")).to_be_visible(timeout=WAIT)
    page.get_by_label("Note (kept in the store with the decision)").fill("pooled accuracy improving")
    page.get_by_role("button", name="Approve").click()
    expect(page.get_by_text("Round 3: approve recorded by lead")).to_be_visible(timeout=WAIT)
    shot(page, "rounds-approved")
    with open_store(None, state) as store:
        approval = store.approval_for(STUDY, 3)
        assert (approval.decision, approval.user, approval.note) == ("approve", "lead", "pooled accuracy improving")

    go(page, "Studies")
    page.get_by_label("Study id (optional; default: the policy's id)").fill("heart-trial-2")
    page.get_by_role("button", name="Create from template").click()
    expect(page.get_by_text("Created heart-trial-2 v1 (draft)")).to_be_visible(timeout=WAIT)
    expect(page.get_by_role("combobox", name="Study")).to_have_value("heart-trial-2 v1")  # selected for you
    page.get_by_role("button", name="Open for enrolment").click()
    expect(page.get_by_text("heart-trial-2 v1: draft → open")).to_be_visible(timeout=WAIT)
    shot(page, "study-created")

    go(page, "Audit")
    page.get_by_role("button", name="Verify").click()
    expect(page.get_by_text(re.compile(r"coordinator \(audit.jsonl\): OK, \d+ entries, chain intact"))).to_be_visible(
        timeout=WAIT)
    page.get_by_role("button", name="Export bundle").click()
    download_button = page.get_by_role("button", name=re.compile("^Download audit-export-coordinator-"))
    expect(download_button).to_be_visible(timeout=WAIT)
    with page.expect_download() as info:
        download_button.click()
    bundle = tmp_path / info.value.suggested_filename
    info.value.save_as(bundle)
    assert zipfile.is_zipfile(bundle) and verify_bundle(bundle).ok
    shot(page, "audit-exported")
    actions = [(e.action, e.actor) for e in users.coordinator_log(state).entries()]
    for expected in [("user.login", "lead"), ("round.approved", "lead"), ("study.created", "lead"),
                     ("study.status_changed", "lead"), ("audit.exported", "lead")]:
        assert expected in actions

    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_role("button", name="Sign in")).to_be_visible(timeout=WAIT)


def test_auditor_reads_but_cannot_decide(server: tuple[str, Path], page: Page) -> None:
    url, _ = server
    sign_in(page, url, "aud")
    expect(page.get_by_test_id("stSidebarNav").get_by_text("Users", exact=True)).to_have_count(0)
    go(page, "Rounds")
    expect(page.get_by_text("Your role (auditor) may read but not decide rounds.")).to_be_visible(timeout=WAIT)
    expect(page.get_by_role("button", name="Approve")).to_be_disabled()
    shot(page, "rounds-auditor")


def test_users_page_is_not_reachable_by_url_for_a_lead(server: tuple[str, Path], page: Page) -> None:
    url, _ = server
    sign_in(page, url, "lead", path="users")
    expect(page.get_by_role("heading", name="Studies", level=1)).to_be_visible(timeout=WAIT)
    expect(page.get_by_role("button", name="Add user")).to_have_count(0)
    expect(page.get_by_test_id("stSidebarNav").get_by_text("Users", exact=True)).to_have_count(0)


def test_admin_sees_users_and_wrong_password_fails(server: tuple[str, Path], page: Page) -> None:
    url, _ = server
    page.goto(url)
    page.get_by_label("Username").fill("root")
    page.get_by_label("Password", exact=True).fill("not the password")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_text("Sign-in failed")).to_be_visible(timeout=WAIT)
    sign_in(page, url, "root")
    go(page, "Users")
    expect(page.get_by_role("button", name="Add user")).to_be_visible()
    shot(page, "users-admin")
