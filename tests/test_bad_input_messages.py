"""Bad input, part 3: broken messages at the coordinator and at the silo (issue 7, point 5).

Coordinator: a training round over a loopback grid (Flower Messages built and answered
in-process, each node answering with its own crafted reply, real CKKS ciphertexts) where
three silos answer properly and the others send garbage bytes, wrong sizes and types,
headers with fields missing or of the wrong type, replays, oversized headers and
arrays, reports that are not JSON, error replies, and (with registered SuperNode keys)
another silo's name. Each is rejected with a logged reason, shown in the round record,
and the round goes on with the others; nothing about the sender is kept.

Silo: requests through the silo service's real Unix socket: wrong study hash, unknown
kind, malformed and oversized headers, garbage arrays. Each is refused with the reason
in the silo's audit log, nothing else in the state directory changes, and the service
goes on answering. The same over real Flower processes is in test_bad_input_flower.py.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from bad_input_helpers import tree
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, RecordDict

from coordinator.server_app import StudyRunner
from policies import messages as m
from policies.ckks import aggregator_context_bytes, blob_as_uint8, decrypt_vector, encrypt_vector, load_context
from policies.ckks import new_secret_context, sum_encrypted_uint8
from policies.study import StudySpec, load_study, shipped_study

Responder = Callable[[Message], Message | None]


class LoopbackGrid:
    """The Grid calls the ServerApp makes (node ids, push, pull), answered in-process.

    Message ids are given on push, as the SuperLink does; each node's responder builds
    the reply Message its ClientApp would have sent.
    """

    def __init__(self, responders: dict[int, Responder]):
        self.responders = responders
        self.queued: dict[str, Message] = {}
        self.sent: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(self.responders)

    def push_messages(self, messages: list[Message]) -> list[str]:
        ids = []
        for msg in messages:
            msg_id = f"msg-{len(self.sent)}"
            msg.metadata.__dict__["_message_id"] = msg_id
            self.sent.append(msg)
            self.queued[msg_id] = msg
            ids.append(msg_id)
        return ids

    def pull_messages(self, message_ids: list[str]) -> list[Message]:
        replies = []
        for msg_id in message_ids:
            msg = self.queued.pop(msg_id)
            reply = self.responders[msg.metadata.dst_node_id](msg)
            if reply is not None:
                replies.append(reply)
        return replies


def request_of(msg: Message) -> m.Request:
    return m.Request.model_validate(dict(msg.content.config_records[m.HEADER]))


def reply_message(msg: Message, header: dict, arrays: dict[str, np.ndarray] | None) -> Message:
    records = {m.HEADER: ConfigRecord({k: v for k, v in header.items() if v is not None})}
    if arrays is not None:
        records[m.ARRAYS] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
    return Message(RecordDict(records), reply_to=msg)


class Silo:
    """A well-behaved silo's replies: real ciphertexts of a known update and evaluation."""

    def __init__(self, name: str, secret, study: StudySpec):
        self.name, self.secret, self.study = name, secret, study
        self.update = np.linspace(-1, 1, 16)
        self.eval = np.full(8, 0.01)
        self.first: Message | None = None  # its first reply, kept to replay later

    def header(self, msg: Message, **changes) -> dict:
        req = request_of(msg)
        reply = m.Reply(study_id=req.study_id, policy_hash=req.policy_hash, round=req.round, nonce=req.nonce,
                        silo=self.name, status="ok", ledger_seq=req.round, ledger_head=f"head-{req.round}")
        return reply.model_dump() | changes

    def arrays(self, **changes) -> dict[str, np.ndarray]:
        enc = {m.UPDATE: blob_as_uint8(encrypt_vector(self.secret, self.update, params=self.study.ckks)),
               m.EVAL: blob_as_uint8(encrypt_vector(self.secret, self.eval, params=self.study.ckks))}
        return enc | changes

    def good(self, msg: Message) -> Message:
        reply = reply_message(msg, self.header(msg), self.arrays())
        self.first = self.first or reply
        return reply


def rogue_replies(silo: Silo) -> dict[str, Responder]:
    """Each way a reply can be broken: name -> how that node answers every request."""
    ok_len = len(silo.arrays()[m.UPDATE])
    rng = np.random.default_rng(5)
    return {
        "garbage-bytes": lambda msg: reply_message(msg, silo.header(msg), silo.arrays(
            update=rng.integers(0, 256, ok_len, dtype=np.uint8))),
        "wrong-dtype": lambda msg: reply_message(msg, silo.header(msg), silo.arrays(update=silo.update)),
        "wrong-size": lambda msg: reply_message(msg, silo.header(msg), silo.arrays(
            eval=blob_as_uint8(encrypt_vector(silo.secret, np.full(5000, 0.01), params=silo.study.ckks)))),
        "missing-fields": lambda msg: reply_message(
            msg, {k: v for k, v in silo.header(msg).items() if k not in ("nonce", "round")}, silo.arrays()),
        "wrong-types": lambda msg: reply_message(msg, silo.header(msg, round="one", audit_seq="x"), silo.arrays()),
        "no-header": lambda msg: Message(RecordDict({m.ARRAYS: ArrayRecord({})}), reply_to=msg),
        "replay": lambda msg: silo.good(msg) if request_of(msg).round == 1 else _replayed(msg, silo.first),
        "oversized-report": lambda msg: reply_message(
            msg, silo.header(msg, report=json.dumps({"pad": "x" * (m.MAX_REPORT_CHARS + 1)})), silo.arrays()),
        "oversized-reason": lambda msg: reply_message(
            msg, silo.header(msg, status="refused", reason="r" * (m.MAX_REASON_CHARS + 1)), None),
        "oversized-arrays": lambda msg: reply_message(msg, silo.header(msg), silo.arrays(
            padding=np.zeros(m.MAX_ARRAY_BYTES // 8 + 1))),
        "report-not-json": lambda msg: reply_message(msg, silo.header(msg, report="{not json"), silo.arrays()),
        "report-a-list": lambda msg: reply_message(msg, silo.header(msg, report="[1, 2]"), silo.arrays()),
        "infinite-epsilon": lambda msg: reply_message(msg, silo.header(msg, epsilon_spent=float("inf")), silo.arrays()),
        "ok-without-update": lambda msg: reply_message(msg, silo.header(msg), {}),
        "error-reply": lambda msg: Message(Error(code=0, reason="ClientApp raised"), reply_to=msg),
    }


def _replayed(msg: Message, earlier: Message) -> Message:
    """The earlier round's reply sent again, unchanged, as the answer to this request."""
    return reply_message(msg, dict(earlier.content.config_records[m.HEADER]),
                         {k: v.numpy() for k, v in earlier.content.array_records[m.ARRAYS].items()})


@pytest.fixture(autouse=True)
def serverapp_identity(monkeypatch):
    """Flower 1.41 stamps every Message with the run, node and task of the process making it
    (set by the SuperExec in a ServerApp process); this test process plays the ServerApp."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)


@pytest.fixture(scope="module")
def ckks():
    study = load_study(shipped_study())
    secret = new_secret_context(study.ckks)
    return study, secret, load_context(aggregator_context_bytes(secret), study.ckks)


def _runner(tmp_path: Path, study: StudySpec, aggregator, responders: dict[int, Responder]) -> StudyRunner:
    runner = StudyRunner(grid=LoopbackGrid(responders), study=study, out_dir=tmp_path, timeout=30, poll=0.01,
                         expected=len(responders))
    runner.state.adder = lambda arrays: sum_encrypted_uint8(aggregator, arrays)
    return runner


def _audit(runner: StudyRunner) -> list[dict]:
    return [json.loads(line) for line in (runner.out_dir / "audit.jsonl").read_text().splitlines()]


def test_a_round_drops_every_broken_reply_and_goes_on(tmp_path, ckks, monkeypatch):
    study, secret, aggregator = ckks
    monkeypatch.setattr(m, "MAX_ARRAY_BYTES", 4 * 2**20)  # the same check as at 256 MB, without allocating it
    good = {i: Silo(f"good{i}", secret, study) for i in range(3)}
    rogues = {name: Silo(name, secret, study) for name in rogue_replies(good[0])}
    responders: dict[int, Responder] = {i: s.good for i, s in good.items()}
    node_of = {}
    for offset, (name, silo) in enumerate(rogues.items(), start=10):
        responders[offset] = rogue_replies(silo)[name]
        node_of[name] = offset
    runner = _runner(tmp_path, study, aggregator, responders)
    runner.names = {i: s.name for i, s in good.items()} | {node: name for name, node in node_of.items()}
    nodes = sorted(responders)

    runner.train_round(nodes, 1)
    runner.train_round(nodes, 2)

    record = runner.state.rounds[-1]
    assert sorted(record.replied) == ["good0", "good1", "good2"]
    refused = {name: why for name, why in record.refused.items() if name in rogues}
    assert set(refused) == set(rogues), set(rogues) - set(refused)
    expect = {
        "garbage-bytes": "does not parse under the study context", "wrong-dtype": "does not parse",
        "wrong-size": "another size or type than the other silos'", "missing-fields": "Field required",
        "wrong-types": "valid integer", "no-header": "KeyError", "replay": "(round differs)",
        "oversized-report": f"at most {m.MAX_REPORT_CHARS} characters",
        "oversized-reason": f"at most {m.MAX_REASON_CHARS} characters", "oversized-arrays": "-byte limit: refused",
        "report-not-json": "report is not valid JSON", "report-a-list": "report is JSON list, not an object",
        "infinite-epsilon": "finite number", "ok-without-update": "carries no 'update' array",
        "error-reply": "error reply from the node",
    }
    for name, words in expect.items():
        assert words in refused[name], (name, refused[name])

    logged = [e for e in _audit(runner) if e["action"] in ("reply.rejected", "reply.error")
              and e["details"]["round"] == 2]
    assert {int(e["details"]["node"]) for e in logged} == set(node_of.values())
    assert all(e["details"]["reason"] for e in logged)
    finished = [e for e in _audit(runner) if e["action"] == "round.finished"][-1]
    assert finished["details"]["replied"] == ["good0", "good1", "good2"]

    # round 1 summed the good silos and the future replayer (still honest then); round 2 only the good
    first, second = (decrypt_vector(secret, agg) for agg in runner.state.aggregates)
    np.testing.assert_allclose(first, 4 * good[0].update, atol=1e-6)
    np.testing.assert_allclose(second, 3 * good[0].update, atol=1e-6)
    # nothing about a rejected sender is kept: no ledger head witnessed (the replayer's stays at
    # what it honestly sent in round 1), no privacy row, no report
    assert set(runner.ledger_witness) == {"good0", "good1", "good2", "replay"}  # by silo name
    assert runner.ledger_witness["replay"] == (1, "head-1")
    assert set(record.privacy) == {"good0", "good1", "good2"} and set(record.per_silo) == set(record.privacy)
    assert runner.names == {i: s.name for i, s in good.items()} | {node: name for name, node in node_of.items()}


def test_a_registered_node_claiming_another_silo_is_dropped(tmp_path, ckks):
    """With SuperNode authentication, the node id is the identity: a payload naming another
    silo is dropped, and a connected node nobody registered is never asked at all."""
    from coordinator.bookkeeping import StudyBook

    study, secret, aggregator = ckks
    silos = {1: Silo("cleveland", secret, study), 2: Silo("hungary", secret, study), 3: Silo("va", secret, study)}
    impostor = Silo("cleveland", secret, study)  # registered as switzerland, says it is cleveland
    stranger = Silo("stranger", secret, study)
    responders: dict[int, Responder] = {n: s.good for n, s in silos.items()} | {4: impostor.good, 99: stranger.good}
    runner = _runner(tmp_path / "coordinator", study, aggregator, responders)
    runner.book = StudyBook(tmp_path, study, shipped_study().read_text(), runner.audit)
    for node, name in ((1, "cleveland"), (2, "hungary"), (3, "va"), (4, "switzerland")):
        runner.book.store.register_node_key(name, f"ecdsa-sha2-nistp384 KEY{node}", node)
    runner.names = {1: "cleveland", 2: "hungary", 3: "va", 4: "switzerland"}

    assert runner.connected_nodes() == {1, 2, 3, 4}
    runner.train_round(sorted(runner.connected_nodes()), 1)

    record = runner.state.rounds[-1]
    assert sorted(record.replied) == ["cleveland", "hungary", "va"]
    assert "node 4 is registered as silo 'switzerland', its reply claims 'cleveland'" in record.refused["switzerland"]
    assert all(msg.metadata.dst_node_id != 99 for msg in runner.grid.sent)
    rejected = [e for e in _audit(runner) if e["action"] == "reply.rejected"]
    assert [(e["subject"], e["details"]["node"]) for e in rejected] == [("node-4", "4")]
    assert 4 not in runner.ledger_witness
    np.testing.assert_allclose(decrypt_vector(secret, runner.state.aggregates[0]), 3 * silos[1].update, atol=1e-6)


# ---------------------------------------------------------------- at the silo


def _plain_study(study: StudySpec) -> StudySpec:
    data = study.model_dump(mode="json")
    data["encryption"], data["privacy"] = "none", "none"
    return StudySpec.model_validate(data)


@pytest.fixture()
def service(tmp_path, heart_study, sample_paths):
    """A real silo service on its Unix socket, serving a plaintext study from the Cleveland cohort."""
    from silo_node.service import call, serve
    from silo_node.worker import Silo as RealSilo

    study = _plain_study(heart_study)
    state = tmp_path / "state"
    state.mkdir()
    silo = RealSilo.from_cohort("cleveland", study, sample_paths["cleveland"], state_dir=state)
    stop = threading.Event()
    thread = threading.Thread(target=serve, args=(state, silo), kwargs={"stop": stop.is_set}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not (state / "silo.sock").exists() and time.monotonic() < deadline:
        time.sleep(0.05)

    def ask(kind: str, header: dict, arrays: dict | None = None) -> tuple[dict, dict]:
        return call(state, kind, header, arrays or {})

    yield study, state, ask
    stop.set()
    try:
        ask(m.ENROL, {})  # wakes the accept loop so it sees the stop flag
    except Exception:
        pass
    thread.join(timeout=10)


def _header(study: StudySpec, **changes) -> dict:
    return m.Request(study_id=study.id, policy_hash=study.policy_hash(), round=1, nonce=m.new_nonce()).model_dump() | changes


def _state_without_audit(state: Path) -> dict[str, str]:
    return {k: v for k, v in tree(state).items() if k != "audit.jsonl"}


def test_the_silo_refuses_broken_requests_and_keeps_serving(service, monkeypatch):
    study, state, ask = service
    monkeypatch.setattr(m, "MAX_ARRAY_BYTES", 2**20)  # the service runs in this process: same check, smaller
    agg = np.zeros(20)
    stats_request = _header(study, round=0)
    reply, out = ask(m.STATS, stats_request)  # a proper statistics request: the sum a train request needs
    assert reply["status"] == "ok"
    stats_sum = out[m.MOMENTS]
    before = _state_without_audit(state)
    refused = {
        "wrong study hash": (m.TRAIN, _header(study, policy_hash="0" * 64), {}, "this silo approved"),
        "other study": (m.TRAIN, _header(study, study_id="other-study"), {}, "request is for study 'other-study'"),
        "unknown kind": ("query.exfiltrate", _header(study), {}, "unknown request kind 'query.exfiltrate'"),
        "bytes for a plaintext sum": (m.TRAIN, _header(study), {"agg_0001": np.zeros(160, dtype=np.uint8)},
                                      "is uint8 (160,), not a flat float64 vector"),
        "2-D history": (m.TRAIN, _header(study), {"agg_0001": np.zeros((4, 5))}, "not a flat float64 vector"),
        "unknown array": (m.TRAIN, _header(study), {"payload": agg}, "unknown array 'payload'"),
        "history longer than the study": (m.TRAIN, _header(study, round=16),
                                          {f"agg_{r:04d}": agg for r in range(1, 17)}, "16 aggregates, the study has 15"),
        "oversized arrays": (m.TRAIN, _header(study), {"agg_0001": np.zeros(2**20 // 8 + 1)}, "-byte limit: refused"),
        "aggregates of the wrong length": (m.TRAIN, _header(study), {m.STATS_SUM: stats_sum, "agg_0001": np.zeros(3)},
                                           "could not be processed"),
    }
    for what, (kind, header, arrays, words) in refused.items():
        reply, out = ask(kind, header, arrays)
        assert reply.get("status") == "refused", (what, reply)
        assert words in reply["reason"], (what, reply["reason"])
        assert out == {}

    malformed = {
        "no nonce": ({k: v for k, v in _header(study).items() if k != "nonce"}, "nonce: Field required"),
        "round is text": (_header(study, round="one"), "round: Input should be a valid integer"),
        "oversized nonce": (_header(study, nonce="n" * 100_000), "nonce: String should have at most 200 characters"),
        "extra field": (_header(study) | {"exec": "rm -rf /"}, "exec: Extra inputs are not permitted"),
    }
    for what, (header, words) in malformed.items():
        reply, out = ask(m.TRAIN, header, {})
        assert set(reply) == {"error"} and words in reply["error"], (what, reply)
        assert "rm -rf" not in reply["error"] and "nnnn" not in reply["error"]

    assert _state_without_audit(state) == before, "a refused request changed the silo's state"
    log = [json.loads(line) for line in (state / "audit.jsonl").read_text().splitlines()]
    actions = [e["action"] for e in log]
    assert actions.count("train.refused") == len(refused) - 1
    assert actions.count("request.refused") == 1  # the unknown kind, under a name the sender did not choose
    assert actions.count("request.malformed") == len(malformed)
    assert actions.count("stats.replied") == 1 and not any(a.startswith("train.replied") for a in actions)

    reply, out = ask(m.STATS, _header(study, round=0))  # and it still answers a proper request
    assert reply["status"] == "ok" and m.MOMENTS in out
    # the refusals did not push the first reply out of the outbox: its resend is answered from there
    reply, out = ask(m.STATS, stats_request)
    assert reply["status"] == "ok"
    np.testing.assert_array_equal(out[m.MOMENTS], stats_sum)
    log = [json.loads(line) for line in (state / "audit.jsonl").read_text().splitlines()]
    assert log[-1]["action"] == "request.resent" and log[-1]["details"]["nonce"] == stats_request["nonce"]
