"""The silo's resident service: the process that holds the cohort and does the work.

Flower starts a fresh ClientApp process for every message; loading torch, pandas and
the cohort there costs seconds per round. The silo instead runs one long-lived service
(started by `silo-node start`) and the ClientApp only relays each request to it over a
Unix socket in the silo's state directory, authenticated with a per-silo key file
(mode 0600). Work, refusals and (later) keys and the privacy ledger stay in a process
the silo owns.
"""

from __future__ import annotations

import hashlib
import json
import os
import traceback
from multiprocessing.connection import Listener
from pathlib import Path
from typing import Callable

import numpy as np
from pydantic import ValidationError

from policies import messages as m
from policies.audit import AuditLog, open_party_log
from policies.errors import PolicyError
from policies.validation import suppress
from silo_node.outbox import Outbox
from silo_node.service_socket import Payload, authkey, call, socket_path  # noqa: F401  (call: the relay's side)

UNSENT_ACTION = "privacy.released_but_lost"


def handle(silo, log: AuditLog, kind: str, header: dict, arrays: dict[str, np.ndarray]) -> Payload:
    """Answer one request; every PolicyError becomes a refusal that names its reason.

    The silo's own audit log records the coordinator's chain head and clock it saw, and
    what it answered; the reply carries the silo's head for the coordinator to witness.
    A request that uses the cohort is refused if the cohort file changed since start.
    If the silo cannot write its own audit log (a full disk), nothing but a refusal
    leaves, and that refusal says why, so the coordinator records what the silo could not.
    """
    try:
        req = m.Request.model_validate(header)
    except (ValidationError, TypeError) as exc:  # no request to refuse: log why and answer with an error
        reason = f"malformed request header ({_problems(exc)}): refused"
        log.append("request.malformed", "coordinator", {"kind": str(kind)[:60], "reason": reason[:500]})
        return {"error": reason}, {}
    subject = f"{req.study_id}/round-{req.round}"
    known = isinstance(kind, str) and kind in _WORK
    try:
        if req.audit_seq:
            log.witness("coordinator", req.audit_seq, req.audit_head)
        if not known:
            raise PolicyError(f"unknown request kind {str(kind)[:60]!r}; this silo answers {', '.join(sorted(_WORK))}")
        silo.check(req)  # study, policy hash, approval: before any array is looked at
        check_request_arrays(silo.study, kind, arrays)
        _use_key_epochs(silo, arrays)
        if kind in _USES_COHORT:
            silo.check_cohort()
        out, counts, privacy = _WORK[kind](silo, req, arrays)
        reply, action = silo.reply(req, counts, privacy), f"{kind.split('.')[-1]}.replied"
        if kind == m.STATS and getattr(silo, "validation", None):  # the study lead's Silos page shows it
            reply = reply.model_copy(update={"report": json.dumps({"validation": silo.validation})})
        details = {"epsilon_spent": privacy["epsilon_spent"], "ledger_seq": privacy["ledger_seq"]} if privacy else {}
    except PolicyError as exc:
        out, reply = {}, m.refusal(req, silo.name, str(exc))
        action = f"{kind.split('.')[-1]}.refused" if known else "request.refused"  # never a name the sender chose
        details = {"reason": str(exc)[:500]}
    except (ValueError, TypeError, IndexError, KeyError) as exc:  # arrays that passed the checks but do not fit
        traceback.print_exc()  # the details stay here: a message could quote a value from the cohort
        reason = f"the request could not be processed ({type(exc).__name__}); details are in the silo's own log"
        out, reply = {}, m.refusal(req, silo.name, reason)
        action, details = f"{kind.split('.')[-1]}.refused", {"reason": reason}
    try:
        entry = log.append(action, subject, details | {"nonce": req.nonce, "coordinator_time": req.sent_at})
    except PolicyError as exc:  # the audit is append-only and fails whole: it was left as it was
        before = f"{reply.reason}; " if reply.status != "ok" else ""
        lost = m.refusal(req, silo.name, f"{before}this silo cannot write its audit log ({exc}): nothing sent")
        return lost.model_dump(), {}
    return reply.model_copy(update={"audit_seq": entry.seq, "audit_head": entry.hash}).model_dump(), out


def _problems(exc: Exception) -> str:
    """Which header fields are wrong, in pydantic's words, without echoing their values."""
    if isinstance(exc, ValidationError):
        return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'header'}: {e['msg']}" for e in exc.errors()[:5])
    return f"{type(exc).__name__}: the header is not a mapping"


def _history_array(name: str) -> bool:
    return name in (m.STATS_SUM, m.EVAL_SUM) or (name.startswith("agg_") and name[4:].isdigit())


def check_request_arrays(study, kind: str, arrays: dict) -> None:
    """Refuse garbage arrays by name, shape, type, count and size before any work uses them.

    History vectors must be flat and of the study's encoding (float64 plaintext, uint8
    ciphertext); keys and sealed blobs are bytes; a history longer than the study's rounds
    cannot be real. Contents are then checked where they are parsed (CKKS blobs, sums).
    """
    m.check_array_bytes(arrays, f"{kind} request")
    encoded = np.dtype(np.uint8) if study.encryption == "ckks" else np.dtype(np.float64)
    for name, arr in arrays.items():
        if _history_array(name):
            want = encoded
        elif name == m.SEALED or name == m.OUTCOME or name.startswith("peer_"):
            want = np.dtype(np.uint8)
        elif name in (m.KEY_EPOCH, m.KEY_EPOCHS, m.EVAL_EPOCH):  # small integer vectors, checked where read
            want = np.dtype(np.int64)
        else:
            raise PolicyError(f"{kind} request carries an unknown array {str(name)[:40]!r}: refused")
        if not isinstance(arr, np.ndarray) or arr.ndim != 1 or arr.dtype != want:
            shape = f"{arr.dtype} {arr.shape}" if isinstance(arr, np.ndarray) else type(arr).__name__
            raise PolicyError(f"{kind} request array '{name}' is {shape}, not a flat {want} vector: refused")
    rounds = sum(1 for name in arrays if name.startswith("agg_"))
    if rounds > study.training.rounds:
        raise PolicyError(f"{kind} request carries {rounds} aggregates, the study has {study.training.rounds} "
                          "rounds: refused")


def _bytes(arr: np.ndarray) -> bytes:
    return np.ascontiguousarray(arr, dtype=np.uint8).tobytes()


def _u8(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8).copy()


def _enrol(silo, req: m.Request, arrays: dict) -> tuple[dict, None, None]:
    return {m.ENROL_PUB: _u8(silo.enrolment_public())}, None, None


def _keygen(silo, req: m.Request, arrays: dict) -> tuple[dict, None, None]:
    peers = {k[len("peer_"):]: _bytes(v) for k, v in arrays.items() if k.startswith("peer_")}
    aggregator, sealed = silo.make_study_key(peers, m.epoch_of(arrays, m.KEY_EPOCH))
    _log_sealing(silo, peers, sealed)
    return {m.AGG_CTX: _u8(aggregator), **{m.sealed_key(p): _u8(b) for p, b in sealed.items()}}, None, None


def _keyshare(silo, req: m.Request, arrays: dict) -> tuple[dict, None, None]:
    peers = {k[len("peer_"):]: _bytes(v) for k, v in arrays.items() if k.startswith("peer_")}
    sealed = silo.share_study_key(peers)
    _log_sealing(silo, peers, sealed)
    return {m.sealed_key(p): _u8(b) for p, b in sealed.items()}, None, None


def _log_sealing(silo, peers: dict[str, bytes], sealed: dict[str, bytes]) -> None:
    """The key holder's record of each key it sealed the study key to, and each it refused."""
    if silo.audit is None:
        return
    for peer in sorted(peers):
        action = "key.sealed" if peer in sealed else "key.refused_unpinned"  # unpinned: possibly substituted
        silo.audit.append(action, f"node-{peer}", {"fingerprint": hashlib.sha256(peers[peer]).hexdigest()})


def _keyrecv(silo, req: m.Request, arrays: dict) -> tuple[dict, None, None]:
    """Open the sealed study key; the log names the key that sealed it (a refusal is logged by `handle`)."""
    if m.SEALED not in arrays:
        raise PolicyError("key ceremony: the request carries no sealed study key")
    epoch = m.epoch_of(arrays, m.KEY_EPOCH)
    sender, pinned = silo.receive_study_key(_bytes(arrays[m.SEALED]), epoch)
    if silo.audit is not None:
        silo.audit.append("key.received", req.study_id, {
            "sealed_by_fingerprint": hashlib.sha256(sender).hexdigest(), "holder_pinned": pinned}
            | ({"key_epoch": epoch} if epoch else {}))
    return {}, None, None


def _with_reveal(silo, arrays: dict, out: dict) -> dict:
    """Piggyback: decrypt last phase's pooled evaluation sum, rounded, if one was sent."""
    if m.EVAL_SUM in arrays:
        out[m.POOLED_EVAL] = silo.reveal(arrays[m.EVAL_SUM])
    return out


def _stats(silo, req: m.Request, arrays: dict) -> tuple[dict, None, dict | None]:
    result = silo.release_stats(req.nonce)  # under DP: noised, and charged before it is returned
    return {m.MOMENTS: result.moments}, None, result.privacy


def _train(silo, req: m.Request, arrays: dict) -> tuple[dict, np.ndarray, dict | None]:
    witness = (req.ledger_seq, req.ledger_head) if req.ledger_seq else None
    result = silo.train(req.round, arrays.get(m.STATS_SUM), m.aggregates_from_arrays(arrays), req.nonce, witness)
    out = {m.UPDATE: result.update, m.EVAL: silo.encode_eval(result.counts)}
    return _with_reveal(silo, arrays, out), result.counts, result.privacy


def _evaluate(silo, req: m.Request, arrays: dict) -> tuple[dict, np.ndarray, None]:
    counts = silo.evaluate(arrays.get(m.STATS_SUM), m.aggregates_from_arrays(arrays))
    return _with_reveal(silo, arrays, {m.EVAL: silo.encode_eval(counts)}), counts, None


def _reveal(silo, req: m.Request, arrays: dict) -> tuple[dict, None, None]:
    return _with_reveal(silo, arrays, {}), None, None


def _close(silo, req: m.Request, arrays: dict) -> tuple[dict, None, None]:
    """Closing exchange: nothing to compute. `handle` has already logged the coordinator's
    final head (`audit.witnessed`) and logs `close.replied` after it; that entry's head,
    which chains over the witnessed one, is the silo's final head in the reply."""
    if not req.audit_seq:
        raise PolicyError("closing exchange without the coordinator's audit head: nothing to witness")
    _destroy_keys_at_end(silo, arrays)
    return {}, None, None


# ---- key lifecycle -------------------------------------------------------------------------
def _use_key_epochs(silo, arrays: dict) -> None:
    """Which key epoch each sum in the request was made under (after a re-key they differ)."""
    if hasattr(silo, "use_key_epochs"):
        silo.use_key_epochs(arrays)


def _destroy_keys_at_end(silo, arrays: dict) -> None:
    """A stopped study's key material goes now, and so does a released one's (its model has
    left: nothing more to decrypt). A completed study's keys stay until its release succeeds
    or silo IT runs `silo-node keys destroy`: a failed release may be asked again."""
    outcome = bytes(_bytes(arrays[m.OUTCOME])).decode("utf-8", "replace") if m.OUTCOME in arrays else ""
    why = {"stopped": "study stopped (closing exchange)", "released": "model released (closing exchange)"}.get(outcome)
    if why is None or getattr(silo, "state_dir", None) is None or silo.study.encryption != "ckks":
        return
    from silo_node.key_lifecycle import destroy_study_secret

    destroy_study_secret(silo.state_dir, silo.study.id, why, party=silo.name)


_USES_COHORT = frozenset({m.STATS, m.TRAIN, m.EVALUATE})  # checked against the cohort's fingerprint first

def _release(silo, req: m.Request, arrays: dict) -> tuple[dict, None, None]:
    """Model release: consent checked, final model rounded and sent (silo_node/release.py)."""
    from silo_node.release import release_model

    return release_model(silo, req, arrays)


_WORK: dict[str, Callable] = {
    m.ENROL: _enrol, m.KEYGEN: _keygen, m.KEYSHARE: _keyshare, m.KEYRECV: _keyrecv, m.STATS: _stats,
    m.TRAIN: _train, m.EVALUATE: _evaluate, m.REVEAL: _reveal, m.CLOSE: _close, m.RELEASE: _release,
}


def serve(state_dir: Path, silo, stop: Callable[[], bool] = lambda: False) -> None:
    """Serve relayed requests one at a time until `stop()` is true."""
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    path = socket_path(state_dir)
    if path.exists():
        path.unlink()
    log = open_party_log(state_dir, silo.name, "silo")
    silo.audit = log
    # Replies kept for resends; a coordinator restarted mid-round first asks who is who
    # (enrol) and then resends the round, so more than the last reply is kept.
    outbox = Outbox(state_dir, durable=frozenset({m.TRAIN}))
    log.append("silo.started", silo.study.id, {
        "policy_hash": silo.study.policy_hash(),
        "train_rows": suppress(len(silo.design.train_idx), silo.study.small_cell_min),
        "cohort_sha256": silo.cohort.sha256 if getattr(silo, "cohort", None) else None,
    })
    record_unsent_charges(silo, log)
    with Listener(str(path), family="AF_UNIX", authkey=authkey(state_dir, create=True)) as listener:
        os.chmod(path, 0o600)
        while not stop():
            try:
                conn = listener.accept()
            except (OSError, EOFError):
                continue
            with conn:
                header: object = {}
                try:
                    kind, header, arrays = conn.recv()
                    key = _outbox_key(kind, header)
                    reply = outbox.get(key) if key else None
                    if reply is None:
                        reply = handle(silo, log, kind, header, arrays)
                        if key and reply[0].get("status") == "ok":  # refusals are recomputed (charges are
                            try:  # per nonce), so garbage cannot evict a reply kept for a resend
                                outbox.put(key, reply)  # a train reply is on disk before it leaves
                            except PolicyError as exc:  # e.g. a full disk: it must not leave
                                reply = _unsent(log, reply, str(exc))
                    else:  # a resend of the same request costs nothing
                        log.append("request.resent", f"{header.get('study_id')}/round-{key[1]}",
                                   {"kind": kind, "nonce": key[2], "answered_from": "outbox: nothing recomputed or charged"})
                    conn.send(reply)
                except (EOFError, OSError):
                    continue
                except Exception as exc:  # the service must outlive one bad request
                    # the traceback stays in this silo's own log; the coordinator gets the type only
                    traceback.print_exc()
                    conn.send(_failure(silo.name, header if isinstance(header, dict) else {}, exc))


def _unsent(log: AuditLog, payload: Payload, why: str) -> Payload:
    """A reply that could not be kept for resends is not sent: a refusal goes instead, and a
    charge it carried is recorded as released-but-lost (best effort: the disk may be full)."""
    reply = m.Reply.model_validate(payload[0])
    if reply.ledger_seq:
        try:
            log.append(UNSENT_ACTION, f"{reply.study_id}/round-{reply.round}", {
                "ledger_seq": reply.ledger_seq, "nonce": reply.nonce, "epsilon_after": reply.epsilon_spent,
                "why": "the reply could not be kept on disk before sending; the spend stands"})
        except PolicyError:
            pass  # record_unsent_charges cannot tell this one apart: its train.replied entry exists
    refused = reply.model_copy(update={
        "status": "refused", "reason": f"could not keep the reply on disk before sending ({why[:300]}): nothing sent",
        "report": "{}", "ledger_seq": 0, "ledger_head": "", "epsilon_spent": None, "epsilon_budget": None,
        "rounds_left": None})
    return refused.model_dump(), {}


def _failure(name: str, header: dict, exc: Exception) -> Payload:
    """A refusal the coordinator can record (it names only the error's type), when the
    request itself parses; otherwise a bare error."""
    reason = f"{type(exc).__name__} in silo service"
    try:
        return m.refusal(m.Request.model_validate(header), name, reason).model_dump(), {}
    except ValueError:
        return {"error": reason}, {}


def record_unsent_charges(silo, log: AuditLog) -> None:
    """At start, log each privacy charge whose release this silo never recorded as sent.

    A charge is on disk before its update leaves, so a silo killed in between keeps a
    charge for an update nobody received. The spend stands (it cannot be taken back
    safely: the silo cannot know how far the update got); this entry makes it visible:
    `privacy.released_but_lost`, once per charge. A charge counts as sent when a
    `*.replied` entry names its ledger seq; a late joiner's own statistics charge is never
    sent by design (only its noised count, as the weight inside its update).
    """
    from silo_node.ledger import LATE_JOIN_NONCE

    if silo.study.dp is None:
        return
    try:
        charges = silo.ledger().state.charges
        entries = list(log.entries())
    except PolicyError:
        return  # a ledger or log that cannot be read is refused at the next round, with the reason
    sent = {e.details.get("ledger_seq") for e in entries if e.action in ("train.replied", "stats.replied")}
    known = {e.details.get("ledger_seq") for e in entries if e.action == UNSENT_ACTION}
    for c in charges:
        if c.seq in sent or c.seq in known or c.nonce == LATE_JOIN_NONCE:
            continue
        log.append(UNSENT_ACTION, f"{silo.study.id}/round-{c.round}", {
            "ledger_seq": c.seq, "nonce": c.nonce, "kind": c.kind, "epsilon_after": c.epsilon_after,
            "why": "charged, then the silo stopped before recording the reply as sent; the spend stands"})


def _outbox_key(kind: object, header: object) -> tuple[str, int, str] | None:
    """(kind, round, nonce) of a well-formed request; None for one `handle` will refuse anyway."""
    if not isinstance(kind, str) or kind not in _WORK or not isinstance(header, dict):
        return None
    round_no, nonce = header.get("round"), header.get("nonce")
    if not isinstance(round_no, int) or not isinstance(nonce, str) or len(nonce) > 200:
        return None
    return kind, round_no, nonce

