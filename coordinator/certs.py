"""The study's TLS: a study CA, the SuperLink's server certificate, registered silo node keys.

Silos trust exactly one CA, made for this study and kept by the coordinator, rather than
the public web PKI: a hospital's SuperNode then talks only to a SuperLink this study's
coordinator certified. Lifetimes: the CA lives 2 years (a study's usual span plus its
review; a stolen CA key stops being useful when it expires, and every silo re-checks a
new CA by phone), the server certificate 397 days (the public web's ceiling). Silos
hold only `ca.crt`, so the server certificate can be re-issued from the same CA without
touching any silo. P-384 keys, like Flower's own node keys.

Files, under `STATE/coordinator/tls/` (mode 0700): `ca.key` and `server.key` (0600,
written atomically, never replaced), `ca.crt` (what silos get) and `server.crt`.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from policies.durable import private_dir, read_private, write_atomic
from policies.errors import PolicyError
from policies.node_identity import NodePublicKey, certificate_fingerprint

TLS_DIR = Path("coordinator") / "tls"
CA_KEY, CA_CERT, SERVER_KEY, SERVER_CERT = "ca.key", "ca.crt", "server.key", "server.crt"
CA_DAYS = 730
SERVER_DAYS = 397
DEFAULT_HOSTS = ("127.0.0.1", "localhost")
_CURVE = ec.SECP384R1
_SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


@dataclass(frozen=True)
class SuperLinkTls:
    """The three files `flower-superlink` needs for TLS; silos need only `ca_cert`."""

    ca_cert: Path
    cert: Path
    key: Path

    def superlink_flags(self) -> list[str]:
        return ["--ssl-ca-certfile", str(self.ca_cert), "--ssl-certfile", str(self.cert),
                "--ssl-keyfile", str(self.key)]

    def ca_fingerprint(self) -> str:
        return certificate_fingerprint(self.ca_cert.read_bytes(), str(self.ca_cert))


def tls_dir(state_dir: Path) -> Path:
    return Path(state_dir).resolve() / TLS_DIR


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedcohort study"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        if not host or any(c.isspace() for c in host) or len(host) > 253:
            raise PolicyError(f"--host {host!r}: not an IP address or a DNS name") from None
        return x509.DNSName(host)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _ca_cert(key: ec.EllipticCurvePrivateKey, study_name: str, now: dt.datetime) -> x509.Certificate:
    name = _name(f"{study_name} study CA")
    public = key.public_key()
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(key, hashes.SHA384()))


def _server_cert(ca_key: ec.EllipticCurvePrivateKey, ca: x509.Certificate, key: ec.EllipticCurvePrivateKey,
                 hosts: list[str], now: dt.datetime) -> x509.Certificate:
    public = key.public_key()
    not_after = min(now + dt.timedelta(days=SERVER_DAYS), ca.not_valid_after_utc)
    return (x509.CertificateBuilder().subject_name(_name(f"SuperLink {hosts[0]}")).issuer_name(ca.subject)
            .public_key(public).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA384()))


def init_study_ca(state_dir: Path, hosts: list[str] | None = None, study_name: str = "fedcohort") -> SuperLinkTls:
    """Make the study CA and the SuperLink's certificate; refuse if a CA is already there.

    Nothing is written until both certificates are built, and the keys are written
    before the certificates, so an interrupted run leaves no certificate without its key.
    """
    hosts = list(dict.fromkeys(hosts or DEFAULT_HOSTS))
    for host in hosts:
        _san(host)  # a bad host fails here, before anything is written
    directory = tls_dir(state_dir)
    existing = [directory / f for f in (CA_KEY, CA_CERT) if (directory / f).exists()]
    if existing:
        raise PolicyError(f"{existing[0]}: a study CA already exists here; refusing to replace it (every silo "
                          "trusts it). Move the directory away first if you really mean to start over.")
    now = dt.datetime.now(dt.timezone.utc)
    ca_key, server_key = ec.generate_private_key(_CURVE()), ec.generate_private_key(_CURVE())
    ca = _ca_cert(ca_key, study_name, now)
    server = _server_cert(ca_key, ca, server_key, hosts, now)
    private_dir(directory)
    for path in (directory / SERVER_KEY, directory / SERVER_CERT):
        path.unlink(missing_ok=True)  # a half-finished earlier init without a CA: start clean
    write_atomic(directory / CA_KEY, _pem_key(ca_key), replace=False)
    write_atomic(directory / SERVER_KEY, _pem_key(server_key), replace=False)
    write_atomic(directory / SERVER_CERT, _pem_cert(server), replace=False, mode=0o644)
    write_atomic(directory / CA_CERT, _pem_cert(ca), replace=False, mode=0o644)
    return load_superlink_tls(state_dir)


def load_superlink_tls(state_dir: Path) -> SuperLinkTls:
    """The coordinator's TLS files, checked: present, keys private, certificate chains to the CA."""
    directory = tls_dir(state_dir)
    tls = SuperLinkTls(directory / CA_CERT, directory / SERVER_CERT, directory / SERVER_KEY)
    missing = [p for p in (tls.ca_cert, tls.cert, tls.key) if not p.exists()]
    if missing:
        raise PolicyError(f"{missing[0]}: missing; run `coordinator certs init --state-dir {state_dir}` first")
    key_pem = read_private(tls.key, "SuperLink TLS key")
    try:
        ca = x509.load_pem_x509_certificate(tls.ca_cert.read_bytes())
        server = x509.load_pem_x509_certificate(tls.cert.read_bytes())
        server.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise PolicyError(f"{tls.cert}: not a certificate issued by {tls.ca_cert}: {exc or 'bad signature'}") from None
    try:
        key = serialization.load_pem_private_key(key_pem, None)
    except (ValueError, TypeError) as exc:
        raise PolicyError(f"{tls.key}: not an unencrypted PEM private key: {exc}") from None
    if key.public_key().public_bytes(*_SPKI) != server.public_key().public_bytes(*_SPKI):
        raise PolicyError(f"{tls.key}: does not belong to the certificate {tls.cert}")
    return tls


def write_connection(flwr_home: Path, address: str, ca_cert: Path | None, name: str = "local") -> None:
    """The `flwr` CLI's connection to the SuperLink's Control API: TLS with the study CA, or
    (`ca_cert=None`, local demo only) insecure."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    security = f"root-certificates = {json.dumps(str(ca_cert))}" if ca_cert else "insecure = true"
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "{address}"\n{security}\n')


def register_node_key(flwr: str, env: dict[str, str], key_file: Path, silo: str, connection: str = "local") -> int:
    """`flwr supernode register` one silo's public key; returns the node id the SuperLink gave it.

    The node id is what authenticated messages carry from then on: the silo's identity.
    """
    out = subprocess.run([flwr, "supernode", "register", str(key_file), connection, "--name", silo, "--format", "json"],
                         env=env, capture_output=True, text=True, timeout=120)
    try:
        answer = json.loads(out.stdout[out.stdout.index("{"):])
    except ValueError:
        answer = {}
    if out.returncode != 0 or not answer.get("success") or "node-id" not in answer:
        detail = answer.get("error-message") or out.stderr.strip() or out.stdout.strip()
        raise PolicyError(f"{key_file}: the SuperLink refused to register silo {silo}'s key: {detail[:500]}")
    return int(answer["node-id"])


def registered_nodes(flwr: str, env: dict[str, str], connection: str = "local") -> list[dict]:
    """`flwr supernode list` as JSON rows (node-id, owner-name, status, ...)."""
    out = subprocess.run([flwr, "supernode", "list", connection, "--format", "json"],
                         env=env, capture_output=True, text=True, timeout=120)
    try:
        answer = json.loads(out.stdout[out.stdout.index("{"):])
    except ValueError:
        raise PolicyError(f"flwr supernode list failed: {(out.stderr or out.stdout).strip()[:500]}") from None
    return list(answer.get("nodes", []))


def describe(key: NodePublicKey) -> str:
    return f"fingerprint {key.fingerprint()}\n  (ssh-keygen -l -f shows {key.ssh_fingerprint()})"


def unregister_node(flwr: str, env: dict[str, str], node_id: int, connection: str = "local") -> None:
    """`flwr supernode unregister` one node: the SuperLink marks it unregistered and refuses
    its key from then on (a connected SuperNode is cut off at its next request)."""
    out = subprocess.run([flwr, "supernode", "unregister", str(node_id), connection, "--format", "json"],
                         env=env, capture_output=True, text=True, timeout=120)
    try:
        answer = json.loads(out.stdout[out.stdout.index("{"):])
    except ValueError:
        answer = {}
    if out.returncode != 0 or not answer.get("success"):
        detail = answer.get("error-message") or out.stderr.strip() or out.stdout.strip()
        raise PolicyError(f"the SuperLink refused to unregister node {node_id}: {detail[:500]}")
