"""What silo IT (and a container orchestrator) can ask a silo without disturbing it.

`silo-node status` reports the studies this silo approved, each study's privacy spend
against its budget and this silo's ceilings, the last round it trained and the last it
refused, whether its service and SuperNode are running and the coordinator's SuperLink
answers, and the fingerprint of the cohort file. Everything is read from the state
directory and /proc; it holds counts, hashes and names, never a patient row or value.

`silo-node health` is the cheap subset an orchestrator runs every 30 s: it imports no
torch and no pandas, reads two small files, connects to one Unix socket and scans /proc.

`silo-node start` writes `run/silo.json` (its pid, name, study, SuperLink address and
the cohort's sha256 at start) for both to read, and removes it when it stops.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from policies.errors import PolicyError
from silo_node.state_format import check_state_format

RUN_FILE = Path("run") / "silo.json"
AUDIT_TAIL_BYTES = 4 * 1024 * 1024  # the last rounds are near the end of the audit log
PROBE_TIMEOUT = 2.0
# = silo_node.service.SOCKET_NAME (a test checks), not imported: service pulls in pandas
SERVICE_SOCKET = "silo.sock"


# ---- the running silo's own record ----------------------------------------------------------------


def write_run_file(state_dir: Path, info: dict[str, Any]) -> Path:
    """Record the running `silo-node start` (pid, name, study, SuperLink, cohort sha256)."""
    from policies.durable import write_atomic

    path = Path(state_dir) / RUN_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"pid": os.getpid(), "started_at": time.time(), **info}
    write_atomic(path, json.dumps(record, indent=1, sort_keys=True).encode(), replace=True, mode=0o644)
    return path


def clear_run_file(state_dir: Path) -> None:
    path = Path(state_dir) / RUN_FILE
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():  # never another start's record
            path.unlink()
    except (OSError, ValueError, AttributeError):
        pass


def read_run_file(state_dir: Path) -> dict[str, Any] | None:
    path = Path(state_dir) / RUN_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise PolicyError(f"{path}: unreadable ({exc})") from None
    return data if isinstance(data, dict) else None


def cohort_fingerprint(path: Path) -> str:
    """sha256 of the cohort file's bytes: any change to the file changes it."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# ---- probes -------------------------------------------------------------------------------------------


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    state = _proc_stat(pid)
    return state is not None and state[0] != "Z"


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, parent pid) from /proc/PID/stat; None if the process is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2:].split()  # the command name may hold spaces and ')'
    return fields[0], int(fields[1])


def supernode_pids(parent: int) -> list[int]:
    """Live children of `parent` running a Flower SuperNode (the keeper's current one)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        stat = _proc_stat(int(entry.name))
        if stat is None or stat[1] != parent or stat[0] == "Z":
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"supernode" in cmdline:
            found.append(int(entry.name))
    return sorted(found)


def service_listening(state_dir: Path, timeout: float = PROBE_TIMEOUT) -> bool:
    """Does a process accept connections on the silo service's socket? (connect only: a busy
    service is still listening; it drops this probe when it next accepts)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(str(Path(state_dir) / SERVICE_SOCKET))
        except OSError:
            return False
    return True


def address_reachable(address: str, timeout: float = PROBE_TIMEOUT) -> bool:
    """Does HOST:PORT accept a TCP connection? (the silo's one outbound connection)"""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


# ---- health -------------------------------------------------------------------------------------------


def health(state_dir: Path, require_superlink: bool = False) -> tuple[bool, str]:
    """(healthy, one line why): state format known, `silo-node start` alive, its service
    listening, a SuperNode running; optionally the SuperLink reachable."""
    state_dir = Path(state_dir).resolve()
    try:
        check_state_format(state_dir)
        run = read_run_file(state_dir)
    except PolicyError as exc:
        return False, f"unhealthy: {exc}"
    if run is None:
        return False, f"unhealthy: no running silo here ({state_dir / RUN_FILE} missing: not started, or stopped)"
    pid = int(run.get("pid", 0))
    if not process_alive(pid):
        return False, f"unhealthy: silo-node start (pid {pid}) is not running; its run file is stale"
    if not service_listening(state_dir):
        return False, f"unhealthy: the silo service (pid {pid}) does not accept connections on its socket"
    nodes = supernode_pids(pid)
    if not nodes:
        return False, f"unhealthy: no SuperNode is running under silo-node start (pid {pid}); its keeper restarts it"
    superlink = str(run.get("superlink", ""))
    if require_superlink and not address_reachable(superlink):
        return False, f"unhealthy: the coordinator's SuperLink {superlink} does not accept connections"
    uptime = time.time() - float(run.get("started_at", time.time()))
    return True, (f"healthy: silo {run.get('name')} serving study {run.get('study_id')} "
                  f"({str(run.get('policy_hash', ''))[:12]}), SuperNode pid {nodes[0]}, up {uptime:.0f} s")


# ---- status -------------------------------------------------------------------------------------------


def _approvals(state_dir: Path) -> dict[str, dict[str, Any]]:
    from silo_node.approval import APPROVALS_DIR

    out = {}
    for path in sorted((state_dir / APPROVALS_DIR).glob("*.json")):
        try:
            data = json.loads(path.read_text())
            out[str(data["study_id"])] = {"policy_hash": data["policy_hash"], "approved_at": data.get("approved_at"),
                                          "approved_by": data.get("approved_by"), "pins": len(data.get("pins", []))}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            out[path.stem] = {"error": f"{path}: unreadable approval ({exc})"}
    return out


def _spend(state_dir: Path, study_id: str, committed: dict[str, Any]) -> dict[str, Any]:
    """One study's spend, budget and ceilings, from its verified ledger (no recomputation)."""
    from silo_node.ledger import PrivacyLedger

    try:
        ledger = PrivacyLedger.load(state_dir, study_id)
    except PolicyError as exc:
        if "no privacy ledger on this silo yet" not in str(exc):
            return {"error": str(exc)}
        if study_id not in committed:
            return {"dp": False}
        return {"dp": True, "epsilon_spent": 0.0, "study_epsilon": committed[study_id].get("epsilon"),
                "silo_ceiling": None, "budget": committed[study_id].get("epsilon"), "charges": 0}
    state = ledger.state
    return {"dp": True, "epsilon_spent": state.charges[-1].epsilon_after if state.charges else 0.0,
            "study_epsilon": state.epsilon, "delta": state.delta, "silo_ceiling": state.ceiling,
            "budget": ledger.budget(), "charges": state.seq, "last_charged_round": (
                state.charges[-1].round if state.charges else None)}


def last_rounds(state_dir: Path) -> dict[str, dict[str, Any] | None]:
    """The newest train reply and train refusal in the silo's own audit log (its tail)."""
    from policies.audit import AUDIT_FILE

    path = state_dir / AUDIT_FILE
    found: dict[str, dict[str, Any] | None] = {"trained": None, "refused": None}
    if not path.exists():
        return found
    with open(path, "rb") as fh:
        size = fh.seek(0, os.SEEK_END)
        fh.seek(max(0, size - AUDIT_TAIL_BYTES))
        lines = fh.read().splitlines()
    for line in reversed(lines):
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # the first line of the tail may be cut
        key = {"train.replied": "trained", "train.refused": "refused"}.get(entry.get("action"))
        if key and found[key] is None:
            details = entry.get("details") or {}
            found[key] = {"subject": entry.get("subject"), "ts": entry.get("ts"),
                          **({"reason": details.get("reason")} if key == "refused" else
                             {"epsilon_spent": details.get("epsilon_spent")})}
        if all(found.values()):
            break
    return found


def _connection(state_dir: Path, run: dict[str, Any] | None, probe: bool) -> dict[str, Any]:
    from silo_node.certs import CA_FILE

    pid = int(run.get("pid", 0)) if run else 0
    running = bool(run) and process_alive(pid)
    nodes = supernode_pids(pid) if running else []
    superlink = str(run.get("superlink")) if run else None
    return {
        "running": running, "pid": pid if running else None,
        "service_listening": running and service_listening(state_dir),
        "supernode_pids": nodes,
        "superlink": superlink,
        "superlink_reachable": address_reachable(superlink) if (probe and superlink) else None,
        "tls_ca_installed": (state_dir / CA_FILE).exists(),
        "node_auth_key": (state_dir / "keys" / "node-auth.key").exists(),
        "insecure_local_demo": bool(run.get("insecure_local_demo")) if run else None,
    }


def _cohort(run: dict[str, Any] | None) -> dict[str, Any] | None:
    if not run or not run.get("cohort"):
        return None
    path = Path(run["cohort"])
    try:
        now = cohort_fingerprint(path)
    except OSError as exc:
        return {"path": str(path), "sha256_at_start": run.get("cohort_sha256"), "error": str(exc)}
    return {"path": str(path), "sha256_at_start": run.get("cohort_sha256"), "sha256_now": now,
            "changed_since_start": now != run.get("cohort_sha256")}


def collect_status(state_dir: Path, probe_superlink: bool = True) -> dict[str, Any]:
    """The whole status as plain data (what `silo-node status --json` prints)."""
    from silo_node.ledger import SiloBudget, read_index

    state_dir = Path(state_dir).resolve()
    if not state_dir.is_dir():
        raise PolicyError(f"{state_dir}: no such state directory")
    state_format = check_state_format(state_dir)
    run = read_run_file(state_dir)
    approvals = _approvals(state_dir)
    try:
        committed, total = read_index(state_dir), SiloBudget(state_dir).total_epsilon()
        budget_error = None
    except PolicyError as exc:
        committed, total, budget_error = {}, None, str(exc)
    studies = []
    for sid in sorted(set(approvals) | set(committed)):
        approval = approvals.get(sid, {})
        studies.append({"study_id": sid, "name": run.get("study_name") if run and run.get("study_id") == sid else None,
                        "approved": "policy_hash" in approval,
                        "policy_hash": approval.get("policy_hash") or committed.get(sid, {}).get("policy_hash"),
                        **({"error": approval["error"]} if "error" in approval else {}),
                        "privacy": _spend(state_dir, sid, committed)})
    return {
        "state_dir": str(state_dir), "state_format": state_format,
        "silo": run.get("name") if run else None, "serving": run.get("study_id") if run else None,
        "studies": studies,
        "silo_total_epsilon": {"ceiling": total, "committed": sum(float(e.get("epsilon", 0)) for e in committed.values()),
                               **({"error": budget_error} if budget_error else {})},
        "last_round": last_rounds(state_dir),
        "connection": _connection(state_dir, run, probe_superlink),
        "cohort": _cohort(run),
    }


def _eps(x: object) -> str:
    return "-" if x is None else f"{float(x):.4g}"  # type: ignore[arg-type]


def render_status(status: dict[str, Any]) -> str:
    """The status as lines for a terminal."""
    conn, lines = status["connection"], [f"state dir   : {status['state_dir']} (state format {status['state_format']})"]
    if conn["running"]:
        lines.append(f"running     : silo {status['silo']} serving study {status['serving']} (pid {conn['pid']}); "
                     f"service {'listening' if conn['service_listening'] else 'NOT listening'}; SuperNode "
                     f"{'pid ' + ','.join(map(str, conn['supernode_pids'])) if conn['supernode_pids'] else 'NOT running'}")
        reach = {True: "reachable", False: "NOT reachable", None: "not probed"}[conn["superlink_reachable"]]
        mode = "insecure local demo" if conn["insecure_local_demo"] else "TLS + SuperNode authentication"
        lines.append(f"coordinator : SuperLink {conn['superlink']} {reach} ({mode})")
    else:
        lines.append("running     : no (silo-node start is not running on this state dir)")
    lines.append(f"provisioned : study CA {'installed' if conn['tls_ca_installed'] else 'missing'}; SuperNode key "
                 f"{'present' if conn['node_auth_key'] else 'missing'}")
    total = status["silo_total_epsilon"]
    lines.append(f"silo budget : committed epsilon {_eps(total['committed'])} of ceiling "
                 f"{'none' if total['ceiling'] is None else _eps(total['ceiling'])}"
                 + (f" ERROR {total['error']}" if total.get("error") else ""))
    lines.append("studies     :" + ("" if status["studies"] else " none approved"))
    for s in status["studies"]:
        p = s["privacy"]
        head = f"  {s['study_id']}{' (' + s['name'] + ')' if s['name'] else ''} policy {str(s['policy_hash'])[:12]}"
        head += "" if s["approved"] else " (not approved here)"
        if "error" in p:
            spend = f"ledger ERROR: {p['error']}"
        elif not p["dp"]:
            spend = "no DP budget"
        else:
            ceiling = "" if p.get("silo_ceiling") is None else f", this silo's ceiling {_eps(p['silo_ceiling'])}"
            spend = (f"epsilon spent {_eps(p['epsilon_spent'])} of {_eps(p['budget'])} (study {_eps(p['study_epsilon'])}"
                     f"{ceiling}); {p['charges']} charge(s)")
        lines.append(f"{head}: {spend}")
    trained, refused = status["last_round"]["trained"], status["last_round"]["refused"]
    lines.append(f"last trained: {trained['subject'] + ' at ' + trained['ts'] if trained else 'none'}")
    lines.append(f"last refused: {refused['subject'] + ' at ' + refused['ts'] + ': ' + str(refused['reason']) if refused else 'none'}")
    cohort = status["cohort"]
    if cohort is None:
        lines.append("cohort      : - (known while the silo runs)")
    elif "error" in cohort:
        lines.append(f"cohort      : {cohort['path']}: cannot read ({cohort['error']})")
    else:
        changed = " CHANGED since start: restart the silo to re-validate" if cohort["changed_since_start"] else ""
        lines.append(f"cohort      : sha256 {cohort['sha256_now']}{changed}")
    return "\n".join(lines)
