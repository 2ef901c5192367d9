"""The UI in a real browser: Debian's chromium driven by Playwright against `streamlit run`.

Why on top of AppTest: only a browser renders the charts, follows the sidebar navigation by
URL, downloads the export over HTTP, and runs the exact command the `python -m ui` launcher serves.
Screenshots of every page go to each test's own tmp_path (screenshots/); with
FEDCOHORT_UPDATE_SCREENSHOTS=1 the README's two screenshots in docs/screenshots/ are refreshed too.

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
from contextlib import contextmanager
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip("needs Debian's chromium: apt-get install -y chromium", allow_module_level=True)

from playwright.sync_api import Page, expect  # noqa: E402

import yaml  # noqa: E402

from coordinator import users  # noqa: E402
from coordinator.demo import sample_cohorts  # noqa: E402
from coordinator.runtime import LocalFederation, SiloSpec, local_federation  # noqa: E402
from coordinator.store import open_store  # noqa: E402
from policies.audit import verify_bundle  # noqa: E402
from policies.study import load_study, shipped_study  # noqa: E402
from test_ui_apptest import PASSWORDS, build_state, store_snapshot  # noqa: E402
from ui.__main__ import streamlit_argv  # noqa: E402  (the exact command `coordinator ui` runs)

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "screenshots"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WAIT = 45_000  # ms: a maximum; the 2 cores are shared
FEDERATION_WAIT = 240_000  # ms: Flower processes on 2 shared cores


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


@contextmanager
def serve(state: Path) -> Iterator[str]:
    """`streamlit run ui/app.py` (the launcher's exact flags) on a free port; stopped by its group id."""
    port = _free_port()
    env = {**os.environ, "FEDCOHORT_STATE_DIR": str(state)}
    env.pop("FEDCOHORT_DB_URL", None)
    log = (state / "streamlit.log").open("w")
    proc = subprocess.Popen(streamlit_argv(port, "127.0.0.1"), cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()


@pytest.fixture()
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """The UI over a fresh made-up mid-study state dir (see test_ui_apptest.build_state)."""
    state = tmp_path_factory.mktemp("ui-state")
    build_state(state, finished=3).close()
    with serve(state) as url:
        yield url, state


def shot(page: Page, folder: Path, name: str, docs: bool = False) -> None:
    """Save a screenshot under the test's folder (and, on request, a small copy for the README)."""
    folder.mkdir(parents=True, exist_ok=True)
    page.wait_for_function("document.querySelectorAll('[data-stale=\"true\"]').length === 0", timeout=WAIT)
    page.wait_for_timeout(800)  # let charts finish their transition
    path = folder / f"ui-{name}.png"
    viewport = page.viewport_size
    # Streamlit scrolls inside its main container, so a "full page" shot would stop at the
    # window: grow the window to the content for the shot, then put it back.
    height = page.evaluate("document.querySelector('[data-testid=\"stMain\"]')?.scrollHeight ?? 0")
    page.set_viewport_size({"width": viewport["width"], "height": max(viewport["height"], min(int(height), 6000))})
    page.wait_for_timeout(500)
    page.screenshot(path=str(path))
    page.set_viewport_size(viewport)
    assert path.stat().st_size > 10_000, f"{path} looks blank"
    if docs and os.environ.get("FEDCOHORT_UPDATE_SCREENSHOTS") == "1":
        DOCS.mkdir(parents=True, exist_ok=True)
        screen = folder / f"readme-{name}.png"
        page.screenshot(path=str(screen))  # the README shows the first screen only
        try:
            from PIL import Image

            Image.open(screen).convert("RGB").quantize(colors=96).save(DOCS / f"{name}.png", optimize=True)
        except ImportError:
            (DOCS / f"{name}.png").write_bytes(screen.read_bytes())


def sign_in(page: Page, url: str, user: str, path: str = "") -> None:
    page.goto(f"{url}/{path}")
    page.get_by_label("Username").fill(user)
    page.get_by_label("Password", exact=True).fill(PASSWORDS[user])
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_text(f"Signed in as {user}")).to_be_visible(timeout=WAIT)


def go(page: Page, title: str) -> None:
    page.get_by_test_id("stSidebarNav").get_by_text(title, exact=True).click()
    expect(page.get_by_role("heading", name=re.compile(f"^{title}"), level=1)).to_be_visible(timeout=WAIT)


def verify_and_export(page: Page, folder: Path) -> Path:
    """On the Audit page: Verify the coordinator's log (OK shown), Export, download the bundle and
    check it with the same verifier as `coordinator audit verify`."""
    go(page, "Audit")
    page.get_by_role("button", name="Verify").click()
    expect(page.get_by_text(re.compile(r"coordinator \(audit.jsonl\): OK, \d+ entries, chain intact"))).to_be_visible(
        timeout=WAIT)
    page.get_by_role("button", name="Export bundle").click()
    download_button = page.get_by_role("button", name=re.compile("^Download audit-export-coordinator-"))
    expect(download_button).to_be_visible(timeout=WAIT)
    with page.expect_download() as info:
        download_button.click()
    bundle = folder / info.value.suggested_filename
    info.value.save_as(bundle)
    assert zipfile.is_zipfile(bundle) and verify_bundle(bundle).ok
    return bundle


def test_lead_sees_the_charts_and_creates_from_a_template(server: tuple[str, Path], page: Page,
                                                          tmp_path: Path) -> None:
    """On a made-up mid-study state (several rounds, so the README's two screenshots say something);
    approving and the audit trail are the real-federation test's job."""
    url, state = server
    sign_in(page, url, "lead")
    expect(page.get_by_text("role: lead")).to_be_visible()
    expect(page.get_by_text("Publish as new version")).to_be_visible(timeout=WAIT)
    shot(page, tmp_path / "screenshots", "studies", docs=True)

    go(page, "Evaluations")
    expect(page.get_by_test_id("stVegaLiteChart").first).to_be_visible(timeout=WAIT)
    expect(page.get_by_text("Reference lines from bench/results/accuracy_heart.json")).to_be_visible()
    shot(page, tmp_path / "screenshots", "evaluations", docs=True)

    go(page, "Studies")
    page.get_by_label("Study id (optional; default: the policy's id)").fill("heart-trial-2")
    page.get_by_role("button", name="Create from template").click()
    expect(page.get_by_text("Created heart-trial-2 v1 (draft)")).to_be_visible(timeout=WAIT)
    expect(page.get_by_role("combobox", name="Study")).to_have_value("heart-trial-2 v1")  # selected for you
    page.get_by_role("button", name="Open for enrolment").click()
    expect(page.get_by_text("heart-trial-2 v1: draft → open")).to_be_visible(timeout=WAIT)
    shot(page, tmp_path / "screenshots", "study-created")

    actions = [(e.action, e.actor) for e in users.coordinator_log(state).entries()]
    for expected in [("user.login", "lead"), ("study.created", "lead"), ("study.status_changed", "lead")]:
        assert expected in actions

    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_role("button", name="Sign in")).to_be_visible(timeout=WAIT)


def test_auditor_reads_but_cannot_decide(server: tuple[str, Path], page: Page, tmp_path: Path) -> None:
    url, _ = server
    sign_in(page, url, "aud")
    expect(page.get_by_test_id("stSidebarNav").get_by_text("Users", exact=True)).to_have_count(0)
    go(page, "Rounds")
    expect(page.get_by_text("Your role (auditor) may read but not decide rounds.")).to_be_visible(timeout=WAIT)
    expect(page.get_by_role("button", name="Approve")).to_be_disabled()
    shot(page, tmp_path / "screenshots", "rounds-auditor")


def test_users_page_is_not_reachable_by_url_for_a_lead(server: tuple[str, Path], page: Page) -> None:
    url, _ = server
    sign_in(page, url, "lead", path="users")
    expect(page.get_by_role("heading", name="Studies", level=1)).to_be_visible(timeout=WAIT)
    expect(page.get_by_role("button", name="Add user")).to_have_count(0)
    expect(page.get_by_test_id("stSidebarNav").get_by_text("Users", exact=True)).to_have_count(0)


def test_admin_sees_users_and_wrong_password_fails(server: tuple[str, Path], page: Page, tmp_path: Path) -> None:
    url, _ = server
    page.goto(url)
    page.get_by_label("Username").fill("root")
    page.get_by_label("Password", exact=True).fill("not the password")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_text("Sign-in failed")).to_be_visible(timeout=WAIT)
    sign_in(page, url, "root")
    go(page, "Users")
    expect(page.get_by_role("button", name="Add user")).to_be_visible()
    shot(page, tmp_path / "screenshots", "users-admin")


# ----------------------------------------------------------------------------- a real federation waits on the lead


def _manual_study(path: Path) -> Path:
    """The shipped heart study, 1 round, approval manual; plaintext and non-private so it runs in
    seconds on 2 cores (the CKKS + DP path is the integration tests' job, not the UI's)."""
    data = load_study(shipped_study()).model_dump(mode="json")
    data.update(privacy="none", encryption="none", approval={"mode": "manual", "auto_rounds": 0})
    data["training"]["rounds"] = 1
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture()
def federation(tmp_path: Path) -> Iterator[tuple[str, Path, Path, LocalFederation]]:
    """A fresh coordinator state with one lead account, the UI over it, and a real SuperLink with
    three `silo-node start` silos on 127.0.0.1 (connected, idle until a run is submitted)."""
    state = tmp_path / "state"
    study = _manual_study(tmp_path / "manual.yaml")
    with open_store(None, state) as store:
        users.add_user(store, "lead", "lead", PASSWORDS["lead"])
    cohorts = sample_cohorts()
    with local_federation(tmp_path / "runtime") as fed, serve(state) as url:
        fed.start_superlink()
        silos = [fed.start_silo(SiloSpec(name, cohorts[name], study, state / "silos" / name)) for name in FEDERATED_SILOS]
        deadline = time.monotonic() + FEDERATION_WAIT / 1000
        while not all("SuperNode ID" in p.log.read_text(errors="replace") for p in silos):  # connected: the
            assert time.monotonic() < deadline and all(p.alive() for p in silos), "silos did not connect"  # start-up
            time.sleep(0.5)  # load (torch, cohort validation) is over before the browser steps begin
        yield url, state, study, fed


FEDERATED_SILOS = ("cleveland", "hungary", "switzerland")


def test_lead_approves_a_round_a_real_federation_waits_on(federation, page: Page, tmp_path: Path) -> None:
    """Sign in; a 50 MB upload is refused; upload, create and open the study; the ServerApp waits
    at the approval gate; the Rounds page offers the round by itself; approve; the round runs
    on the real silos and its metrics appear without a reload; Silos and Evaluations show it;
    verify and export the audit trail; sign out. A screenshot of every page under tmp_path."""
    url, state, study_path, fed = federation
    shots = tmp_path / "screenshots"
    sign_in(page, url, "lead")
    expect(page.get_by_text("No studies yet.").first).to_be_visible(timeout=WAIT)

    # Streamlit's own cap (1 MB, set by `coordinator ui`) refuses a 50 MB file in the browser.
    before = store_snapshot(state)
    huge = tmp_path / "huge.yaml"
    with huge.open("wb") as f:
        f.truncate(50 * 1024 * 1024)
    page.get_by_role("tab", name="Upload a policy (YAML)").click()
    uploader = page.get_by_test_id("stFileUploaderDropzoneInput")
    uploader.set_input_files(str(huge))
    page.get_by_text("huge.yaml").hover()
    expect(page.get_by_text("File must be 1.0MB or smaller.", exact=True)).to_be_visible(timeout=WAIT)
    expect(page.get_by_role("button", name="Create from upload")).to_be_disabled()
    shot(page, shots, "studies-upload-too-large")
    assert store_snapshot(state) == before, "a refused upload writes nothing"

    # The real policy: uploaded, created as a draft, opened for enrolment.
    uploader.set_input_files(str(study_path))
    expect(page.get_by_text("Valid policy: heart-disease v1")).to_be_visible(timeout=WAIT)
    page.get_by_role("button", name="Create from upload").click()
    expect(page.get_by_text("Created heart-disease v1 (draft)")).to_be_visible(timeout=WAIT)
    page.get_by_role("button", name="Open for enrolment").click()
    expect(page.get_by_text("heart-disease v1: draft → open")).to_be_visible(timeout=WAIT)
    shot(page, shots, "studies")
    policy_hash = load_study(study_path).policy_hash()
    with open_store(None, state) as store:
        assert store.get_study("heart-disease").policy_hash == policy_hash

    # The federation runs the study the lead opened; its gate waits for round 1.
    go(page, "Rounds")
    expect(page.get_by_text("Round 1 of 1 may be decided ahead")).to_be_visible(timeout=WAIT)
    fed.submit({"study-path": str(study_path), "state-dir": str(state), "expected-silos": len(FEDERATED_SILOS)})
    expect(page.get_by_text(re.compile(r"^Round 1 of 1 waits for a decision: the coordinator holds it"))).to_be_visible(
        timeout=FEDERATION_WAIT)  # the page noticed by itself: no reload, no click
    expect(page.get_by_text("Coordinator: round 1 waiting for approval")).to_be_visible(timeout=WAIT)
    with open_store(None, state) as store:
        assert store.get_round("heart-disease", 1).status == "waiting_approval"
        assert store.get_study("heart-disease").status == "running"
    shot(page, shots, "rounds-waiting")
    page.get_by_label("Note (kept in the store with the decision)").fill("statistics round fine, go")
    page.get_by_role("button", name="Approve").click()
    expect(page.get_by_text("Round 1: approve recorded by lead")).to_be_visible(timeout=WAIT)

    # The live view refreshes by itself: the run completes and the pooled metrics appear.
    expect(page.get_by_text("Coordinator: completed")).to_be_visible(timeout=FEDERATION_WAIT)
    with open_store(None, state) as store:
        rnd = store.get_round("heart-disease", 1)
        assert rnd.status == "finished" and sorted(rnd.replied) == sorted(FEDERATED_SILOS)
        pooled = {e.round_no: e.metrics for e in store.list_evaluations("heart-disease") if e.scope == "pooled"}
        assert store.approval_for("heart-disease", 1).note == "statistics round fine, go"
    final = pooled[max(pooled)]
    metric = page.get_by_test_id("stMetric").filter(has_text="accuracy").first
    expect(metric).to_contain_text(f"{final['accuracy']:.3f}", timeout=WAIT)
    expect(page.get_by_text(f"model after {max(pooled)} round(s), {int(final['n'])} test rows").first).to_be_visible()
    shot(page, shots, "rounds-finished")

    go(page, "Silos")
    expect(page.get_by_role("heading", name="Enrolments and validation")).to_be_visible(timeout=WAIT)
    shot(page, shots, "silos")
    go(page, "Evaluations")
    expect(page.get_by_test_id("stVegaLiteChart").first).to_be_visible(timeout=WAIT)
    expect(page.get_by_role("button", name="Download table (CSV)")).to_be_visible()
    shot(page, shots, "evaluations")

    verify_and_export(page, tmp_path)
    shot(page, shots, "audit")
    entries = list(users.coordinator_log(state).entries())
    done = [(e.action, e.actor) for e in entries]
    for expected in [("user.login", "lead"), ("study.created", "lead"), ("study.status_changed", "lead"),
                     ("round.approved", "lead"), ("round.finished", "coordinator"), ("study.completed", "coordinator"),
                     ("audit.exported", "lead")]:
        assert expected in done, expected
    assert done.index(("round.approved", "lead")) < done.index(("round.finished", "coordinator"))

    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_role("button", name="Sign in")).to_be_visible(timeout=WAIT)
    assert {p.name for p in shots.glob("ui-*.png")} >= {f"ui-{n}.png" for n in (
        "studies", "rounds-waiting", "rounds-finished", "silos", "evaluations", "audit")}
