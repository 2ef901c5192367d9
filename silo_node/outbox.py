"""The silo's outbox: the last replies it sent, so a resent request is answered, not redone.

A coordinator that restarts mid-round resends the round with the same nonce. Answering
it again from scratch would train again and, under DP, spend the budget twice for one
round. So each reply is kept under (kind, round, nonce), and train replies are also
written to disk (temp file, fsync, rename) before they leave: a silo service restarted
meanwhile still answers the resend from its outbox. Files hold only what was already
sent (under CKKS, ciphertexts); the outbox keeps the last `size` replies.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections import OrderedDict
from pathlib import Path

import numpy as np

from policies.durable import write_atomic

OUTBOX_DIR = "outbox"
Key = tuple[str, int, str]  # (message kind, round, nonce)
Payload = tuple[dict, dict[str, np.ndarray]]


class Outbox:
    """Replies by request key, the newest `size` in memory; `durable` kinds also on disk."""

    def __init__(self, state_dir: Path, durable: frozenset[str], size: int = 8):
        self.dir, self.durable, self.size = Path(state_dir) / OUTBOX_DIR, durable, size
        self._replies: OrderedDict[Key, Payload] = OrderedDict()
        self._load()

    def get(self, key: Key) -> Payload | None:
        return self._replies.get(key)

    def put(self, key: Key, payload: Payload) -> None:
        """Keep a reply; a durable kind's reply is on disk when this returns (before it is sent)."""
        if key[0] in self.durable and payload[0].get("status") == "ok":
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            write_atomic(self._path(key), _encode(key, payload), replace=True)
        self._replies[key] = payload
        while len(self._replies) > self.size:
            old, _ = self._replies.popitem(last=False)
            self._path(old).unlink(missing_ok=True)

    def _path(self, key: Key) -> Path:
        return self.dir / (hashlib.sha256(json.dumps(key).encode()).hexdigest()[:32] + ".npz")

    def _load(self) -> None:
        if not self.dir.is_dir():
            return
        files = sorted(self.dir.glob("*.npz"), key=lambda p: p.stat().st_mtime)
        for path in files[-self.size:]:
            try:
                key, payload = _decode(path.read_bytes())
            except (OSError, ValueError, KeyError):
                continue  # a reply we cannot read is one we cannot resend: the round is answered anew
            self._replies[key] = payload
        for path in files[:-self.size]:
            path.unlink(missing_ok=True)


def _encode(key: Key, payload: Payload) -> bytes:
    header, arrays = payload
    meta = json.dumps({"key": list(key), "header": header}).encode()
    buf = io.BytesIO()
    np.savez(buf, _meta=np.frombuffer(meta, dtype=np.uint8), **{f"a_{k}": np.asarray(v) for k, v in arrays.items()})
    return buf.getvalue()


def _decode(blob: bytes) -> tuple[Key, Payload]:
    with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
        meta = json.loads(npz["_meta"].tobytes())
        arrays = {k[2:]: npz[k] for k in npz.files if k.startswith("a_")}
    kind, round_no, nonce = meta["key"]
    return (str(kind), int(round_no), str(nonce)), (meta["header"], arrays)
