"""Bad input, part 3 over real processes: a silo that answers with garbage (slow).

A real SuperLink, three real `silo-node start` silos, and a fourth SuperNode whose
ClientApp relays (unchanged, over the real Unix socket) to a silo service this test
plays: it answers every request with something broken (wrong sizes, bytes instead of a
plaintext vector, a replay of its earlier reply, a header with fields missing, an
oversized report, another silo's name). The coordinator must drop every one of its
replies with a logged reason, and the study must complete on the three good silos.
No hook in the product: the rogue is simply whatever listens on that silo's socket.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import threading
import time
from multiprocessing.connection import Listener
from pathlib import Path

import numpy as np
import pytest
import yaml

from coordinator.demo import read_summary, sample_cohorts
from coordinator.runtime import SiloSpec, free_port, local_federation
from policies import messages as m
from policies.study import load_study, shipped_study

pytestmark = pytest.mark.slow
GOOD = ("cleveland", "hungary", "va")


def _study(tmp_path: Path) -> Path:
    data = load_study(shipped_study()).model_dump(mode="json")
    data["encryption"], data["privacy"] = "none", "none"
    data["training"]["rounds"], data["training"]["local_steps"] = 2, 10
    data["approval"]["auto_rounds"] = 2
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _wait_for_end(summary_path: Path, fed, deadline: float) -> dict:
    """The ServerApp's summary once the study ended (read from its file only: on a loaded
    machine `flwr ls` itself can take more than a minute)."""
    while time.time() < deadline:
        summary = read_summary(summary_path) or {}
        if summary.get("status") in ("completed", "stopped"):
            return summary
        assert fed.processes[0].alive(), "the SuperLink exited"
        time.sleep(1.0)
    pytest.fail(f"the study did not end in time; last status {summary.get('status')!r}")


class RogueService:
    """Listens where a silo's service would and answers each request with a different breakage."""

    def __init__(self, state: Path):
        state.mkdir(parents=True, exist_ok=True)
        key = secrets.token_hex(32)
        fd = os.open(state / "silo.key", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(key)
        self.listener = Listener(str(state / "silo.sock"), family="AF_UNIX", authkey=key.encode())
        self.seen: list[str] = []
        self.first_train: tuple[dict, dict] | None = None
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                with self.listener.accept() as conn:
                    kind, header, arrays = conn.recv()
                    self.seen.append(kind)
                    conn.send(self.answer(kind, header))
            except (OSError, EOFError):
                return

    def _header(self, header: dict, **changes) -> dict:
        req = m.Request.model_validate(header)
        return m.Reply(study_id=req.study_id, policy_hash=req.policy_hash, round=req.round, nonce=req.nonce,
                       silo="rogue", status="ok").model_dump() | changes

    def answer(self, kind: str, header: dict) -> tuple[dict, dict]:
        if kind == m.STATS:  # moments of the wrong length
            return self._header(header), {m.MOMENTS: np.full(3, 1e6)}
        if kind == m.TRAIN and self.first_train is None:  # bytes where a plaintext vector belongs, in another's name
            self.first_train = (self._header(header, silo="cleveland"),
                                {m.UPDATE: np.frombuffer(os.urandom(64), dtype=np.uint8), m.EVAL: np.zeros(3)})
            return self.first_train
        if kind == m.TRAIN:  # its earlier reply, replayed
            return self.first_train
        if kind == m.EVALUATE:  # header fields missing
            return {k: v for k, v in self._header(header).items() if k not in ("nonce", "policy_hash")}, {}
        if kind == m.REVEAL:  # an oversized report
            return self._header(header, report=json.dumps({"x": "y" * (m.MAX_REPORT_CHARS + 10)})), {}
        return self._header(header, report="not json"), {}

    def close(self) -> None:
        self.listener.close()


def test_a_garbage_silo_is_dropped_and_the_study_completes(tmp_path):
    study = _study(tmp_path)
    state = tmp_path / "state"
    cohorts = sample_cohorts()
    rogue = RogueService(state / "silos" / "rogue")
    summary_path = state / "coordinator" / "summary.json"
    try:
        with local_federation(tmp_path / "runtime") as fed:
            fed.start_superlink()
            for name in GOOD:
                fed.start_silo(SiloSpec(name, cohorts[name], study, state / "silos" / name))
            node_config = f'silo-name="rogue" state-dir="{state / "silos" / "rogue"}"'
            fed.env_extra.update(FEDCOHORT_NODE_POLL="0.25", FLWR_SUPEREXEC_TASK_POLL_INTERVAL="0.25")
            fed._spawn("silo-rogue", [sys.executable, "-m", "silo_node.supernode_launcher", "--superlink", fed.address,
                                      "--port", str(free_port()), "--node-config", node_config, "--insecure"])
            run_id = fed.submit({"study-path": str(study), "state-dir": str(state), "expected-silos": 4,
                                 "reply-timeout": 300.0})
            assert run_id
            summary = _wait_for_end(summary_path, fed, deadline=time.time() + 1500)
    finally:
        rogue.close()

    assert summary["status"] == "completed", (summary.get("reason"), (tmp_path / "runtime" / "logs"))
    assert summary["rounds"] == 2
    assert {m.STATS, m.TRAIN} <= set(rogue.seen), rogue.seen  # it was asked, over the real relay
    for rec in summary["history"]:
        assert sorted(rec["replied"]) == sorted(GOOD)
    refused = " | ".join(why for rec in summary["history"] for why in rec["refused"].values())
    assert "rejected by the coordinator" in refused

    log = [json.loads(line) for line in (state / "coordinator" / "audit.jsonl").read_text().splitlines()]
    rejected = [e for e in log if e["action"] == "reply.rejected"]
    reasons = " | ".join(e["details"]["reason"] for e in rejected)
    assert "moments has another size or type" in reasons  # statistics round
    assert "update has another size or type" in reasons  # round 1: bytes for a plaintext vector
    assert "round differs" in reasons  # round 2: the replay
    assert "Field required" in reasons  # final evaluation: header fields missing
    assert len({e["details"]["node"] for e in rejected}) == 1, "only the rogue's node was ever dropped"
    final = summary["final"]
    assert set(final["per_silo"]) == set(GOOD)
