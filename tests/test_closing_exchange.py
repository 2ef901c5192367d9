"""The closing exchange when a study stops early, in one process.

The completed path runs over a real SuperLink and SuperNodes in
tests/test_integration_flower.py; here Flower's transport is replaced by a loopback grid
that hands each message to the real silo request handler (`silo_node.service.handle`),
with real silo audit logs, so a stopped study can be driven quickly.
"""

from __future__ import annotations

import json
import uuid

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from coordinator.demo import sample_cohorts
from coordinator.server_app import StudyRunner
from policies import messages as m
from policies.audit import open_party_log
from policies.study import load_study, shipped_study
from silo_node.service import handle
from silo_node.worker import Silo


class LoopbackGrid:
    """Flower's Grid calls the ServerApp uses, answered at once by real silo handlers."""

    def __init__(self, silos: dict[int, tuple[Silo, object]]) -> None:
        self.silos = silos
        self.replies: dict[str, Message] = {}

    def get_node_ids(self) -> list[int]:
        return list(self.silos)

    def push_messages(self, msgs: list[Message]) -> list[str]:
        ids = []
        for msg in msgs:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # the SuperLink sets this
            silo, log = self.silos[msg.metadata.dst_node_id]
            arrays = {k: v.numpy() for k, v in msg.content.array_records.get(m.ARRAYS, ArrayRecord()).items()}
            reply, out = handle(silo, log, msg.metadata.message_type, dict(msg.content.config_records[m.HEADER]), arrays)
            content = RecordDict({m.HEADER: ConfigRecord({k: v for k, v in reply.items() if v is not None}),
                                  m.ARRAYS: ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in out.items()})})
            self.replies[msg.metadata.message_id] = Message(content, reply_to=msg)
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, ids: list[str]) -> list[Message]:
        return [self.replies.pop(i) for i in ids if i in self.replies]


@pytest.fixture(autouse=True)
def flower_task(monkeypatch):
    """What a ServerApp process is given by Flower: its run and task identity."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, attr, value)


def _log(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_stopped_study_still_witnesses_final_heads(tmp_path):
    """Two silos for a study that needs three: the statistics round stops the study, and
    the closing exchange still swaps final heads with both silos."""
    base = load_study(shipped_study())
    study = base.model_copy(update={"encryption": "none", "privacy": "none"})
    cohorts = sample_cohorts()
    silos = {}
    for node, name in enumerate(("hungary", "va"), start=101):
        silo = Silo.from_cohort(name, study, cohorts[name], state_dir=tmp_path / name)
        silo.audit = open_party_log(tmp_path / name, name, "silo")
        silos[node] = (silo, silo.audit)
    runner = StudyRunner(LoopbackGrid(silos), study, tmp_path / "coordinator", timeout=5, poll=0.01, expected=2)
    runner.run()

    summary = json.loads((tmp_path / "coordinator" / "summary.json").read_text())
    assert summary["status"] == "stopped" and "statistics round" in summary["reason"]
    coordinator = _log(tmp_path / "coordinator" / "audit.jsonl")
    assert [e["action"] for e in coordinator][-1] == "study.closed"
    closed = coordinator[-1]["details"]
    final = next(e for e in coordinator if e["seq"] == closed["final_seq"])
    assert final["action"] == "study.stopped" and final["hash"] == closed["final_head"]
    assert closed["outcome"] == "stopped" and closed["no_final_head"] == []
    assert set(closed["silo_heads"]) == {"hungary", "va"}
    for name in ("hungary", "va"):
        entries = _log(tmp_path / name / "audit.jsonl")
        last, before = entries[-1], entries[-2]
        assert last["action"] == "close.replied"
        assert closed["silo_heads"][name] == {"seq": last["seq"], "head": last["hash"]}
        assert before["action"] == "audit.witnessed"
        assert before["details"] == {"party": "coordinator", "seq": closed["final_seq"], "head": closed["final_head"]}
        witnessed = [e for e in coordinator if e["action"] == "audit.witnessed" and e["subject"] == f"silo:{name}"]
        assert witnessed[-1]["details"]["seq"] == last["seq"] and witnessed[-1]["details"]["head"] == last["hash"]


def test_a_silo_that_refuses_to_close_is_named(tmp_path):
    """A silo approved for another policy refuses the closing message; the coordinator
    records who gave no final head and why, and the study's outcome stands."""
    base = load_study(shipped_study())
    study = base.model_copy(update={"encryption": "none", "privacy": "none"})
    other = study.model_copy(update={"min_silos": 4})
    cohorts = sample_cohorts()
    silos = {}
    for node, (name, spec) in enumerate((("hungary", study), ("va", other)), start=201):
        silo = Silo.from_cohort(name, spec, cohorts[name], state_dir=tmp_path / name)
        silo.audit = open_party_log(tmp_path / name, name, "silo")
        silos[node] = (silo, silo.audit)
    runner = StudyRunner(LoopbackGrid(silos), study, tmp_path / "coordinator", timeout=5, poll=0.01, expected=2)
    runner.audit.append("study.stopped", study.id, {"reason": "test"})
    runner.close_study("stopped")
    closed = _log(tmp_path / "coordinator" / "audit.jsonl")[-1]["details"]
    assert set(closed["silo_heads"]) == {"hungary"}
    assert len(closed["no_final_head"]) == 1 and closed["no_final_head"][0].startswith("va: ")
    assert "policy" in closed["no_final_head"][0]
    va = _log(tmp_path / "va" / "audit.jsonl")
    assert va[-1]["action"] == "close.refused"
