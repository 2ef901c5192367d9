"""The silo's app launcher: only FABs on the silo's allow-list get an answer, and only from
the installed ClientApp; an unknown FAB is refused before any of its code runs."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from policies.audit import AUDIT_FILE
from policies.study import load_study, shipped_study

ROOT = Path(__file__).resolve().parent.parent
APP_DIR = ROOT / "coordinator" / "flower_app"


def _silo_node(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "silo_node.cli", *args], capture_output=True, text=True, timeout=120)


def _audit(state_dir: Path) -> list[dict]:
    path = state_dir / AUDIT_FILE
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# ---------------------------------------------------------------- flwr internals, allow-list


def test_app_launcher_internals_still_there():
    """Fails when flwr moves what the launcher relies on (pull/push helpers, Runtime API, isolation)."""
    from silo_node.app_launcher import check_internals

    check_internals()


def test_installed_app_hash_is_the_fab_flwr_run_sends():
    """The allowed hash is the sha256 of the FAB `flwr run coordinator/flower_app` builds."""
    from flwr.cli.build import build_fab_from_disk

    from silo_node.app_allowlist import installed_fab_sha256

    assert installed_fab_sha256() == hashlib.sha256(build_fab_from_disk(APP_DIR)).hexdigest()


def test_a_changed_app_has_another_hash(tmp_path):
    from silo_node.app_allowlist import build_fab, fab_sha256, installed_fab_sha256

    changed = _copy_app(tmp_path / "app", extra={"helper.py": "X = 1\n"})
    assert fab_sha256(build_fab(changed)) != installed_fab_sha256()


def test_apps_allow_list_and_revoke_are_audited(tmp_path):
    from silo_node.app_allowlist import installed_fab_sha256, is_allowed

    state = tmp_path / "silo"
    digest = hashlib.sha256(b"a reviewed release").hexdigest()
    listed = _silo_node("apps", "list", "--state-dir", str(state))
    assert listed.returncode == 0 and listed.stdout.split() == [installed_fab_sha256(), "installed", "fedcohort"]
    assert not is_allowed(state, digest)

    done = _silo_node("apps", "allow", digest.upper(), "--state-dir", str(state), "--by", "it-bob", "--note", "v0.2")
    assert done.returncode == 0, done.stderr
    assert is_allowed(state, digest)
    assert digest in _silo_node("apps", "list", "--state-dir", str(state)).stdout
    again = _silo_node("apps", "allow", digest, "--state-dir", str(state))
    assert "nothing changed" in again.stdout
    assert [(e["action"], e["actor"], e["details"]["fab_sha256"]) for e in _audit(state)] == [
        ("app.allowed", "it-bob", digest)]

    assert _silo_node("apps", "revoke", digest, "--state-dir", str(state)).returncode == 0
    assert not is_allowed(state, digest)
    assert [e["action"] for e in _audit(state)] == ["app.allowed", "app.revoked"]


def test_a_bad_hash_or_the_installed_app_is_refused_and_nothing_changes(tmp_path):
    from silo_node.app_allowlist import installed_fab_sha256

    state = tmp_path / "silo"
    bad = _silo_node("apps", "allow", "abc123", "--state-dir", str(state))
    assert bad.returncode == 2 and "'abc123' is not a sha256 (64 hex digits)" in bad.stderr
    gone = _silo_node("apps", "revoke", installed_fab_sha256(), "--state-dir", str(state))
    assert gone.returncode == 2 and "always allowed" in gone.stderr
    assert not (state / "apps").exists() and _audit(state) == []


def test_a_corrupt_allow_list_is_named(tmp_path):
    from policies.errors import PolicyError
    from silo_node.app_allowlist import ALLOWLIST_FILE, is_allowed

    path = tmp_path / ALLOWLIST_FILE
    path.parent.mkdir(parents=True)
    path.write_text('{"not-a-hash": {}}')
    with pytest.raises(PolicyError, match="allowed.json: not a mapping of sha256"):
        is_allowed(tmp_path, "0" * 64)


def test_supernode_arguments_keep_the_clientapp_with_the_launcher():
    from silo_node.supernode_launcher import guarded_args

    args = guarded_args(["--superlink", "127.0.0.1:1", "--port", "9100"])
    assert args[-4:] == ["--isolation", "process", "--host", "127.0.0.1"]
    with pytest.raises(SystemExit, match="isolation process"):
        guarded_args(["--isolation", "subprocess"])
    with pytest.raises(SystemExit, match="127.0.0.1"):
        guarded_args(["--host=0.0.0.0"])


# ---------------------------------------------------------------- one task, in process


def _task(fab_bytes: bytes, state_dir: Path):
    """A ClientApp task's input as the launcher pulls it: message, context, run, FAB."""
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.fab import Fab
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity

    from policies import messages as m

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, 5
    req = m.Request(study_id="heart-disease", policy_hash="0" * 64, round=0, nonce=m.new_nonce())
    msg = Message(RecordDict({m.HEADER: ConfigRecord(req.model_dump())}), 5, m.ENROL)
    msg.metadata.__dict__["_message_id"] = msg.object_id
    context = Context(run_id=7, node_id=5, node_config={"state-dir": str(state_dir), "silo-name": "va"},
                      state=RecordDict(), run_config={})
    run = Run.create_empty(7)
    return msg, context, run, Fab(hashlib.sha256(fab_bytes).hexdigest(), fab_bytes, {})


def test_an_unknown_fab_gets_an_error_reply_and_an_audit_entry(tmp_path):
    from silo_node.app_launcher import _answer

    fab = b"PK\x03\x04 a FAB this silo never saw"
    reply, status, details = _answer(tmp_path, "va", *_task(fab, tmp_path))
    digest = hashlib.sha256(fab).hexdigest()
    assert reply.has_error() and reply.error.code == 7  # Flower's INVALID_FAB
    assert f"FAB sha256 {digest} is not on this silo's allow-list" in reply.error.reason
    assert status == "failed" and details == reply.error.reason
    [entry] = _audit(tmp_path)
    assert (entry["action"], entry["subject"], entry["details"]["fab_sha256"]) == ("app.refused", "run-7", digest)
    assert entry["details"]["message_type"] == "query.enrol"


def test_an_unreadable_allow_list_allows_nothing(tmp_path):
    from silo_node.app_allowlist import ALLOWLIST_FILE, installed_fab_sha256
    from silo_node.app_launcher import _answer

    (tmp_path / ALLOWLIST_FILE).parent.mkdir(parents=True)
    (tmp_path / ALLOWLIST_FILE).write_text("{ torn")
    fab = b"another FAB"
    reply, status, _ = _answer(tmp_path, "va", *_task(fab, tmp_path))
    assert reply.has_error() and "cannot be checked" in reply.error.reason and "allowed.json" in reply.error.reason
    assert [e["action"] for e in _audit(tmp_path)] == ["app.refused"]
    assert installed_fab_sha256() not in reply.error.reason


def test_an_allowed_fab_is_answered_by_the_installed_clientapp(tmp_path):
    """Allowed by silo IT: the installed ClientApp answers (here: the silo service is not running,
    which only the installed relay says); nothing is logged as refused."""
    from silo_node.app_allowlist import allow
    from silo_node.app_launcher import _answer

    fab = b"a FAB silo IT reviewed"
    allow(tmp_path, hashlib.sha256(fab).hexdigest(), "it-bob")
    reply, status, _ = _answer(tmp_path, "va", *_task(fab, tmp_path))
    assert not reply.has_error() and status == "completed"
    from policies import messages as m

    header = dict(reply.content.config_records[m.HEADER])
    assert header["status"] == "refused" and "silo service is not running" in header["reason"]
    assert _audit(tmp_path) == []


# ---------------------------------------------------------------- real SuperLink and SuperNodes


def _copy_app(dest: Path, *, components: dict[str, str] | None = None, extra: dict[str, str] | None = None) -> Path:
    """A copy of the coordinator's app folder, with other components and/or extra files."""
    dest.mkdir(parents=True)
    text = (APP_DIR / "pyproject.toml").read_text()
    for key, ref in (components or {}).items():
        old = next(line for line in text.splitlines() if line.startswith(f"{key} = "))
        text = text.replace(old, f'{key} = "{ref}"')
    (dest / "pyproject.toml").write_text(text)
    for name, body in (extra or {}).items():
        (dest / name).write_text(body)
    return dest


_EVIL_CLIENT = '''
from pathlib import Path
MARKER = Path({marker!r})
MARKER.write_text("the FAB's ClientApp module was imported at a silo")
from flwr.clientapp import ClientApp
app = ClientApp()

@app.query()
def query(msg, context):
    MARKER.write_text("the FAB's ClientApp ran at a silo")
    raise SystemExit(0)
'''

_EVIL_SERVER = '''
import json, time
from pathlib import Path
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp
app = ServerApp()

@app.main()
def main(grid: Grid, context: Context) -> None:
    deadline = time.monotonic() + 240
    nodes = []
    while time.monotonic() < deadline and len(nodes) < {silos}:
        nodes = list(grid.get_node_ids())
        time.sleep(0.5)
    msgs = [Message(RecordDict({{"q": ConfigRecord({{"x": 1}})}}), node, "query") for node in nodes]
    replies = list(grid.send_and_receive(msgs, timeout=240))
    Path({result!r}).write_text(json.dumps([
        {{"node": r.metadata.src_node_id, "error": r.error.reason if r.has_error() else None}} for r in replies]))
'''


def _wait_for(path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not path.exists():
        time.sleep(0.5)


@pytest.fixture(scope="module")
def guarded_federation(tmp_path_factory):
    """Three silos started by `silo-node start` (the launcher in front) on a real SuperLink; first a
    FAB with its own ClientApp and an extra module, then the real one-round study."""
    from coordinator.demo import follow_run, sample_cohorts
    from coordinator.runtime import SiloSpec, _tool, flower_env, local_federation
    from silo_node.app_allowlist import build_fab, fab_sha256

    tmp = tmp_path_factory.mktemp("guarded")
    data = load_study(shipped_study()).model_dump(mode="json")
    data.update(privacy="none", encryption="none")
    data["training"]["rounds"] = 1
    study = tmp / "study.yaml"
    study.write_text(yaml.safe_dump(data, sort_keys=False))
    marker, result = tmp / "evil-ran", tmp / "evil-replies.json"
    names = ("cleveland", "hungary", "switzerland")
    evil = _copy_app(tmp / "evil" / "fedcohort_study", components={
        "serverapp": "evil_server:app", "clientapp": "evil_client:app"}, extra={
        "evil_client.py": _EVIL_CLIENT.format(marker=str(marker)),
        "evil_server.py": _EVIL_SERVER.format(silos=len(names), result=str(result)),
    })
    cohorts = sample_cohorts()
    with local_federation(tmp / "runtime") as fed:
        fed.start_superlink()
        for name in names:
            fed.start_silo(SiloSpec(name, cohorts[name], study, tmp / "silos" / name))
        out = subprocess.run([_tool("flwr"), "run", str(evil), "local", "--format", "json"],
                             env=flower_env(fed.flwr_home), cwd=fed.work_dir, capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, out.stderr + out.stdout
        _wait_for(result, 400)
        run_id = fed.submit({"study-path": str(study), "state-dir": str(tmp), "expected-silos": len(names)})
        summary = follow_run(fed, run_id, tmp / "coordinator" / "summary.json", time.time() + 600, None)
        logs = {p.name: p.log.read_text(errors="replace") for p in fed.processes}
    yield {"tmp": tmp, "names": names, "marker": marker, "result": result, "summary": summary, "logs": logs,
           "evil_sha256": fab_sha256(build_fab(evil))}


@pytest.mark.slow
@pytest.mark.timeout(1500)  # the shared fixture starts three silos and runs two apps
def test_unknown_fab_is_refused_by_every_silo_before_its_code_runs(guarded_federation):
    g = guarded_federation
    assert g["result"].exists(), "the FAB's ServerApp never got its replies; logs:\n" + "\n".join(
        text[-1500:] for text in g["logs"].values())
    replies = json.loads(g["result"].read_text())
    assert len(replies) == len(g["names"])
    for reply in replies:
        assert reply["error"] and f"FAB sha256 {g['evil_sha256']} is not on this silo's allow-list" in reply["error"]
    assert not g["marker"].exists(), g["marker"].read_text()
    for name in g["names"]:
        refused = [e for e in _audit(g["tmp"] / "silos" / name) if e["action"] == "app.refused"]
        assert [e["details"]["fab_sha256"] for e in refused] == [g["evil_sha256"]], name
        assert refused[0]["details"]["message_type"] == "query" and refused[0]["actor"] == name


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_the_real_study_completes_with_the_launcher_in_front(guarded_federation):
    g = guarded_federation
    assert g["summary"]["status"] == "completed", json.dumps(g["summary"])[:2000]
    for name in g["names"]:
        actions = [e["action"] for e in _audit(g["tmp"] / "silos" / name)]
        assert "train.replied" in actions and actions.count("app.refused") == 1, (name, actions)
        assert "app launcher for silo" in g["logs"][f"silo-{name}"]


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_control_a_stock_supernode_runs_the_fab_code(tmp_path):
    """Without the launcher (stock `flower-supernode`, subprocess isolation) the same FAB's code
    does run at the node: the marker the tests above check for is a real signal."""
    from coordinator.runtime import _tool, flower_env, free_port, local_federation

    marker, result = tmp_path / "evil-ran", tmp_path / "evil-replies.json"
    evil = _copy_app(tmp_path / "evil" / "fedcohort_study", components={
        "serverapp": "evil_server:app", "clientapp": "evil_client:app"}, extra={
        "evil_client.py": _EVIL_CLIENT.format(marker=str(marker)),
        "evil_server.py": _EVIL_SERVER.format(silos=1, result=str(result)),
    })
    with local_federation(tmp_path / "runtime") as fed:
        fed.start_superlink()
        fed._spawn("stock-node", [_tool("flower-supernode"), "--insecure", "--superlink", fed.address,
                                  "--port", str(free_port())])
        out = subprocess.run([_tool("flwr"), "run", str(evil), "local", "--format", "json"],
                             env=flower_env(fed.flwr_home), cwd=fed.work_dir, capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, out.stderr + out.stdout
        _wait_for(result, 400)
    assert marker.exists() and "ran at a silo" in marker.read_text()
