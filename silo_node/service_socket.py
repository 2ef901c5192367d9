"""The silo service's Unix socket: where it is, its key, and the relay's side of it.

Kept apart from service.py so the ClientApp relay, which Flower starts as a fresh process
for every message, imports only this (stdlib + numpy types) and not what the service
needs (the audit log, the study policy, CKKS, pandas): with 32 silos on two cores that
import cost every silo, every message.
"""

from __future__ import annotations

import os
import secrets
from multiprocessing.connection import Client
from pathlib import Path

import numpy as np

from policies.errors import PolicyError

SOCKET_NAME = "silo.sock"
KEY_NAME = "silo.key"

Payload = tuple[dict, dict[str, np.ndarray]]


def socket_path(state_dir: Path) -> Path:
    return Path(state_dir) / SOCKET_NAME


def authkey(state_dir: Path, create: bool) -> bytes:
    """The per-silo key (mode 0600) both ends of the socket prove; `create` makes a fresh one."""
    path = Path(state_dir) / KEY_NAME
    if create:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32))
    return path.read_text().strip().encode()


def call(state_dir: Path, kind: str, header: dict, arrays: dict[str, np.ndarray]) -> Payload:
    """Relay one request to the silo's service (used by the ClientApp)."""
    path = socket_path(Path(state_dir))
    if not path.exists():
        raise PolicyError(f"silo service is not running (no socket at {path}); start it with `silo-node start`")
    with Client(str(path), family="AF_UNIX", authkey=authkey(Path(state_dir), create=False)) as conn:
        conn.send((kind, header, arrays))
        return conn.recv()
