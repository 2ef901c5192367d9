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
import secrets
import traceback
from multiprocessing.connection import Client, Listener
from pathlib import Path
from typing import Callable

import numpy as np

from policies import messages as m
from policies.audit import AuditLog, open_party_log
from policies.errors import PolicyError
from policies.validation import suppress
from silo_node.outbox import Outbox

SOCKET_NAME = "silo.sock"
KEY_NAME = "silo.key"

Payload = tuple[dict, dict[str, np.ndarray]]


def socket_path(state_dir: Path) -> Path:
    return Path(state_dir) / SOCKET_NAME


def _authkey(state_dir: Path, create: bool) -> bytes:
    path = Path(state_dir) / KEY_NAME
    if create:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32))
    return path.read_text().strip().encode()


def handle(silo, log: AuditLog, kind: str, header: dict, arrays: dict[str, np.ndarray]) -> Payload:
    """Answer one request; every PolicyError becomes a refusal that names its reason.

    The silo's own audit log records the coordinator's chain head and clock it saw, and
    what it answered; the reply carries the silo's head for the coordinator to witness.
    """
    req = m.Request.model_validate(header)
    if req.audit_seq:
        log.witness("coordinator", req.audit_seq, req.audit_head)
    subject = f"{req.study_id}/round-{req.round}"
    try:
        silo.check(req)
        out, counts, privacy = _WORK[kind](silo, req, arrays)
        reply, action = silo.reply(req, counts, privacy), f"{kind.split('.')[-1]}.replied"
        if kind == m.STATS and getattr(silo, "validation", None):  # the study lead's Silos page shows it
            reply = reply.model_copy(update={"report": json.dumps({"validation": silo.validation})})
        details = {"epsilon_spent": privacy["epsilon_spent"], "ledger_seq": privacy["ledger_seq"]} if privacy else {}
    except PolicyError as exc:
        out, reply = {}, m.refusal(req, silo.name, str(exc))
        action, details = f"{kind.split('.')[-1]}.refused", {"reason": str(exc)[:500]}
    entry = log.append(action, subject, details | {"nonce": req.nonce, "coordinator_time": req.sent_at})
    return reply.model_copy(update={"audit_seq": entry.seq, "audit_head": entry.hash}).model_dump(), out


def _bytes(arr: np.ndarray) -> bytes:
    return np.ascontiguousarray(arr, dtype=np.uint8).tobytes()


def _u8(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8).copy()


def _enrol(silo, req: m.Request, arrays: dict) -> tuple[dict, None, None]:
    return {m.ENROL_PUB: _u8(silo.enrolment_public())}, None, None


def _keygen(silo, req: m.Request, arrays: dict) -> tuple[dict, None, None]:
    peers = {k[len("peer_"):]: _bytes(v) for k, v in arrays.items() if k.startswith("peer_")}
    aggregator, sealed = silo.make_study_key(peers)
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
    sender, pinned = silo.receive_study_key(_bytes(arrays[m.SEALED]))
    if silo.audit is not None:
        silo.audit.append("key.received", req.study_id, {
            "sealed_by_fingerprint": hashlib.sha256(sender).hexdigest(), "holder_pinned": pinned})
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
    return {}, None, None


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
    })
    with Listener(str(path), family="AF_UNIX", authkey=_authkey(state_dir, create=True)) as listener:
        os.chmod(path, 0o600)
        while not stop():
            try:
                conn = listener.accept()
            except (OSError, EOFError):
                continue
            with conn:
                try:
                    kind, header, arrays = conn.recv()
                    key = (kind, int(header.get("round", -1)), str(header.get("nonce", "")))
                    reply = outbox.get(key)
                    if reply is None:
                        reply = handle(silo, log, kind, header, arrays)
                        outbox.put(key, reply)  # a train reply is on disk before it leaves
                    else:  # a resend of the same request costs nothing
                        log.append("request.resent", f"{header.get('study_id')}/round-{key[1]}",
                                   {"kind": kind, "nonce": key[2], "answered_from": "outbox: nothing recomputed or charged"})
                    conn.send(reply)
                except (EOFError, OSError):
                    continue
                except Exception as exc:  # the service must outlive one bad request
                    # the traceback stays in this silo's own log; the coordinator gets the type only
                    traceback.print_exc()
                    conn.send(({"error": f"{type(exc).__name__} in silo service"}, {}))


def call(state_dir: Path, kind: str, header: dict, arrays: dict[str, np.ndarray]) -> Payload:
    """Relay one request to the silo's service (used by the ClientApp)."""
    path = socket_path(Path(state_dir))
    if not path.exists():
        raise PolicyError(f"silo service is not running (no socket at {path}); start it with `silo-node start`")
    with Client(str(path), family="AF_UNIX", authkey=_authkey(Path(state_dir), create=False)) as conn:
        conn.send((kind, header, arrays))
        return conn.recv()
