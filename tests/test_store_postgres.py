"""The coordinator store against a real PostgreSQL server on 127.0.0.1, started by this test.

Why a real server: SQLite forgives things PostgreSQL does not (signed BIGINT, reserved
words, JSON and bytea handling, row locks, concurrent migrations). The server comes from
Debian's `postgresql` package (binaries under /usr/lib/postgresql/*/bin); the test is
skipped only when those binaries are absent. PostgreSQL refuses to run as root, so as
root initdb/pg_ctl run as the `postgres` user through `runuser`.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import create_engine, inspect, text

from coordinator.lifecycle import transition
from coordinator.store import TABLES, VERSION_TABLE, Store, open_store
from policies.errors import PolicyError
from policies.study import shipped_study

ROOT = Path(__file__).resolve().parent.parent
U64_MAX = 18446744073709551615
PG_USER, PG_PASSWORD = "fedcohort", "test-only-password"


def _pg_bin() -> Path | None:
    """The newest Debian PostgreSQL bin dir that has initdb and pg_ctl, if any."""
    found = [Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin")
             if (Path(p) / "initdb").exists() and (Path(p) / "pg_ctl").exists()]
    return max(found, key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0, default=None)


PG_BIN = _pg_bin()
pytestmark = pytest.mark.skipif(
    PG_BIN is None, reason="PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin "
                           "(apt-get install -y postgresql)")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PgServer:
    """A throwaway cluster in its own temp dir; `as_owner` runs its tools as a non-root user."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="fedcohort-pg-"))  # not under pytest's 0700 root-only dirs
        self.data, self.log = self.root / "data", self.root / "server.log"
        self.as_owner: list[str] = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        self.port = 0

    def _run(self, *args: str) -> None:
        proc = subprocess.run([*self.as_owner, *args], capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            log = self.log.read_text() if self.log.exists() else ""
            raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}\n{log}")

    def start(self) -> None:
        pwfile = self.root / "pwfile"
        pwfile.write_text(PG_PASSWORD + "\n")
        if self.as_owner:
            shutil.chown(self.root, "postgres", "postgres")
            shutil.chown(pwfile, "postgres", "postgres")
        self._run(str(self.bindir / "initdb"), "-D", str(self.data), "-U", PG_USER, f"--pwfile={pwfile}",
                  "--auth=scram-sha-256", "-E", "UTF8", "--no-locale")
        for attempt in range(3):  # a free port can be taken between probe and bind
            self.port = _free_port()
            opts = f"-k {self.root} -h 127.0.0.1 -p {self.port} -c fsync=off -c max_connections=40"
            try:
                self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log),
                          "-w", "-t", "60", "-o", opts, "start")
                return
            except RuntimeError:
                if attempt == 2:
                    raise

    def stop(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{PG_USER}:{PG_PASSWORD}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        engine = create_engine(self.url(), isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                conn.execute(text(f'CREATE DATABASE "{name}"'))
        finally:
            engine.dispose()
        return self.url(name).replace("+psycopg", "")  # a plain URL, as a person would type it


@pytest.fixture(scope="module")
def pg() -> Iterator[PgServer]:
    assert PG_BIN is not None
    server = PgServer(PG_BIN)
    try:
        server.start()
        yield server
    finally:
        server.stop()


_counter = iter(range(1_000_000))


@pytest.fixture()
def db_url(pg: PgServer) -> str:
    """A fresh, empty database per test, so tests never see each other's rows."""
    return pg.create_database(f"store_{next(_counter)}")


@pytest.fixture()
def store(db_url: str, tmp_path: Path) -> Iterator[Store]:
    st = open_store(db_url, tmp_path)
    yield st
    st.close()


def policy(*, version: int = 1, mode: str = "manual", auto_rounds: int = 0, rounds: int = 4) -> str:
    data: dict[str, Any] = yaml.safe_load(shipped_study("heart_disease").read_text(encoding="utf-8"))
    data.update(version=version, min_silos=3)
    data["training"]["rounds"] = rounds
    data["approval"] = {"mode": mode, "auto_rounds": auto_rounds}
    return yaml.safe_dump(data, sort_keys=False)


def test_migrations_create_every_table(store: Store) -> None:
    assert set(inspect(store.engine).get_table_names()) == set(TABLES) | {VERSION_TABLE}
    assert store.engine.dialect.name == "postgresql"
    with store.engine.connect() as conn:
        kind = conn.execute(text("SELECT data_type FROM information_schema.columns "
                                 "WHERE table_name = 'rounds' AND column_name = 'flower_run_id'")).scalar()
    assert kind == "text"


def test_core_round_trip(store: Store, db_url: str, tmp_path: Path) -> None:
    """Create, version, open, enrol, run, approve, record rounds and results: the ServerApp's path."""
    v1 = store.create_study(policy(), "lead")
    v2 = store.new_version(v1.id, policy(version=2, mode="auto", auto_rounds=2), "lead")
    assert v2.policy_hash != v1.policy_hash and store.get_study(v1.id).version == 2
    transition(store, v1.id, "stopped", "lead", "superseded", version=1)
    transition(store, v1.id, "open", "lead")
    store.register_silo("cleveland", "sha256:aa", node_id=U64_MAX)
    for silo in ("cleveland", "hungary", "va"):
        store.record_enrolment(v1.id, silo, "validated", {"ok": True, "rows": 120})
    transition(store, v1.id, "running", "lead")

    assert store.is_round_approved(v1.id, 2) and not store.is_round_approved(v1.id, 3)
    with pytest.raises(TimeoutError):
        store.wait_for_approval(v1.id, 3, poll=0.01, timeout=0.05)
    with open_store(db_url, tmp_path) as ui:  # a second "process"
        ui.record_approval(v1.id, 3, "approve", "alice", "ok")
    assert store.wait_for_approval(v1.id, 3, poll=0.01, timeout=5) == "approve"
    assert store.approval_for(v1.id, 3).policy_hash == v2.policy_hash

    store.record_round_start(v1.id, 3, ["cleveland", "hungary", "va"], flower_run_id=U64_MAX)
    done = store.record_round_finish(v1.id, 3, ["cleveland", "hungary"], {"va": "privacy budget exhausted"})
    assert (done.flower_run_id, done.refused) == (U64_MAX, {"va": "privacy budget exhausted"})
    assert store.get_silo("cleveland").flower_node_id == U64_MAX
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT flower_run_id FROM rounds WHERE round_no = 3")).scalar() == str(U64_MAX)

    store.record_evaluation(v1.id, 3, "pooled", {"accuracy": 0.8, "auroc": float("nan")})
    assert store.list_evaluations(v1.id)[0].metrics == {"accuracy": 0.8, "auroc": None}
    store.record_privacy_spend(v1.id, "va", 3, 2.9, 3.0, rounds_left=0)
    blob = bytes(range(256)) * 4096
    store.save_checkpoint(v1.id, 3, blob, ["cleveland", "hungary"])
    assert store.load_last_checkpoint(v1.id).encrypted_state == blob
    store.add_user("alice", "lead", "scrypt$x")
    assert store.get_user("alice").role == "lead"
    store.append_audit_mirror({"seq": 1, "prev_hash": "0" * 64, "hash": "a" * 64, "action": "study.created",
                               "actor": "lead", "details": {"run": U64_MAX}})
    assert store.audit_head().entry["details"]["run"] == U64_MAX
    transition(store, v1.id, "completed", "lead")
    with pytest.raises(PolicyError, match="^study heart-disease v2 is completed; it cannot be reopened$"):
        transition(store, v1.id, "open", "lead")


def test_two_processes_migrating_a_fresh_database_at_once(db_url: str, tmp_path: Path) -> None:
    """The advisory lock makes later migrations wait, then find the schema already at head."""
    script = "import sys; from pathlib import Path; from coordinator.store import open_store; " \
             "open_store(sys.argv[1], Path(sys.argv[2])).close()"
    procs = [subprocess.Popen([sys.executable, "-c", script, db_url, str(tmp_path)], cwd=ROOT,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    errs = [p.communicate(timeout=120)[1] for p in procs]
    failures = [err for p, err in zip(procs, errs) if p.returncode != 0]
    assert not failures, failures
    with open_store(db_url, tmp_path) as st:
        st.create_study(policy(), "lead")
        assert st.get_study("heart-disease").status == "draft"
        with st.engine.connect() as conn:
            assert conn.execute(text(f"SELECT count(*) FROM {VERSION_TABLE}")).scalar() == 1


def test_status_changes_lock_their_row(store: Store, db_url: str, tmp_path: Path) -> None:
    """Two leads completing and stopping at once: exactly one wins, the other is told why."""
    sid = store.create_study(policy(), "lead").id
    transition(store, sid, "open", "lead")
    for silo in ("cleveland", "hungary", "va"):
        store.record_enrolment(sid, silo, "validated", {"ok": True})
    transition(store, sid, "running", "lead")
    others = [open_store(db_url, tmp_path) for _ in range(2)]
    outcomes: list[str] = []
    barrier = threading.Barrier(2)

    def end(st: Store, to: str) -> None:
        barrier.wait()
        try:
            transition(st, sid, to, "lead", "race")
            outcomes.append(to)
        except PolicyError as exc:
            outcomes.append(f"refused: {exc}")

    threads = [threading.Thread(target=end, args=(st, to)) for st, to in zip(others, ("completed", "stopped"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for st in others:
        st.close()
    won = [o for o in outcomes if not o.startswith("refused")]
    assert len(won) == 1 and len(outcomes) == 2
    assert store.get_study(sid).status == won[0]
