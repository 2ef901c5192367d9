"""TLS and SuperNode authentication: the study CA, silo node keys, their registration, and
(slow) a real study over TLS where only registered silos get in."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from coordinator.certs import CA_DAYS, init_study_ca, load_superlink_tls, tls_dir
from coordinator.store import open_store
from policies.errors import PolicyError
from policies.node_identity import parse_node_public_key, read_node_public_key
from silo_node.certs import ca_path, node_key_path, request_node_key, trust_ca

COORDINATOR = [sys.executable, "-m", "coordinator.cli"]
SILO = [sys.executable, "-m", "silo_node.cli"]


def _cli(cmd: list[str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1")
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL)


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------- study CA


def test_certs_init_makes_a_ca_and_a_server_cert_for_the_hosts(tmp_path: Path) -> None:
    proc = _cli(COORDINATOR, "certs", "init", "--state-dir", str(tmp_path), "--host", "127.0.0.1",
                "--host", "coordinator.example.org")
    assert proc.returncode == 0, proc.stderr
    tls = load_superlink_tls(tmp_path)
    assert tls.ca_fingerprint() in proc.stdout and str(tls.ca_cert) in proc.stdout
    assert _mode(tls.key) == 0o600 and _mode(tls.ca_cert.parent / "ca.key") == 0o600
    assert _mode(tls.ca_cert.parent) == 0o700
    ca = x509.load_pem_x509_certificate(tls.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(tls.cert.read_bytes())
    server.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert sans.get_values_for_type(x509.DNSName) == ["coordinator.example.org"]
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey) and ca.public_key().curve.name == "secp384r1"
    lifetime = ca.not_valid_after_utc - ca.not_valid_before_utc
    assert lifetime <= dt.timedelta(days=CA_DAYS, minutes=10) < dt.timedelta(days=3 * 365)
    assert server.not_valid_after_utc <= ca.not_valid_after_utc
    private = serialization.load_pem_private_key(tls.key.read_bytes(), None)
    assert private.public_key().public_numbers() == server.public_key().public_numbers()


def test_certs_init_refuses_to_replace_an_existing_ca(tmp_path: Path) -> None:
    init_study_ca(tmp_path)
    before = _snapshot(tls_dir(tmp_path))
    proc = _cli(COORDINATOR, "certs", "init", "--state-dir", str(tmp_path))
    assert proc.returncode == 2 and "a study CA already exists" in proc.stderr and "ca.key" in proc.stderr
    assert _snapshot(tls_dir(tmp_path)) == before


def test_certs_init_rejects_a_bad_host_and_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="--host 'bad host'"):
        init_study_ca(tmp_path, ["127.0.0.1", "bad host"])
    assert not (tmp_path / "coordinator").exists()


def test_loading_tls_refuses_a_readable_key_and_a_foreign_certificate(tmp_path: Path) -> None:
    tls = init_study_ca(tmp_path / "a")
    other = init_study_ca(tmp_path / "b")
    tls.key.chmod(0o644)
    with pytest.raises(PolicyError, match="readable by others"):
        load_superlink_tls(tmp_path / "a")
    tls.key.chmod(0o600)
    tls.cert.write_bytes(other.cert.read_bytes())
    with pytest.raises(PolicyError, match="not a certificate issued by"):
        load_superlink_tls(tmp_path / "a")


# ---------------------------------------------------------------------------- silo node keys


def test_certs_request_makes_a_key_flower_accepts_and_keeps_it(tmp_path: Path) -> None:
    from flwr.cli.supernode.register import try_load_public_key

    proc = _cli(SILO, "certs", "request", "--state-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    key = request_node_key(tmp_path)  # a second request returns the same key
    assert not key.created and key.public.fingerprint() in proc.stdout
    assert _mode(key.private_path) == 0o600 and _mode(key.private_path.parent) == 0o700
    private = serialization.load_ssh_private_key(key.private_path.read_bytes(), None)  # as flower-supernode loads it
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
    flower_bytes = try_load_public_key(key.public_path)  # Flower's own check, as `flwr supernode register` runs it
    assert serialization.load_pem_public_key(flower_bytes).public_numbers() == private.public_key().public_numbers()
    assert key.private_path.read_bytes() not in key.public_path.read_bytes()
    assert node_key_path(tmp_path) == key.private_path


def test_fingerprint_is_the_ssh_keygen_digest(tmp_path: Path) -> None:
    """`ssh-keygen -l` hashes the key blob with SHA-256: both fingerprints carry that digest."""
    import base64
    import hashlib

    key = request_node_key(tmp_path).public
    digest = hashlib.sha256(base64.b64decode(key.openssh.split()[1])).digest()
    assert key.fingerprint().replace(" ", "") == digest.hex()
    assert key.ssh_fingerprint() == "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def _openssh(private) -> bytes:
    return private.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)


@pytest.mark.parametrize("public, message", [
    (_openssh(rsa.generate_private_key(65537, 2048)), "needs an EC key, found .*RSA"),
    (_openssh(ed25519.Ed25519PrivateKey.generate()), "needs an EC key, found .*Ed25519"),
    (b"ecdsa-sha2-nistp224 AAAAE2VjZHNhLXNoYTItbmlzdHAyMjQ=", "not an OpenSSH public key line"),
])
def test_public_keys_flower_would_reject_get_a_specific_error(public: bytes, message: str) -> None:
    with pytest.raises(PolicyError, match=f"silo.pub: .*{message}"):
        parse_node_public_key(public, "silo.pub")


def test_garbage_and_huge_public_key_files_are_refused(tmp_path: Path) -> None:
    garbage = tmp_path / "x.pub"
    garbage.write_bytes(b"-----BEGIN PUBLIC KEY-----\nnot a key\n")
    with pytest.raises(PolicyError, match=r"x.pub: not an OpenSSH public key line"):
        read_node_public_key(garbage)
    garbage.write_bytes(b"a" * 100_000)
    with pytest.raises(PolicyError, match="is not a public key file"):
        read_node_public_key(garbage)
    with pytest.raises(PolicyError, match="cannot read the node public key"):
        read_node_public_key(tmp_path / "missing.pub")


def test_trust_installs_the_ca_and_refuses_a_different_one_unless_asked(tmp_path: Path) -> None:
    first, second = init_study_ca(tmp_path / "c1"), init_study_ca(tmp_path / "c2")
    silo = tmp_path / "silo"
    proc = _cli(SILO, "certs", "trust", str(first.ca_cert), "--state-dir", str(silo))
    assert proc.returncode == 0 and first.ca_fingerprint() in proc.stdout, proc.stderr
    proc = _cli(SILO, "certs", "trust", str(second.ca_cert), "--state-dir", str(silo))
    assert proc.returncode == 2 and "another study CA" in proc.stderr and first.ca_fingerprint() in proc.stderr
    assert ca_path(silo).read_bytes() == first.ca_cert.read_bytes()
    path, fingerprint = trust_ca(silo, second.ca_cert, replace=True)
    assert path.read_bytes() == second.ca_cert.read_bytes() and fingerprint == second.ca_fingerprint()
    bad = tmp_path / "bad.crt"
    bad.write_text("hello")
    with pytest.raises(PolicyError, match="bad.crt: not a PEM certificate"):
        trust_ca(silo, bad, replace=True)


def test_start_without_ca_or_key_refuses_before_joining(tmp_path: Path, sample_paths) -> None:
    from policies.study import shipped_study

    args = ["start", "--study", str(shipped_study()), "--cohort", str(sample_paths["va"]), "--state-dir",
            str(tmp_path), "--superlink", "127.0.0.1:9", "--name", "va"]
    proc = _cli(SILO, *args)
    assert proc.returncode == 2 and "no study CA certificate" in proc.stderr and "certs trust" in proc.stderr
    trust_ca(tmp_path, init_study_ca(tmp_path / "coord").ca_cert)
    proc = _cli(SILO, *args)
    assert proc.returncode == 2 and "no SuperNode authentication key" in proc.stderr
    assert not (tmp_path / "silo.sock").exists() and "SuperNode pid" not in proc.stdout


# ---------------------------------------------------------------------------- registration bookkeeping


def test_store_records_a_node_key_once_and_never_shares_it(tmp_path: Path) -> None:
    a, b = request_node_key(tmp_path / "a").public, request_node_key(tmp_path / "b").public
    with open_store(None, tmp_path) as store:
        row = store.register_node_key("va", a.openssh.decode(), "18446744073709551615")
        assert (row.node_auth_key, row.flower_node_id) == (a.openssh.decode(), 2**64 - 1)
        assert store.register_node_key("va", a.openssh.decode(), 2**64 - 1).name == "va"  # same again: fine
        with pytest.raises(PolicyError, match="registered with another SuperNode key"):
            store.register_node_key("va", b.openssh.decode(), 7)
        with pytest.raises(PolicyError, match="already registered for silo va"):
            store.register_node_key("hungary", a.openssh.decode(), 8)
        assert store.get_silo("hungary") is None
        assert store.get_silo("va").flower_node_id == 2**64 - 1


def test_register_refuses_a_fingerprint_that_was_not_read_out(tmp_path: Path) -> None:
    init_study_ca(tmp_path)
    key = request_node_key(tmp_path / "silo")
    wrong = "0000 " * 16
    proc = _cli(COORDINATOR, "certs", "register", str(key.public_path), "--state-dir", str(tmp_path), "--silo", "va",
                "--superlink", "127.0.0.1:9", "--fingerprint", wrong)
    assert proc.returncode == 2 and "is not the one silo IT read out" in proc.stderr
    assert key.public.fingerprint() in proc.stderr
    unconfirmed = _cli(COORDINATOR, "certs", "register", str(key.public_path), "--state-dir", str(tmp_path),
                       "--silo", "va", "--superlink", "127.0.0.1:9")  # nobody at the terminal to confirm
    assert unconfirmed.returncode == 1 and "not registered" in unconfirmed.stdout
    assert not (tmp_path / "coordinator" / "fedcohort.db").exists()
    assert not (tmp_path / "coordinator" / "audit.jsonl").exists()


# ---------------------------------------------------------------------------- a real study over TLS

REGISTERED = ("cleveland", "hungary", "va")  # the study's minimum is 3 silos
ROGUE = "switzerland"  # asks for a key, is never registered


def _provision_silo(state: Path, name: str, ca_cert: Path) -> Path:
    """What silo IT does: request a key, install the CA; returns the public key to send."""
    silo_dir = state / "silos" / name
    proc = _cli(SILO, "certs", "request", "--state-dir", str(silo_dir))
    assert proc.returncode == 0, proc.stderr
    proc = _cli(SILO, "certs", "trust", str(ca_cert), "--state-dir", str(silo_dir))
    assert proc.returncode == 0, proc.stderr
    return silo_dir / "node-auth.pub"


def _nodes(fed) -> dict[str, dict]:
    from coordinator.certs import registered_nodes
    from coordinator.runtime import _tool, flower_env

    return {n["node-id"]: n for n in registered_nodes(_tool("flwr"), flower_env(fed.flwr_home))}


def _probe(fed, name: str, *flags: str) -> str:
    """A bare Flower SuperNode with the given connection flags, given 45 s; returns its log."""
    from coordinator.runtime import _tool, free_port

    proc = fed._spawn(f"probe-{name}", [_tool("flower-supernode"), "--superlink", fed.address, "--port",
                                        str(free_port()), "--max-retries", "2", *flags])
    deadline = time.monotonic() + 45
    while proc.alive() and time.monotonic() < deadline and "SuperNode ID" not in proc.log.read_text():
        time.sleep(1)
    proc.stop()
    return proc.log.read_text()


@pytest.mark.slow
def test_study_over_tls_admits_only_registered_silos(tmp_path: Path, sample_paths) -> None:
    from coordinator.demo import follow_run
    from coordinator.runtime import SiloSpec, local_federation
    from policies.study import load_study, shipped_study
    from silo_node.approval import approve

    state = tmp_path / "state"
    data = load_study(shipped_study()).model_dump(mode="json")
    data["privacy"], data["encryption"] = "none", "none"
    data["training"]["rounds"] = 1
    study_path = tmp_path / "study.yaml"
    study_path.write_text(yaml.safe_dump(data, sort_keys=False))
    study = load_study(study_path)

    proc = _cli(COORDINATOR, "certs", "init", "--state-dir", str(state))
    assert proc.returncode == 0, proc.stderr
    tls = load_superlink_tls(state)
    keys = {name: _provision_silo(state, name, tls.ca_cert) for name in (*REGISTERED, ROGUE)}
    for name in keys:
        approve(state / "silos" / name, study, [], "silo-it")
    probe_key = request_node_key(tmp_path / "probe")  # registered, but connects without the CA / without TLS

    with local_federation(state / "runtime", tls=tls) as fed:
        fed.start_superlink()
        node_ids = {}
        for name in REGISTERED:
            key = read_node_public_key(keys[name])
            proc = _cli(COORDINATOR, "certs", "register", str(keys[name]), "--state-dir", str(state), "--silo", name,
                        "--superlink", fed.address, "--fingerprint", key.fingerprint())
            assert proc.returncode == 0, proc.stdout + proc.stderr
            node_ids[name] = int(proc.stdout.split("as Flower node ")[1].split()[0])
        again = _cli(COORDINATOR, "certs", "register", str(keys["va"]), "--state-dir", str(state), "--silo", "va",
                     "--superlink", fed.address, "--yes")
        assert again.returncode == 0 and f"already registered with this key as Flower node {node_ids['va']}" in again.stdout
        probe_id = fed.register_silo("probe", probe_key.public_path)
        # registering the same key again (e.g. under another name) is refused by the SuperLink
        with pytest.raises(PolicyError, match="refused to register"):
            fed.register_silo("copycat", keys["va"])
        silos = {name: fed.start_silo(SiloSpec(name, sample_paths[name], study_path, state / "silos" / name))
                 for name in (*REGISTERED, ROGUE)}
        run_id = fed.submit({"study-path": str(study_path), "state-dir": str(state), "expected-silos": 3})
        summary = follow_run(fed, run_id, state / "coordinator" / "summary.json", time.time() + 900, None)
        assert summary["status"] == "completed", summary.get("reason")
        assert sorted(summary["final"]["per_silo"]) == sorted(REGISTERED)
        assert all(sorted(r["replied"]) == sorted(REGISTERED) for r in summary["history"])

        # each registered silo's SuperNode authenticated as the node id registered for it
        for name in REGISTERED:
            assert f"SuperNode ID: {node_ids[name]}" in silos[name].log.read_text()
        # the unregistered silo's SuperNode was refused, never got a message, and its
        # `silo-node start` stopped by itself with an error that says why
        assert silos[ROGUE].popen.wait(timeout=600) == 1
        rogue_log = silos[ROGUE].log.read_text()
        assert "Failed to activate SuperNode" in rogue_log and "SuperNode ID" not in rogue_log
        assert "error: the SuperNode exited" in rogue_log
        rogue_audit = state / "silos" / ROGUE / "audit.jsonl"
        assert not rogue_audit.exists() or "replied" not in rogue_audit.read_text()
        nodes = _nodes(fed)
        assert {str(node_ids[n]) for n in REGISTERED} | {str(probe_id)} == set(nodes)
        assert all(nodes[str(node_ids[n])]["status"] == "online" for n in REGISTERED)

        # a registered key does not help without TLS to the study CA
        auth = ["--auth-supernode-private-key", str(probe_key.private_path)]
        no_ca = _probe(fed, "no-ca", *auth)  # the system's CAs, not the study's
        assert "CERTIFICATE_VERIFY_FAILED" in no_ca and "SuperNode ID" not in no_ca, no_ca[-2000:]
        insecure = _probe(fed, "insecure", "--insecure")  # plain HTTP to the TLS port
        assert "Failed to initialize the connection" in insecure and "SuperNode ID" not in insecure, insecure[-2000:]
        insecure_auth = _probe(fed, "insecure-auth", "--insecure", *auth)  # Flower itself refuses this mix
        assert "requires a secure TLS connection" in insecure_auth and "SuperNode ID" not in insecure_auth
        assert _nodes(fed)[str(probe_id)]["status"] == "registered"  # never came online

    time.sleep(2)
    assert str(state) not in subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    with open_store(None, state) as store:
        for name in REGISTERED:
            row = store.get_silo(name)
            assert row.flower_node_id == node_ids[name]
            assert row.node_auth_key == read_node_public_key(keys[name]).openssh.decode()
        assert store.get_silo(ROGUE) is None or store.get_silo(ROGUE).node_auth_key is None
    actions = [json.loads(line) for line in (state / "coordinator" / "audit.jsonl").read_text().splitlines()]
    registered = [a for a in actions if a["action"] == "silo.node_key_registered"]
    assert sorted(a["subject"] for a in registered) == sorted(REGISTERED)


# ---------------------------------------------------------------------------- identity = authenticated node id


def _reply_message(req, silo: str, node: int):
    """A reply as the ServerApp pulls it: sent by `node`, naming `silo` in its payload."""
    from flwr.app import ConfigRecord, Message, Metadata, RecordDict

    from policies import messages as m

    reply = m.Reply(study_id=req.study_id, policy_hash=req.policy_hash, round=req.round, nonce=req.nonce,
                    silo=silo, status="ok")
    header = {k: v for k, v in reply.model_dump().items() if v is not None}  # Flower has no null
    meta = Metadata(run_id=1, message_id="reply", src_node_id=node, dst_node_id=0, reply_to_message_id="request",
                    group_id="1", created_at=time.time(), ttl=60.0, message_type="train")
    return Message(RecordDict({m.HEADER: ConfigRecord(header)}), metadata=meta)


def test_replies_must_name_the_silo_registered_for_their_node(tmp_path: Path) -> None:
    """A reply is accepted only under the name registered for the node id Flower
    authenticated; a payload claiming another silo is dropped and logged."""
    from coordinator.bookkeeping import StudyBook
    from coordinator.server_app import StudyRunner
    from policies import messages as m
    from policies.study import load_study, shipped_study

    study = load_study(shipped_study())
    runner = StudyRunner(grid=None, study=study, out_dir=tmp_path / "coordinator", timeout=1, poll=0.1, expected=3)
    req = m.Request(study_id=study.id, policy_hash=study.policy_hash(), round=1, nonce=m.new_nonce())
    assert runner._decode(7, _reply_message(req, "anything", 7), req).reply.silo == "anything"  # no book: the demo
    runner.book = StudyBook(tmp_path, study, shipped_study().read_text(), runner.audit)
    assert runner._decode(7, _reply_message(req, "anything", 7), req).reply.silo == "anything"  # none registered yet
    va, cleveland = request_node_key(tmp_path / "va").public, request_node_key(tmp_path / "cl").public
    runner.book.store.register_node_key("va", va.openssh.decode(), 7)
    runner.book.store.register_node_key("cleveland", cleveland.openssh.decode(), 8)
    assert runner._decode(7, _reply_message(req, "va", 7), req).reply.silo == "va"
    claimed = runner._decode(7, _reply_message(req, "cleveland", 7), req)  # va's node claiming cleveland
    assert isinstance(claimed, str) and claimed.startswith("reply rejected by the coordinator")
    assert isinstance(runner._decode(9, _reply_message(req, "va", 9), req), str)  # a node nobody registered
    rejected = [json.loads(line) for line in (tmp_path / "coordinator" / "audit.jsonl").read_text().splitlines()
                if '"reply.rejected"' in line]
    assert [(e["subject"], e["details"]["node"]) for e in rejected] == [("node-7", "7"), ("node-9", "9")]
    assert "registered as silo 'va', its reply claims 'cleveland'" in rejected[0]["details"]["reason"]
