"""Revoking a silo: its SuperNode key at the SuperLink, its enrolments in the store, the audit record.

A silo's credential is its SuperNode authentication key (silos hold no certificate: the
study CA signs only the SuperLink's server certificate, and silos trust that CA). Revoking
unregisters the key's node from the SuperLink, so its next connection is refused by
Flower's node authentication; marks the silo revoked and its enrolments in running
studies `revoked`; and the ServerApp, reading the store before every round, drops the
silo, rejects any reply from its node or name, and re-keys a CKKS study so the revoked
silo cannot read what is aggregated afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from coordinator.certs import load_superlink_tls, registered_nodes, unregister_node, write_connection
from coordinator.store import open_store
from policies.audit import open_party_log
from policies.errors import PolicyError

CERTIFICATE_NOTE = ("silos hold no certificate of their own: the SuperNode authentication key is the silo's "
                    "credential, and it is what was unregistered")


@dataclass(frozen=True)
class Revocation:
    silo: str
    node_id: int | None
    unregistered: bool  # False: the SuperLink no longer knew the node (already unregistered)
    studies: list[str]  # enrolments that ended ("id vN")


def _flwr_env(state_dir: Path, superlink: str | None) -> dict[str, str]:
    """The `flwr` CLI's connection to the SuperLink: the one `certs register` wrote, or `superlink`."""
    from coordinator.runtime import flower_env

    flwr_home = state_dir / "coordinator" / "flwr_home"
    if superlink:
        write_connection(flwr_home, superlink, load_superlink_tls(state_dir).ca_cert)
    elif not (flwr_home / "config.toml").exists():
        raise PolicyError(f"{flwr_home / 'config.toml'}: no SuperLink connection recorded; pass --superlink HOST:PORT")
    return flower_env(flwr_home)


def revoke_silo(state_dir: Path, name: str, reason: str, *, db_url: str | None = None, superlink: str | None = None,
                user: str = "coordinator-cli") -> Revocation:
    """Revoke one silo. Checked first (known, not yet revoked, a reason), then the SuperLink
    unregisters it, then the store records it, then the audit log: a refusal or a SuperLink
    that cannot be reached changes nothing."""
    from coordinator.runtime import _tool

    state_dir = Path(state_dir).resolve()
    if not reason or not reason.strip():
        raise PolicyError("a revocation needs --reason (it goes into the audit log)")
    with open_store(db_url, state_dir) as store:
        row = store.get_silo(name)
        if row is None:
            raise PolicyError(f"no silo named {name!r} is registered in this store; nothing revoked")
        if row.revoked_at is not None:
            raise PolicyError(f"silo {name} was already revoked at {row.revoked_at:%Y-%m-%d %H:%M:%S} UTC "
                              f"({row.revoked_reason}); nothing changed")
        unregistered = False
        if row.node_auth_key and row.flower_node_id is not None:
            env = _flwr_env(state_dir, superlink)
            live = {str(n.get("node-id")) for n in registered_nodes(_tool("flwr"), env)
                    if str(n.get("status", "")).lower() != "unregistered"}
            if str(row.flower_node_id) in live:
                unregister_node(_tool("flwr"), env, row.flower_node_id)
                unregistered = True
        row, studies = store.revoke_silo(name, reason.strip())
    open_party_log(state_dir / "coordinator", "coordinator", "coordinator").append(
        "silo.revoked", name, {"node_id": None if row.flower_node_id is None else str(row.flower_node_id),
                               "unregistered_at_superlink": unregistered, "enrolments_ended": studies,
                               "reason": reason.strip()[:500], "certificate": CERTIFICATE_NOTE},
        actor=user)
    return Revocation(name, row.flower_node_id, unregistered, studies)


def revoked_nodes(store) -> dict[int, str]:
    """Flower node id -> name of every revoked silo (the ServerApp drops and refuses these)."""
    return {int(s.flower_node_id): s.name for s in store.list_silos()
            if s.revoked_at is not None and s.flower_node_id is not None}
