"""The silo's side of the study's TLS: its SuperNode authentication key and the study CA.

`silo-node certs request` makes the SuperNode's EC key pair once (the private half stays
in `STATE/keys/node-auth.key`, mode 0600, and never leaves the silo) and writes the
public half to `STATE/node-auth.pub`, the one file sent to the coordinator. `silo-node
certs trust ca.crt` installs the study CA the coordinator sent as `STATE/ca.crt`.
Both print a fingerprint that silo IT reads to the coordinator by phone, so neither file
can be swapped in transit. `silo-node start` then finds both in the state directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from policies.durable import private_dir, read_private, write_atomic
from policies.errors import PolicyError
from policies.node_identity import NodePublicKey, certificate_fingerprint, load_node_private_key, new_node_key

NODE_KEY = Path("keys") / "node-auth.key"
NODE_PUB = "node-auth.pub"
CA_FILE = "ca.crt"
MAX_CA_FILE = 64 * 1024


@dataclass(frozen=True)
class NodeKey:
    private_path: Path
    public_path: Path
    public: NodePublicKey
    created: bool


def request_node_key(state_dir: Path) -> NodeKey:
    """Make this silo's SuperNode key pair, or return the one it already has (a second
    request never replaces a registered key)."""
    state_dir = Path(state_dir).resolve()
    private_path, public_path = state_dir / NODE_KEY, state_dir / NODE_PUB
    private_dir(private_path.parent)
    created = not private_path.exists()
    if created:
        pem, _ = new_node_key()
        write_atomic(private_path, pem, replace=False)
    public = load_node_private_key(read_private(private_path, "SuperNode authentication key"), str(private_path))
    write_atomic(public_path, public.openssh + b"\n", replace=True, mode=0o644)
    return NodeKey(private_path, public_path, public, created)


def node_key_path(state_dir: Path, given: Path | None = None) -> Path:
    """The SuperNode's private key for `flower-supernode` (the given one or the state dir's),
    checked: exists, private, loads as Flower will load it."""
    path = Path(given).resolve() if given else Path(state_dir).resolve() / NODE_KEY
    if not path.exists():
        raise PolicyError(f"{path}: no SuperNode authentication key; run `silo-node certs request --state-dir "
                          f"{state_dir}` and have the coordinator register it")
    load_node_private_key(read_private(path, "SuperNode authentication key"), str(path))
    return path


def trust_ca(state_dir: Path, ca_file: Path, *, replace: bool = False) -> tuple[Path, str]:
    """Install the study CA certificate the coordinator sent; returns (path, fingerprint).

    A different CA already installed is replaced only when asked: it decides which
    SuperLink this silo will talk to."""
    try:
        if Path(ca_file).stat().st_size > MAX_CA_FILE:
            raise PolicyError(f"{ca_file}: too large for a CA certificate")
        pem = Path(ca_file).read_bytes()
    except OSError as exc:
        raise PolicyError(f"{ca_file}: cannot read: {exc.strerror or exc}") from None
    fingerprint = certificate_fingerprint(pem, str(ca_file))
    dest = Path(state_dir).resolve() / CA_FILE
    if dest.exists() and dest.read_bytes() != pem and not replace:
        raise PolicyError(f"{dest}: another study CA (fingerprint {certificate_fingerprint(dest.read_bytes(), str(dest))})"
                          " is installed; pass --replace to trust the new one instead")
    dest.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(dest, pem, replace=True, mode=0o644)
    return dest, fingerprint


def ca_path(state_dir: Path, given: Path | None = None) -> Path:
    """The study CA (the given one or the state dir's), checked to be a certificate."""
    path = Path(given).resolve() if given else Path(state_dir).resolve() / CA_FILE
    if not path.exists():
        raise PolicyError(f"{path}: no study CA certificate; run `silo-node certs trust CA.crt --state-dir "
                          f"{state_dir}` with the ca.crt the coordinator sent (or pass --root-certificates)")
    certificate_fingerprint(path.read_bytes(), str(path))
    return path
