"""How a silo's SuperNode proves who it is, in the formats Flower 1.41 expects.

Both sides need the same rules: the silo makes the key pair (`silo-node certs request`),
the coordinator registers the public half with the SuperLink (`coordinator certs
register`), and silo IT and the coordinator read the same fingerprint to each other by
phone before it is registered. Flower loads the private key with
`load_ssh_private_key` and the public key with `load_ssh_public_key`, and accepts only
EC keys on NIST curves (`flwr.supercore.primitives.asymmetric.uses_nist_ec_curve`):
so both files are OpenSSH format, and we make P-384 keys (Flower's own default).

The CA certificate the coordinator hands to silos gets a fingerprint too, compared the
same way, so a certificate swapped in transit (e-mail, ticket) is caught.
"""

from __future__ import annotations

import base64
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from policies.errors import PolicyError

NODE_KEY_CURVE = ec.SECP384R1
# NIST curves Flower accepts, minus the two below 256 bits
ACCEPTED_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)
MAX_PUBLIC_KEY_FILE = 16 * 1024


def group_hex(digest: bytes) -> str:
    """A digest as hex in groups of 4: easy to read aloud and compare by phone."""
    text = digest.hex()
    return " ".join(text[i:i + 4] for i in range(0, len(text), 4))


@dataclass(frozen=True)
class NodePublicKey:
    """A SuperNode's public authentication key as one OpenSSH line (`ecdsa-sha2-nistp384 AAAA...`)."""

    openssh: bytes

    def blob(self) -> bytes:
        return base64.b64decode(self.openssh.split()[1])

    def fingerprint(self) -> str:
        """sha256 of the key blob in hex groups: what silo IT and the coordinator compare."""
        return group_hex(hashlib.sha256(self.blob()).digest())

    def ssh_fingerprint(self) -> str:
        """The same digest as `ssh-keygen -l -f KEY.pub` prints it, for an independent check."""
        return "SHA256:" + base64.b64encode(hashlib.sha256(self.blob()).digest()).decode().rstrip("=")


def node_public_key(public_key: ec.EllipticCurvePublicKey) -> NodePublicKey:
    return NodePublicKey(public_key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))


def parse_node_public_key(data: bytes, source: str) -> NodePublicKey:
    """Check a public key file the way `flwr supernode register` will, with a specific error."""
    try:
        key = serialization.load_ssh_public_key(data.strip())
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise PolicyError(f"{source}: not an OpenSSH public key line (make it with `silo-node certs request`): "
                          f"{exc}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise PolicyError(f"{source}: Flower's SuperNode authentication needs an EC key, found {type(key).__name__}")
    if not isinstance(key.curve, ACCEPTED_CURVES):
        raise PolicyError(f"{source}: EC curve {key.curve.name} is not accepted (P-256, P-384 or P-521)")
    return node_public_key(key)


def read_node_public_key(path: Path) -> NodePublicKey:
    try:
        if os.path.getsize(path) > MAX_PUBLIC_KEY_FILE:
            raise PolicyError(f"{path}: {os.path.getsize(path)} bytes is not a public key file")
        data = Path(path).read_bytes()
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read the node public key: {exc.strerror or exc}") from None
    return parse_node_public_key(data, str(path))


def new_node_key() -> tuple[bytes, NodePublicKey]:
    """A fresh SuperNode key pair: the private key as unencrypted OpenSSH PEM (what
    `flower-supernode --auth-supernode-private-key` loads) and its public half."""
    private = ec.generate_private_key(NODE_KEY_CURVE())
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    return pem, node_public_key(private.public_key())


def load_node_private_key(pem: bytes, source: str) -> NodePublicKey:
    """Check a stored private key loads as Flower will load it; returns its public half."""
    try:
        key = serialization.load_ssh_private_key(pem, None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise PolicyError(f"{source}: not an unencrypted OpenSSH private key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PolicyError(f"{source}: the node key must be EC, found {type(key).__name__}")
    return node_public_key(key.public_key())


def certificate_fingerprint(pem: bytes, source: str) -> str:
    """sha256 of a PEM certificate's DER in hex groups (what `openssl x509 -fingerprint
    -sha256` shows, with colons): how a silo checks the ca.crt it was sent."""
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise PolicyError(f"{source}: not a PEM certificate: {exc}") from None
    return group_hex(hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest())
