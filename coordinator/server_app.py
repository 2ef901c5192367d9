"""The Flower ServerApp: run the study's phases over the grid and keep only sums.

Phases: a statistics round (pooled normalisation), then `rounds` training rounds (each
silo first evaluates the model it receives, then trains from it, so evaluation rides on
the training message), then one final evaluation. Messages are pushed, and replies
pulled every `poll-interval` seconds rather than on Flower's fixed 3-second tick.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from policies import messages as m
from policies.audit import open_party_log
from policies.errors import PolicyError
from policies.metrics import metrics_from_counts
from policies.study import StudySpec, load_study
from coordinator.bookkeeping import StudyBook
from coordinator.runlock import hold_study_lock
from coordinator.store import CheckpointRow
from coordinator.rounds import RoundRecord, StudyState, final_evaluation

app = ServerApp()
CLOSE_TIMEOUT = 60.0  # seconds the closing exchange waits for silos' final heads


@dataclass
class SiloAnswer:
    node_id: int
    reply: m.Reply
    arrays: dict[str, np.ndarray]


class StudyRunner:
    """Drives one study over a Flower grid and writes its progress to the state dir."""

    def __init__(self, grid: Grid, study: StudySpec, out_dir: Path, timeout: float, poll: float, expected: int,
                 transport: str = "push-pull"):
        self.grid, self.study, self.out_dir, self.transport = grid, study, out_dir, transport
        self.timeout, self.poll, self.expected = timeout, poll, expected
        self.state = StudyState(study.id, study.policy_hash())
        out_dir.mkdir(parents=True, exist_ok=True)
        self.audit = open_party_log(out_dir, "coordinator", "coordinator")
        # silo name -> last privacy-ledger head seen; by name, not node id, so a silo that comes
        # back under a new node id (restarted, restored from a backup) is still held to it
        self.ledger_witness: dict[str, tuple[int, str]] = {}
        # (round record the model was evaluated for, summed evaluation counts not yet revealed)
        self.pending_eval: tuple[RoundRecord | None, np.ndarray] | None = None
        self.book: StudyBook | None = None
        self.names: dict[int, str] = {}  # node id -> silo name (display; identities come with node auth)
        self._booked: set[int] = set()
        self.rejected: dict[str, str] = {}  # silo -> why its reply was dropped (this phase)
        self.holder: int | None = None  # node of the CKKS key holder
        self.not_admitted: set[int] = set()  # late nodes that could not join (no key, refused)
        self.context_bytes: bytes | None = None  # the keyless aggregator context (CKKS)
        self.fingerprints: dict[str, str] = {}  # silo -> sha256 of its enrolment public key
        self.validations: dict[str, dict] = {}  # silo -> its counts-only validation report (statistics reply)
        self.next_nonces: dict[str, str] = {}  # silo -> nonce of the next train round (checkpointed)
        self.run_id: int | None = None  # this Flower run
        # key lifecycle: revoked or withdrawn silos leave for good; a revocation re-keys (CKKS)
        self.key_epoch = 0  # the CKKS key the silos encrypt under now (0: the first ceremony's)
        self.epoch_starts: dict[int, int] = {}  # key epoch -> first round whose aggregate is under it
        self.eval_epoch = 0  # key epoch of the pending evaluation sum
        self.departed: dict[int, str] = {}  # node -> "revoked" / "withdrawn": never asked again

    # ---- transport ----------------------------------------------------------------
    def wait_for_silos(self) -> list[int]:
        """Wait (bounded) until the expected silos are connected; go on with the minimum."""
        deadline = time.monotonic() + self.timeout
        while True:
            nodes = sorted(self.connected_nodes())
            if len(nodes) >= self.expected or (time.monotonic() > deadline and len(nodes) >= self.study.min_silos):
                return nodes
            if time.monotonic() > deadline:
                raise PolicyError(f"only {len(nodes)} silos connected, the study needs {self.study.min_silos}")
            time.sleep(self.poll)

    def exchange(self, nodes: list[int], message_type: str, round_no: int, arrays: dict[str, np.ndarray],
                 per_node: dict[int, dict[str, np.ndarray]] | None = None,
                 nonces: dict[int, str] | None = None) -> tuple[list[SiloAnswer], dict[int, str]]:
        """Send one request per silo, collect what answers in time; and why each other did not
        (no reply in time, Flower's error for a node that went away, a reply rejected).

        Each request gets a fresh nonce unless `nonces` names one: a train round resent
        after a restart reuses the checkpointed nonce, so a silo that already answered
        returns its cached reply instead of training (and being charged) again.
        """
        requests, msgs = {}, []
        shared = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
        seq, head = self.audit.head()
        sent_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        names = {**self._registered(), **self.names} if self.ledger_witness else {}
        for node in nodes:
            lseq, lhead = self.ledger_witness.get(names.get(node, ""), (0, ""))
            req = m.Request(study_id=self.study.id, policy_hash=self.state.policy_hash, round=round_no,
                            nonce=(nonces or {}).get(node) or m.new_nonce(), sent_at=sent_at, audit_seq=seq, audit_head=head,
                            ledger_seq=lseq, ledger_head=lhead)
            payload = shared if not per_node else ArrayRecord(
                {k: Array(np.ascontiguousarray(v)) for k, v in (arrays | per_node.get(node, {})).items()})
            content = RecordDict({m.HEADER: ConfigRecord(req.model_dump()), m.ARRAYS: payload})
            msgs.append(Message(content, node, message_type, group_id=str(round_no)))
            requests[node] = req
        if self.transport == "send-and-receive":  # Flower's stock path (3-second ticks), for comparison
            replies = list(self.grid.send_and_receive(msgs, timeout=self.timeout))
            decoded = {rep.metadata.src_node_id: self._decode(rep.metadata.src_node_id, rep, requests[rep.metadata.src_node_id])
                       for rep in replies if rep.metadata.src_node_id in requests}  # not the SuperLink's own errors
            return _split(decoded, nodes)
        ids = dict(zip(self.grid.push_messages(msgs), nodes))
        pending, decoded = set(ids), {}
        deadline = time.monotonic() + self.timeout
        while pending and time.monotonic() < deadline:
            for rep in self.grid.pull_messages(list(pending)):
                msg_id = rep.metadata.reply_to_message_id
                pending.discard(msg_id)
                decoded[ids[msg_id]] = self._decode(ids[msg_id], rep, requests[ids[msg_id]])
            if pending:
                time.sleep(self.poll)
        return _split(decoded, nodes)

    def _decode(self, node: int, rep: Message, req: m.Request) -> SiloAnswer | str:
        """The silo's answer, or why there is none: Flower's error for the node, or why its reply
        was rejected (malformed, oversized, a replay, for another request, in another silo's
        name). Each is logged; the round record shows it under the node's known name."""
        if rep.has_error():  # e.g. the node went away or its ClientApp failed: no payload to judge
            reason = f"no reply: error reply from the node (Flower error {rep.error.code}: {str(rep.error.reason)[:200]})"
            self.audit.append("reply.error", f"node-{node}", {"node": str(node), "round": req.round, "reason": reason})
            return reason
        try:
            reply = m.Reply.model_validate(dict(rep.content.config_records[m.HEADER]))
            m.check_reply(reply, req)
            self.check_identity(node, reply.silo)
            arrays = {k: v.numpy() for k, v in rep.content.array_records.get(m.ARRAYS, ArrayRecord()).items()}
            m.check_array_bytes(arrays, f"reply from node {node}")
            self._note_withdrawal(node, reply)
        except (KeyError, ValueError, TypeError) as exc:  # malformed, oversized, replayed, another silo's name
            reason = f"{type(exc).__name__}: {str(exc)[:200]}"
            self.audit.append("reply.rejected", f"node-{node}", {"node": str(node), "round": req.round, "reason": reason})
            return f"reply rejected by the coordinator: {reason}"
        if reply.audit_seq:
            self.audit.witness(f"silo:{reply.silo}", reply.audit_seq, reply.audit_head)
        return SiloAnswer(node, reply, arrays)

    def _registered(self) -> dict[int, str]:
        """Flower node id -> silo name, for silos registered with a SuperNode key (empty in the demo)."""
        if not self.book:
            return {}
        return {int(s.flower_node_id): s.name for s in self.book.store.list_silos()
                if s.node_auth_key and s.flower_node_id is not None and s.revoked_at is None}

    def connected_nodes(self) -> set[int]:
        """Connected SuperNodes that count as silos. Flower 1.41's Control API lets anyone who
        reaches the port register a node key, so once silos are registered through
        `coordinator certs register` only their node ids count towards quorum and rounds."""
        nodes = set(self.grid.get_node_ids())
        registered = self._registered()
        return nodes & set(registered) if registered else nodes

    def check_identity(self, node: int, claimed: str) -> None:
        """With SuperNode authentication the node id is the silo's identity: a reply must name
        the silo registered for its node (`coordinator certs register`). Without any
        registration (the insecure local demo) names come from payloads and are not checked."""
        self._refuse_revoked(node, claimed)
        registered = self._registered()
        if registered and registered.get(node) != claimed:
            raise ValueError(f"node {node} is registered as silo {registered.get(node)!r}, its reply claims {claimed!r}")

    # ---- phases -----------------------------------------------------------------------
    def _ok(self, answers: list[SiloAnswer], needed: str, screen: tuple[str, ...] = ()) -> list[SiloAnswer]:
        """Replies that answered and carry `needed`; contributions in `screen` must also parse
        under the study context and have the shape most silos sent, or the reply is rejected
        (logged) and the round goes on with the others."""
        ok = [a for a in answers if a.reply.status == "ok"]
        for a in ok:
            if needed not in a.arrays:
                self._reject(a, f"the reply says ok but carries no '{needed}' array")
        ok = [a for a in ok if needed in a.arrays]
        for key in screen:
            ok = self._screen(ok, key)
        return ok

    def _screen(self, answers: list[SiloAnswer], key: str) -> list[SiloAnswer]:
        parsed = []
        for a in answers:
            if key not in a.arrays:
                continue
            try:
                self.state.adder([a.arrays[key]])
                parsed.append(a)
            except (PolicyError, ValueError) as exc:
                self._reject(a, f"{key} does not parse under the study context: {exc}")
        shapes = Counter((a.arrays[key].dtype.str, a.arrays[key].shape) for a in parsed)
        if not shapes:
            return parsed
        common, _ = shapes.most_common(1)[0]
        good = [a for a in parsed if (a.arrays[key].dtype.str, a.arrays[key].shape) == common]
        for a in parsed:
            if a not in good:
                self._reject(a, f"{key} has another size or type than the other silos' contributions")
        return [a for a in answers if a in good or key not in a.arrays]

    def _who(self, node: int, claimed: str) -> str:
        """The name a reply is recorded under: its node's known name; the payload's name only
        when no other node holds it (a name is a claim, the node id is the identity)."""
        if node in self.names:
            return self.names[node]
        return f"node-{node}" if claimed in self.names.values() else claimed

    def _reject(self, answer: SiloAnswer, reason: str) -> None:
        """Drop one reply, logged under the name known for its node (see `_who`)."""
        who = self._who(answer.node_id, answer.reply.silo)
        self.rejected[who] = reason[:300]
        self.audit.append("reply.rejected", who, {"node": str(answer.node_id), "round": answer.reply.round,
                                                  "claimed": answer.reply.silo, "reason": reason[:300]})

    def _require_quorum(self, ok: list[SiloAnswer], what: str) -> None:
        if len(ok) < self.study.min_silos:
            raise PolicyError(f"{what}: {len(ok)} silos contributed, the study needs {self.study.min_silos}; study stopped")

    def key_ceremony(self, nodes: list[int], epoch: int = 0) -> list[int]:
        """CKKS key made at one silo, sealed to the others; the coordinator relays sealed blobs.

        The coordinator ends up with the keyless aggregator context only: it can add
        ciphertexts and nothing else. `epoch` > 0: a re-key, a new key under a new epoch.
        """
        epoch_arrays = {m.KEY_EPOCH: np.array([epoch], dtype=np.int64)} if epoch else {}
        answers, _ = self.exchange(nodes, m.ENROL, 0, {})
        enrolled = {a.node_id: a for a in self._ok(answers, m.ENROL_PUB)}
        self._require_quorum(list(enrolled.values()), "key ceremony (enrolment keys)")
        holder = self._key_holder(enrolled)
        peers = sorted(n for n in enrolled if n != holder)
        for node, a in enrolled.items():
            self._saw_enrolment(node, a)
        peer_keys = {m.peer_key(str(n)): enrolled[n].arrays[m.ENROL_PUB] for n in peers}
        answers, _ = self.exchange([holder], m.KEYGEN, 0, peer_keys | epoch_arrays)
        made = self._ok(answers, m.AGG_CTX)
        if not made:
            raise PolicyError("key ceremony: the key-holding silo did not make the study key; study stopped")
        sealed = {n: {m.SEALED: made[0].arrays[m.sealed_key(str(n))]} for n in peers}
        answers, _ = self.exchange(peers, m.KEYRECV, 0, epoch_arrays, per_node=sealed)
        received = [a.node_id for a in answers if a.reply.status == "ok"]
        members = sorted([holder, *received])
        self.holder = holder
        self._require_quorum([enrolled[n] for n in members], "key ceremony (sealed keys opened)")
        self._use_context(made[0].arrays[m.AGG_CTX].tobytes())
        self.audit.append("key.ceremony_done", self.study.id, {"holder": made[0].reply.silo, "members": len(members),
                                                               "key_epoch": epoch})
        return members

    def _saw_enrolment(self, node: int, answer: SiloAnswer) -> None:
        fingerprint = hashlib.sha256(answer.arrays[m.ENROL_PUB].tobytes()).hexdigest()
        self.fingerprints[answer.reply.silo] = fingerprint
        self.audit.append("key.enrolment_seen", answer.reply.silo, {"node": str(node), "fingerprint": fingerprint})

    def _use_context(self, context_bytes: bytes) -> None:
        """Sum ciphertexts under the study's keyless aggregator context from now on."""
        from policies.ckks import load_context, sum_encrypted_uint8

        context = load_context(context_bytes, self.study.ckks)
        self.context_bytes = context_bytes
        self.state.adder = lambda arrays: sum_encrypted_uint8(context, arrays)

    def admit_late_silos(self, nodes: list[int]) -> list[int]:
        """Silos that connect after the start join from the next round.

        Under CKKS the key holder seals the study key to each newcomer's enrolment key (pins
        apply); a newcomer normalises with the pooled statistics of the silos that started.
        """
        new = sorted(self.connected_nodes() - set(nodes) - self.not_admitted)
        if not new:
            return nodes
        if self.study.encryption == "ckks" and self.key_epoch:
            return self._not_admitted_after_rekey(nodes, new)
        joined = new
        if self.study.encryption == "ckks":
            answers, _ = self.exchange(new, m.ENROL, 0, {})
            enrolled = {a.node_id: a for a in self._ok(answers, m.ENROL_PUB)}
            sealed: dict[int, dict[str, np.ndarray]] = {}
            if enrolled and self.holder is None:  # resumed without the key holder: nobody can share the key
                enrolled = {}
            if enrolled:
                peer_keys = {m.peer_key(str(n)): a.arrays[m.ENROL_PUB] for n, a in enrolled.items()}
                shared, _ = self.exchange([self.holder], m.KEYSHARE, 0, peer_keys)
                out = shared[0].arrays if shared and shared[0].reply.status == "ok" else {}
                sealed = {n: {m.SEALED: out[m.sealed_key(str(n))]} for n in enrolled if m.sealed_key(str(n)) in out}
            answers, _ = self.exchange(sorted(sealed), m.KEYRECV, 0, {}, per_node=sealed) if sealed else ([], [])
            joined = sorted(a.node_id for a in answers if a.reply.status == "ok")
            self.names.update({n: enrolled[n].reply.silo for n in joined})
            for n in joined:
                self._saw_enrolment(n, enrolled[n])
        self.not_admitted |= set(new) - set(joined)
        for node in joined:
            name = self.names.get(node, str(node))
            self.audit.append("silo.joined_late", name, {"node": str(node), "before_round": len(self.state.aggregates) + 1})
            if self.book:
                self.book.enrol(name, node, self.fingerprints.get(name))
        return sorted([*nodes, *joined])

    def drop_disconnected(self, nodes: list[int], round_no: int) -> list[int]:
        """Nodes the SuperLink no longer counts as online (a silo killed or cut off) are not
        asked again; a silo that comes back does so as a new node, admitted like a late joiner."""
        connected = self.connected_nodes()
        for node in nodes:
            if node not in connected:
                self.audit.append("silo.disconnected", self.names.get(node, str(node)),
                                  {"node": str(node), "before_round": round_no})
        return [n for n in nodes if n in connected]

    def _key_holder(self, enrolled: dict[int, SiloAnswer]) -> int:
        """The silo the policy names as key holder, or (no name) the lowest node id."""
        wanted = self.study.ckks.key_holder
        if wanted is None:  # a re-key keeps the holder unless it left
            return self.holder if self.holder in enrolled else min(enrolled)
        for node, answer in enrolled.items():
            if answer.reply.silo == wanted:
                return node
        raise PolicyError(f"key ceremony: the policy's key holder '{wanted}' is not among the enrolled silos")

    def stats_round(self, nodes: list[int]) -> list[int]:
        answers, _ = self.exchange(nodes, m.STATS, 0, {})
        ok = self._ok(answers, m.MOMENTS, screen=(m.MOMENTS,))
        self._require_quorum(ok, "statistics round")
        self.state.add_stats([a.arrays[m.MOMENTS] for a in ok])
        self.names = {a.node_id: a.reply.silo for a in ok}
        self.validations = {a.reply.silo: v for a in ok if isinstance(v := a.reply.report_dict().get("validation"), dict)}
        return sorted(self.names)

    def _book_evaluations(self) -> None:
        """Store pooled metrics as they are revealed (model after `round - 1` rounds)."""
        if self.book is None:
            return
        for rec in self.state.rounds:
            if rec.pooled is not None and rec.round not in self._booked:
                self.book.evaluation(rec.round - 1, "pooled", rec.pooled)
                self._booked.add(rec.round)

    def _history(self) -> dict[str, np.ndarray]:
        arrays = m.history_arrays(self.state.stats_sum, self.state.aggregates)
        if self.pending_eval is not None:
            arrays[m.EVAL_SUM] = self.pending_eval[1]
        return arrays | self._key_arrays()

    def _absorb_evaluations(self, ok: list[SiloAnswer], target: RoundRecord | None) -> np.ndarray | None:
        """Take last phase's pooled counts from the silos; sum this phase's encoded evaluations.

        Silos decrypt and round the pooled sum (the coordinator cannot); every silo that
        answered must report the same counts, or they are not trusted. Returns the
        revealed counts, and keeps this phase's sum pending until the next phase reveals it.
        """
        revealed = [a.arrays[m.POOLED_EVAL] for a in ok if m.POOLED_EVAL in a.arrays]
        pooled = None
        if self.pending_eval is not None and revealed:
            if not all(r.shape == revealed[0].shape and np.allclose(r, revealed[0], atol=1e-6) for r in revealed):
                raise PolicyError("silos disagree on the pooled evaluation they decrypted; study stopped")
            pooled = revealed[0]
            if self.pending_eval[0] is not None:
                self.pending_eval[0].pooled = metrics_from_counts(pooled)
        evals = [a.arrays[m.EVAL] for a in ok if m.EVAL in a.arrays]
        self.pending_eval = (target, self.state.adder(evals)) if evals else None
        self.eval_epoch = self.key_epoch
        return pooled

    def train_round(self, nodes: list[int], round_no: int) -> None:
        t0 = time.monotonic()
        history = self._history()
        nonces = {n: self.next_nonces[self.names[n]] for n in nodes if self.names.get(n) in self.next_nonces}
        self.next_nonces = {}
        self.rejected = {}  # filled while replies are screened, shown in the round record
        answers, dropped = self.exchange(nodes, m.TRAIN, round_no, history, nonces=nonces)
        ok = self._ok(answers, m.UPDATE, screen=(m.UPDATE, m.EVAL))
        record = RoundRecord(
            round=round_no,
            asked=[self.names.get(n, str(n)) for n in nodes],
            replied=[a.reply.silo for a in ok],
            # a silo's own reason wins over "no reply" from an old node id of the same silo (restarted)
            refused={self.names.get(n, str(n)): why for n, why in dropped.items()}
            | {a.reply.silo: a.reply.reason for a in answers if a.reply.status != "ok"}
            | {silo: f"rejected by the coordinator: {why}" for silo, why in self.rejected.items()},
            bytes_down=len(nodes) * sum(np.asarray(v).nbytes for v in history.values()),
            bytes_up=sum(v.nbytes for a in answers for v in a.arrays.values()),
        )
        # a silo restarted mid-study answers from a new node: its old node's silence is not a refusal
        record.refused = {silo: why for silo, why in record.refused.items() if silo not in record.replied}
        self.state.rounds.append(record)
        self._require_quorum(ok, f"round {round_no}")
        self.state.add_round([a.arrays[m.UPDATE] for a in ok])
        self.names.update({a.node_id: a.reply.silo for a in ok})
        self._absorb_evaluations(ok, record)
        record.per_silo = {a.reply.silo: a.reply.report_dict() for a in ok}
        for a in ok:
            if a.reply.ledger_seq:
                self.ledger_witness[a.reply.silo] = (a.reply.ledger_seq, a.reply.ledger_head)
                record.privacy[a.reply.silo] = {"epsilon_spent": a.reply.epsilon_spent,
                                                "epsilon_budget": a.reply.epsilon_budget,
                                                "rounds_left": a.reply.rounds_left,
                                                "ledger_seq": a.reply.ledger_seq}  # the charge it accepted
        record.seconds = time.monotonic() - t0
        self.audit.append("round.finished", f"{self.study.id}/round-{round_no}",
                          {"asked": len(nodes), "replied": sorted(record.replied), "refused": record.refused})

    def final_round(self, nodes: list[int]) -> None:
        """Evaluate the final model, then have the silos reveal its pooled counts (rounded)."""
        answers, _ = self.exchange(nodes, m.EVALUATE, len(self.state.aggregates), self._history())
        ok = self._ok(answers, m.EVAL, screen=(m.EVAL,))
        self._require_quorum(ok, "final evaluation")
        reports = {a.reply.silo: a.reply.report_dict() for a in ok}
        self._absorb_evaluations(ok, None)
        answers, _ = self.exchange(nodes, m.REVEAL, len(self.state.aggregates),
                                   {m.EVAL_SUM: self.pending_eval[1]} | self._key_arrays())
        ok = self._ok(answers, m.POOLED_EVAL)
        self._require_quorum(ok, "final evaluation (reveal)")
        self.state.final = final_evaluation(self._absorb_evaluations(ok, None), reports)

    # ---- the study ----------------------------------------------------------------------
    def write(self, status: str, reason: str = "") -> None:
        summary = self.state.summary() | {"status": status, "reason": reason, "planned_rounds": self.study.training.rounds,
                                          "pid": os.getpid(), "flower_run_id": None if self.run_id is None else str(self.run_id)}
        tmp = self.out_dir / "summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2, default=float))
        os.replace(tmp, self.out_dir / "summary.json")

    def run(self, resume_from: CheckpointRow | None = None) -> None:
        """Run the study, or continue it from its last checkpoint (a new Flower run after a crash)."""
        if resume_from is None:
            self.audit.append("study.started", self.study.id, {"policy_hash": self.state.policy_hash,
                                                               "rounds": self.study.training.rounds})
        try:
            if resume_from is None:
                nodes = self.begin()
                first = 1
            else:
                nodes = self.resume(resume_from)
                first = resume_from.round_no + 1
            if self.book:
                self.book.fingerprints, self.book.validations = self.fingerprints, self.validations
                self.book.start({self.names[n]: n for n in nodes})
            for r in range(first, self.study.training.rounds + 1):
                if self.book:
                    self.write(f"round {r} waiting for approval")
                    self.book.approve(r)
                nodes = self.drop_departed(nodes)  # revoked (re-key) or withdrawn since the last round
                nodes = self.admit_late_silos(self.drop_disconnected(nodes, r))  # after the wait: who is there now
                if self.book:
                    self.book.round_started(r, [self.names.get(n, str(n)) for n in nodes], self.run_id)
                self.write(f"round {r} running")
                self.train_round(nodes, r)
                if self.book:
                    self.book.round_finished(self.state.rounds[-1])
                    self._book_evaluations()
                self.checkpoint(r, nodes)
            self.write("final evaluation")
            self.final_round(nodes)
            self._book_final()
            self.audit.append("study.completed", self.study.id, {"rounds": len(self.state.aggregates)})
            self.end("completed")
        except PolicyError as exc:
            self.audit.append("study.stopped", self.study.id, {"reason": str(exc)[:500]})
            self.end("stopped", str(exc))

    # ---- the end of a study ---------------------------------------------------------------
    def end(self, status: str, reason: str = "") -> None:
        """Record the outcome in the store, witness final audit heads with every silo, then
        publish the summary (what tests and the demo wait for)."""
        if self.book:
            self.book.finish(status, reason)
        released = status == "completed" and self.release_if_requested()
        self.close_study("released" if released else status)  # "released"/"stopped": silos destroy the keys
        self.write(status, reason)

    def release_if_requested(self) -> bool:
        """A model release the lead requested while the study ran is delivered now, before the
        closing exchange (coordinator/release.py). Whether the model was released."""
        from coordinator.release import release_if_requested

        return release_if_requested(self, self._study_nodes())

    def _study_nodes(self) -> list[int]:
        """Silos that took part and are still connected (every connected one if the study
        stopped before any took part)."""
        connected = self.connected_nodes()
        members = set(self.names) | ({self.holder} if self.holder is not None else set())
        return sorted(((members or connected - self.not_admitted) & connected) - set(self.departed))

    def close_study(self, outcome: str) -> None:
        """Closing exchange: send every silo the coordinator's final audit head; each logs it
        and answers with its own final head, which the coordinator logs (`audit.witnessed`,
        then `study.closed` naming every head and who did not answer).

        Bounded by CLOSE_TIMEOUT and never fatal: the outcome is already on record, and a
        silo that does not answer is named in `study.closed` rather than waited for.
        """
        final_seq, final_head = self.audit.head()
        heads: dict[str, dict] = {}
        silent: list[str] = []
        timeout, self.timeout = self.timeout, min(self.timeout, CLOSE_TIMEOUT)
        try:
            nodes = self._study_nodes()
            outcome_arrays = {m.OUTCOME: np.frombuffer(outcome.encode(), dtype=np.uint8)}  # see silo_node.service._close
            answers, dropped = self.exchange(nodes, m.CLOSE, len(self.state.aggregates), outcome_arrays) if nodes else ([], [])
            ok = {a.node_id: a for a in answers if a.reply.status == "ok"}
            heads = {a.reply.silo: {"seq": a.reply.audit_seq, "head": a.reply.audit_head} for a in ok.values()}
            why = dict(dropped) | {a.node_id: f"refused: {a.reply.reason[:200]}" for a in answers if a.node_id not in ok}
            who = self.names | {a.node_id: a.reply.silo for a in answers}
            silent = sorted(f"{who.get(n, str(n))}: {why.get(n, 'reply rejected')}" for n in nodes if n not in ok)
        except Exception as exc:  # transport failure at the very end: record it, keep the outcome
            silent = [f"closing exchange failed: {type(exc).__name__}: {str(exc)[:200]}"]
        finally:
            self.timeout = timeout
        self.audit.append("study.closed", self.study.id, {"outcome": outcome, "final_seq": final_seq,
                                                          "final_head": final_head, "silo_heads": heads,
                                                          "no_final_head": silent})

    def begin(self) -> list[int]:
        """Key ceremony and statistics round; checkpointed as round 0."""
        self.write("waiting for silos")
        nodes = self.wait_for_silos()
        if self.study.encryption == "ckks":
            self.write("key ceremony")
            nodes = self.key_ceremony(nodes)
        self.write("statistics round")
        nodes = self.stats_round(nodes)
        self.checkpoint(0, nodes)
        return nodes

    # ---- checkpoint and resume -----------------------------------------------------------
    def checkpoint(self, round_no: int, nodes: list[int]) -> None:
        """Keep exactly what the coordinator may hold, so a new run can continue after `round_no`.

        The summed history (ciphertexts under CKKS), the pending evaluation sum, the keyless
        aggregator context, who is in, the enrolment-key fingerprints and ledger heads seen,
        and the nonces the next round will use. Never a key, weights or optimiser state:
        silos rebuild the model from the history themselves.
        """
        self.next_nonces = {self.names.get(n, str(n)): m.new_nonce() for n in nodes}
        arrays: dict[str, np.ndarray] = {}
        if self.pending_eval is not None:
            arrays[m.EVAL_SUM] = self.pending_eval[1]
        if self.context_bytes is not None:
            arrays[m.AGG_CTX] = np.frombuffer(self.context_bytes, dtype=np.uint8)
        silos_in = sorted(self.names.get(n, str(n)) for n in nodes)
        meta = {
            "round": round_no, "run_id": None if self.run_id is None else str(self.run_id), "silos_in": silos_in,
            "holder": self.names.get(self.holder) if self.holder is not None else None,
            "fingerprints": self.fingerprints, "nodes": {self.names.get(n, str(n)): str(n) for n in nodes},
            "witness": {silo: list(w) for silo, w in self.ledger_witness.items()},
            "eval_target": None if self.pending_eval is None or self.pending_eval[0] is None else self.pending_eval[0].round,
            "next_nonces": self.next_nonces,
            **self._key_meta(),
        }
        blob = self.state.to_checkpoint(arrays, meta)
        if self.book:
            self.book.checkpoint(round_no, blob, silos_in)
        self.audit.append("checkpoint.saved", f"{self.study.id}/round-{round_no}", {
            "round": round_no, "sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob), "silos_in": silos_in})

    def resume(self, row: CheckpointRow) -> list[int]:
        """Continue from a checkpoint: restore the sums, find which connected node is which silo.

        Node ids change when the SuperLink restarted, so every connected node is asked for
        its enrolment key again; a silo is back in only with the key the ceremony saw.
        """
        state, arrays, meta = StudyState.from_checkpoint(row.encrypted_state, self.study.id, self.state.policy_hash)
        state.adder = self.state.adder
        self.state = state
        if m.AGG_CTX in arrays:
            self._use_context(arrays[m.AGG_CTX].tobytes())
        if m.EVAL_SUM in arrays:
            target = next((r for r in state.rounds if r.round == meta.get("eval_target")), None)
            self.pending_eval = (target, arrays[m.EVAL_SUM])
        self._booked = {r.round for r in state.rounds if r.pooled is not None}
        self.fingerprints = dict(meta.get("fingerprints") or {})
        self.next_nonces = dict(meta.get("next_nonces") or {})
        self._restore_key_meta(meta)
        reopened = self.book.reopen_after(row.round_no) if self.book else []
        self.audit.append("study.resumed", self.study.id, {
            "old_run_id": meta.get("run_id"), "new_run_id": None if self.run_id is None else str(self.run_id),
            "resumed_from_round": row.round_no, "checkpoint_sha256": hashlib.sha256(row.encrypted_state).hexdigest(),
            "rounds_to_rerun": reopened, "silos_in": meta.get("silos_in", [])})
        self.write(f"resuming after round {row.round_no}: waiting for silos")
        nodes = self.wait_for_silos()
        members = self._identify(nodes, set(meta.get("silos_in", [])))
        self._require_quorum(members, f"resume after round {row.round_no}")
        witness = meta.get("witness") or {}
        for a in members:
            if a.reply.silo in witness:
                self.ledger_witness[a.reply.silo] = (int(witness[a.reply.silo][0]), str(witness[a.reply.silo][1]))
            if a.reply.silo == meta.get("holder"):
                self.holder = a.node_id
        self.names = {a.node_id: a.reply.silo for a in members}
        return sorted(self.names)

    def _identify(self, nodes: list[int], silos_in: set[str]) -> list[SiloAnswer]:
        """The connected nodes that are silos of this study, each with the enrolment key it had."""
        answers, _ = self.exchange(nodes, m.ENROL, 0, {})
        members: dict[str, SiloAnswer] = {}
        for a in self._ok(answers, m.ENROL_PUB):
            fingerprint = hashlib.sha256(a.arrays[m.ENROL_PUB].tobytes()).hexdigest()
            known = self.fingerprints.get(a.reply.silo)
            if a.reply.silo not in silos_in:
                continue  # not in the study at the checkpoint: may join late, next round
            if known is not None and known != fingerprint:
                self._reject(a, "enrolment key differs from the one this silo had in the key ceremony")
            elif a.reply.silo in members:
                self._reject(a, "another node already answered for this silo")
            else:
                members[a.reply.silo] = a
        self.not_admitted |= {a.node_id for a in answers if a.reply.silo in silos_in and a not in members.values()}
        return list(members.values())

    # ---- key lifecycle: revocation, re-keying, withdrawal -------------------------------------
    def _refuse_revoked(self, node: int, claimed: str) -> None:
        """Belt and braces after the SuperLink's own refusal: nothing from a revoked silo's node or name counts."""
        revoked = self.book.revoked() if self.book else {}
        if node in revoked or claimed in revoked.values():
            raise ValueError(f"silo {revoked.get(node, claimed)!r} (node {node}) was revoked: its replies are rejected")

    def _note_withdrawal(self, node: int, reply: m.Reply) -> None:
        """A refusal saying the silo withdrew: record it (audit, store) and never ask that silo again."""
        if reply.status != "refused" or not m.is_withdrawal(reply.reason) or node in self.departed:
            return
        self.departed[node] = "withdrawn"
        self.not_admitted.add(node)
        self.audit.append("silo.withdrew", reply.silo, {"node": str(node), "round": reply.round,
                                                        "reason": reply.reason[:300]})
        if self.book:
            self.book.withdrawn(reply.silo)

    def drop_departed(self, nodes: list[int]) -> list[int]:
        """Before a round: leave out silos revoked since the last round (then re-key a CKKS study
        for the rest) and those that withdrew; the study goes on while the minimum holds."""
        revoked = self.book.revoked() if self.book else {}
        newly = [n for n in nodes if n not in self.departed and (n in revoked or self.names.get(n) in revoked.values())]
        for node in newly:
            self.departed[node] = "revoked"
            self.audit.append("silo.dropped", self.names.get(node, str(node)), {
                "node": str(node), "why": "revoked", "before_round": len(self.state.aggregates) + 1})
        remaining = [n for n in nodes if n not in self.departed]
        if len(remaining) == len(nodes):
            return nodes
        self.not_admitted |= set(nodes) - set(remaining)
        if len(remaining) < self.study.min_silos:
            raise PolicyError(f"{len(nodes) - len(remaining)} silos left (revoked or withdrawn): {len(remaining)} "
                              f"remain, the study needs {self.study.min_silos}; study stopped")
        if newly and self.study.encryption == "ckks":
            remaining = self.rekey(remaining, sorted(self.names.get(n, str(n)) for n in newly))
        return remaining

    def rekey(self, nodes: list[int], revoked: list[str]) -> list[int]:
        """A new key ceremony among the remaining silos: new CKKS key from the holder (or a new
        holder if the holder left), sealed only to them; aggregates from the next round on are
        under it. Silos keep earlier epochs' keys to replay the history made under them."""
        epoch = self.key_epoch + 1
        self.write(f"re-keying after revocation of {', '.join(revoked)}")
        members = [n for n in self.key_ceremony(nodes, epoch) if n not in self.departed]
        self._require_quorum(members, f"re-key (key epoch {epoch})")
        self.key_epoch, self.epoch_starts[epoch] = epoch, len(self.state.aggregates) + 1
        self.audit.append("key.rekeyed", self.study.id, {
            "key_epoch": epoch, "revoked": revoked, "holder": self.names.get(self.holder, str(self.holder)),
            "sealed_to": sorted(self.names.get(n, str(n)) for n in members if n != self.holder),
            "from_round": self.epoch_starts[epoch]})
        return sorted(members)

    def _not_admitted_after_rekey(self, nodes: list[int], new: list[int]) -> list[int]:
        """Sharing every key epoch with a newcomer is not built: after a re-key nobody joins late."""
        self.not_admitted |= set(new)
        for node in new:
            self.audit.append("silo.not_admitted", f"node-{node}", {
                "node": str(node), "reason": f"the study was re-keyed (key epoch {self.key_epoch}); late joining "
                                             "after a re-key is not supported"})
        return nodes

    def _epoch_of_round(self, round_no: int) -> int:
        return max((e for e, start in self.epoch_starts.items() if start <= round_no), default=0)

    def _key_arrays(self) -> dict[str, np.ndarray]:
        """Which key epoch silos encrypt under and each sum was made under (nothing until a re-key)."""
        if not self.epoch_starts:
            return {}
        epochs = [0] + [self._epoch_of_round(r) for r in range(1, len(self.state.aggregates) + 1)]
        out = {m.KEY_EPOCH: np.array([self.key_epoch], dtype=np.int64), m.KEY_EPOCHS: np.array(epochs, dtype=np.int64)}
        if self.pending_eval is not None:
            out[m.EVAL_EPOCH] = np.array([self.eval_epoch], dtype=np.int64)
        return out

    def _key_meta(self) -> dict:
        return {"key_epoch": self.key_epoch, "epoch_starts": {str(e): r for e, r in self.epoch_starts.items()},
                "eval_epoch": self.eval_epoch,
                "departed": {self.names.get(n, str(n)): why for n, why in self.departed.items()}}

    def _restore_key_meta(self, meta: dict) -> None:
        self.key_epoch, self.eval_epoch = int(meta.get("key_epoch", 0)), int(meta.get("eval_epoch", 0))
        self.epoch_starts = {int(e): int(r) for e, r in (meta.get("epoch_starts") or {}).items()}

    def _book_final(self) -> None:
        if self.book is None or self.state.final is None:
            return
        self._book_evaluations()
        rounds = len(self.state.aggregates)
        self.book.evaluation(rounds, "pooled", self.state.final["pooled"])
        for silo, report in self.state.final["per_silo"].items():
            self.book.evaluation(rounds, silo, report)


def _split(decoded: dict[int, SiloAnswer | str], nodes: list[int]) -> tuple[list[SiloAnswer], dict[int, str]]:
    """Answers, and for every other node asked why it has none ("no reply in time" if silent)."""
    answers = [a for a in decoded.values() if isinstance(a, SiloAnswer)]
    missing = {n: why for n, why in decoded.items() if isinstance(why, str)}
    return answers, missing | {n: "no reply in time" for n in nodes if n not in decoded}


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    out_dir = Path(str(cfg["state-dir"])) / "coordinator"
    if hold_study_lock(out_dir) is None:  # kept for this process's life
        raise SystemExit(f"another ServerApp is running the study in {out_dir}; not starting a second one")
    study = load_study(str(cfg["study-path"]))
    runner = StudyRunner(
        grid, study, Path(str(cfg["state-dir"])) / "coordinator",
        timeout=float(cfg.get("reply-timeout", 600.0)), poll=float(cfg.get("poll-interval", 0.25)),
        expected=int(cfg.get("expected-silos", study.min_silos)),
        transport=str(cfg.get("transport", "push-pull")),
    )
    study_path = Path(str(cfg["study-path"]))
    if str(cfg.get("mode", "study")) == "release":  # `coordinator study release`: deliver the lead's request
        from coordinator.release import serve_release
        from coordinator.store import open_store

        runner.run_id = int(grid.run.run_id)
        with open_store(str(cfg.get("db-url", "")) or None, Path(str(cfg["state-dir"]))) as store:
            serve_release(runner, store)
        return
    try:
        runner.book = StudyBook(Path(str(cfg["state-dir"])), study, study_path.read_text(), runner.audit,
                                db_url=str(cfg.get("db-url", "")) or None)
    except PolicyError as exc:
        runner.write("stopped", str(exc))
        return
    runner.run_id = int(grid.run.run_id)
    runner.run(resume_from=runner.book.last_checkpoint())
