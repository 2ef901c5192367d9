"""A silo node killed right after a privacy charge is durable, then restarted: the spend survives.

Real processes, as silo IT runs them: a Flower SuperLink and `silo-node start` (the
resident service plus its SuperNode) on 127.0.0.1. The test plays the coordinator's
relay: it sends requests over the service's Unix socket exactly as the ClientApp does
(silo_node.service.call), so a round can be driven without a whole federation. The node
(service and SuperNode, as a power cut would) gets SIGKILL as soon as the round's charge
is on disk, polled from the ledger file; nothing in the production code knows about it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from multiprocessing import AuthenticationError
from pathlib import Path

import numpy as np
import pytest
import yaml

from coordinator.runtime import LocalFederation, Process, SiloSpec
from policies import messages as m
from policies.errors import PolicyError
from policies.study import load_study, shipped_study
from silo_node.ledger import PrivacyLedger
from silo_node.service import call

pytestmark = pytest.mark.slow
SILO = "cleveland"
START_TIMEOUT = 300.0  # the service imports torch, tenseal and opacus and calibrates its noise; 2 shared cores


@pytest.fixture
def node(tmp_path: Path, sample_paths):
    """A SuperLink and one DP silo node (the shipped study with encryption off: no key ceremony needed)."""
    data = load_study(shipped_study()).model_dump(mode="json")
    data["encryption"] = "none"
    study_path = tmp_path / "study.yaml"
    study_path.write_text(yaml.safe_dump(data, sort_keys=False))
    study = load_study(study_path)
    assert study.dp is not None
    fed = LocalFederation(work_dir=tmp_path / "run")
    spec = SiloSpec(SILO, sample_paths[SILO], study_path, tmp_path / "silo")
    orphans: list[int] = []
    try:
        fed.start_superlink()
        yield fed, spec, study, orphans
    finally:
        fed.stop()
        for pgid in orphans:  # a killed node's SuperNode, in case the test failed before killing it
            _kill_group(pgid)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _request(study, round_no: int, nonce: str) -> dict:
    return m.Request(study_id=study.id, policy_hash=study.policy_hash(), round=round_no, nonce=nonce).model_dump()


def _start(fed: LocalFederation, spec: SiloSpec, study) -> tuple[Process, np.ndarray]:
    """`silo-node start`, then wait until its service answers; returns it and its statistics."""
    proc = fed.start_silo(spec)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        assert proc.alive(), f"silo-node start exited: {proc.log.read_text()[-2000:]}"
        try:
            reply, arrays = call(spec.state_dir, m.STATS, _request(study, 0, f"stats-{time.monotonic()}"), {})
        except (OSError, EOFError, AuthenticationError, PolicyError):
            time.sleep(0.2)  # not up yet, or a stale socket / key from the killed process
            continue
        assert reply["status"] == "ok", reply
        return proc, arrays[m.MOMENTS]
    raise AssertionError(f"silo service did not answer within {START_TIMEOUT:.0f} s: {proc.log.read_text()[-2000:]}")


def _supernode_pid(proc: Process) -> int:
    found = re.search(r"SuperNode pid (\d+)", proc.log.read_text())
    assert found, f"silo-node start did not report its SuperNode: {proc.log.read_text()[-2000:]}"
    return int(found.group(1))


def _ledger_seq_on_disk(path: Path) -> int:
    try:
        return int(json.loads(path.read_text())["seq"])
    except (FileNotFoundError, ValueError, KeyError):
        return 0  # not charged yet (the file is only ever replaced whole, by rename)


def _ledger(spec: SiloSpec, study) -> PrivacyLedger:
    return PrivacyLedger.load(spec.state_dir, study.id)  # verifies the hash chain and history


def test_node_killed_right_after_charge_keeps_the_spend_and_charges_a_retrain(node) -> None:
    fed, spec, study, orphans = node
    ledger_file = PrivacyLedger.path_for(spec.state_dir, study.id)
    proc, stats = _start(fed, spec, study)
    supernode = _supernode_pid(proc)
    orphans.append(supernode)
    base = _ledger_seq_on_disk(ledger_file)  # the statistics release is charged first (round 0)
    assert base >= 1 and _ledger(spec, study).state.charges[0].kind == "stats"
    train = _request(study, 1, "round-1-nonce-a")
    arrays = {m.STATS_SUM: stats}

    # Round 1 in flight; SIGKILL the node the moment its charge is durable.
    outcome: dict[str, object] = {}

    def send() -> None:
        try:
            outcome["reply"] = call(spec.state_dir, m.TRAIN, train, arrays)
        except (OSError, EOFError) as exc:  # the node died before it answered
            outcome["error"] = exc

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    deadline = time.monotonic() + 120
    while _ledger_seq_on_disk(ledger_file) <= base:
        assert time.monotonic() < deadline, f"round 1 was never charged: {proc.log.read_text()[-2000:]}"
        assert sender.is_alive() or "reply" in outcome, f"round 1 ended without a charge: {outcome}"
        time.sleep(0.002)
    os.kill(proc.popen.pid, signal.SIGKILL)
    _kill_group(supernode)
    proc.popen.wait(timeout=30)
    sender.join(timeout=30)

    charged = _ledger(spec, study)
    first = charged.state.charges[-1]
    assert charged.seq == base + 1 and first.kind == "release"
    assert (first.round, first.nonce) == (1, "round-1-nonce-a")
    assert charged.spent() == pytest.approx(first.epsilon_after, rel=1e-12) and first.epsilon_after > 0
    if "reply" in outcome:  # the update got out before the kill: the ledger covers it
        reply = outcome["reply"][0]
        assert reply["status"] == "ok" and reply["ledger_seq"] == charged.seq
        assert reply["epsilon_spent"] <= charged.spent()

    # Restarted, the node never spends less than what it charged before the kill.
    proc, _ = _start(fed, spec, study)
    orphans.append(_supernode_pid(proc))
    restarted = _ledger(spec, study)
    assert restarted.spent() >= first.epsilon_after - 1e-12
    assert [c.nonce for c in restarted.state.charges if c.round == 1] == ["round-1-nonce-a"]

    # The coordinator re-asks round 1. If the reply reached the silo's outbox before the kill it
    # is answered from there, free; otherwise it is trained again: a new release, charged as a retrain.
    reply, out = call(spec.state_dir, m.TRAIN, train, arrays)
    assert reply["status"] == "ok", reply
    after = _ledger(spec, study)
    if after.seq == restarted.seq:
        assert reply["ledger_seq"] == charged.seq and after.spent() == pytest.approx(restarted.spent(), rel=1e-12)
    else:
        retrain = after.state.charges[-1]
        assert after.seq == restarted.seq + 1 and reply["ledger_seq"] == after.seq and reply["ledger_head"] == after.head
        assert (retrain.kind, retrain.round, retrain.nonce) == ("retrain", 1, "round-1-nonce-a")
        assert retrain.release_digest != first.release_digest, "fresh noise: a different update left"
        assert after.spent() > restarted.spent()
        assert reply["epsilon_spent"] == pytest.approx(after.spent(), rel=1e-12)

    # Re-sending that same update costs nothing.
    again, out_again = call(spec.state_dir, m.TRAIN, train, arrays)
    assert again == reply
    np.testing.assert_array_equal(out_again[m.UPDATE], out[m.UPDATE])
    assert _ledger(spec, study).seq == after.seq
    assert _ledger(spec, study).spent() == pytest.approx(after.spent(), rel=1e-12)
