"""`silo-node`: what silo IT runs at the hospital.

  silo-node validate --study STUDY.yaml --cohort FILE.parquet
  silo-node start --study STUDY.yaml --cohort FILE.parquet --state-dir DIR --superlink HOST:PORT --name NAME
  silo-node certs request --state-dir DIR        (SuperNode key; send node-auth.pub to the coordinator)
  silo-node certs trust CA.crt --state-dir DIR   (the study CA the coordinator sent)
  silo-node release approve|refuse STUDY_ID --state-dir DIR   (consent to releasing the final model)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

from policies.errors import PolicyError
from policies.study import load_study
from policies.validation import validate_cohort


def _validate(args: argparse.Namespace) -> int:
    study = load_study(args.study)
    report = validate_cohort(args.cohort, study)
    if args.json:
        print(json.dumps(report.counts_only_dict(), indent=2))
    else:
        print(report.render())
    return 0 if report.ok else 1


def _summary(study) -> str:
    privacy = (f"DP-SGD, epsilon {study.dp.epsilon:g}, delta {study.dp.delta:g} per silo for the whole study"
               if study.dp else "none (no differential privacy)")
    return "\n".join([
        f"Study      : {study.id} v{study.version}: {study.name}",
        f"Policy hash: {study.policy_hash()}",
        f"Purpose    : {study.governance.purpose}",
        f"Controller : {study.governance.data_controller}",
        f"Ethics     : {study.governance.ethics_reference}",
        f"Retention  : {study.governance.retention}",
        f"Training   : {study.training.strategy}, {study.training.rounds} rounds x {study.training.local_steps} steps",
        f"Encryption : {study.encryption}",
        f"Privacy    : {privacy}",
        f"Min silos  : {study.min_silos}; small cells below {study.small_cell_min} suppressed",
    ])


def _approve(args: argparse.Namespace) -> int:
    """Silo IT reads the study, checks the budget fits, pins peers, and approves this exact hash."""
    from silo_node.approval import approve, parse_pins
    from silo_node.keys import EnrolmentKey
    from silo_node.ledger import SiloBudget

    study = load_study(args.study)
    parse_pins(args.pin)  # a malformed pin is refused before anything is reserved or recorded
    state_dir = Path(args.state_dir).resolve()
    print(_summary(study))
    print(f"This silo's enrolment key fingerprint (read it to the other hospitals):\n  "
          f"{EnrolmentKey.load_or_create(state_dir).fingerprint()}")
    if study.dp:
        decision = SiloBudget(state_dir).fits(study.dp.epsilon, study.id)
        if not decision.allowed:
            print(f"WARNING: {decision.reason}", file=sys.stderr)
            return 1
    if not args.pin:
        print("WARNING: no peer fingerprints pinned: this silo would seal the study key to, and accept it from, "
              "any key the coordinator relays. Pin each peer with --pin NAME=FINGERPRINT after comparing "
              "fingerprints out of band.", file=sys.stderr)
    elif study.ckks.key_holder and not any(p.partition("=")[0].strip() == study.ckks.key_holder for p in args.pin):
        print(f"NOTE: the policy names '{study.ckks.key_holder}' as key holder; unless this silo is it, pin its key "
              f"as --pin {study.ckks.key_holder}=FINGERPRINT or this silo will refuse the study key.", file=sys.stderr)
    if not args.yes:
        answer = input(f"Approve study {study.id} policy {study.policy_hash()[:12]}? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("not approved")
            return 1
    if args.silo_total_epsilon is not None:
        SiloBudget(state_dir).set_total_epsilon(args.silo_total_epsilon)
    if study.dp:
        SiloBudget(state_dir).reserve(study.id, study.dp, study.policy_hash())
        if args.epsilon_ceiling is not None:
            from silo_node.ledger import PrivacyLedger

            ledger = PrivacyLedger.load(state_dir, study.id, policy_hash=study.policy_hash(), privacy=study.dp)
            ledger.set_ceiling(args.epsilon_ceiling)
            print(f"this silo's ceiling for {study.id}: epsilon {args.epsilon_ceiling:g} "
                  f"(study budget {study.dp.epsilon:g}); the coordinator cannot raise it")
    approval = approve(state_dir, study, args.pin, args.by, release=args.release)
    print(f"approved {study.id} policy {approval.policy_hash[:12]} with {len(approval.pins)} pinned peer(s); "
          f"model release consent: {approval.release}")
    return 0


def _start(args: argparse.Namespace) -> int:
    """Validate, load the cohort into the resident service, then join via a SuperNode."""
    from silo_node.service import serve
    from silo_node.worker import Silo

    study = load_study(args.study)
    report = validate_cohort(args.cohort, study)
    if not report.ok:
        print(report.render(), file=sys.stderr)
        print(f"{args.cohort}: cohort fails the study's error rules; not joining", file=sys.stderr)
        return 1
    state_dir = Path(args.state_dir).resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    connection = ["--insecure"] if args.insecure_local_demo else _tls_flags(args, state_dir)  # fail before loading
    from silo_node.approval import approve, load_approval, require_approval

    if load_approval(state_dir, study) is None and args.insecure_local_demo:
        approve(state_dir, study, [], "local-demo (trust on first use)")
    require_approval(state_dir, study)
    silo = Silo.from_cohort(args.name, study, args.cohort, state_dir=state_dir)
    silo.validation = report.model_dump(mode="json", exclude={"file"}) | {"ok": report.ok}  # counts, no local path
    silo.warm_up()
    node_config = (
        f'silo-name="{args.name}" cohort-path="{Path(args.cohort).resolve()}" '
        f'study-path="{Path(args.study).resolve()}" state-dir="{state_dir}"'
    )
    bin_dir = Path(sys.executable).parent
    cmd = [sys.executable, "-m", "silo_node.supernode_launcher", "--superlink", args.superlink, "--port", str(args.node_port),
           "--node-config", node_config]
    cmd += connection
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
               FEDCOHORT_NODE_POLL=str(args.node_poll), FLWR_SUPEREXEC_TASK_POLL_INTERVAL=str(min(args.node_poll, 1.0)),
               PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    from silo_node.supernode_keeper import SuperNodeKeeper

    node = SuperNodeKeeper(cmd, env)  # restarts the SuperNode if it exits (e.g. a new SuperLink)

    def _stop(*_: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    pid = node.start()
    print(f"silo '{args.name}' serving study {study.id} ({study.policy_hash()[:12]}); SuperNode pid {pid}", flush=True)
    try:
        serve(state_dir, silo, stop=lambda: node.stopping)
    except SystemExit:
        pass
    finally:
        node.stop()
    if node.gave_up:
        print("error: the SuperNode exited right after starting, again and again; see its log above (a key the "
              "coordinator has not registered shows 'Failed to activate SuperNode')", file=sys.stderr)
        return 1
    return 0


def _tls_flags(args: argparse.Namespace, state_dir: Path) -> list[str]:
    """TLS to the study CA and SuperNode authentication, from the state dir unless given."""
    from silo_node.certs import ca_path, node_key_path

    ca = ca_path(state_dir, args.root_certificates)
    key = node_key_path(state_dir, args.auth_key)
    return ["--root-certificates", str(ca), "--auth-supernode-private-key", str(key)]


def _release_decide(args: argparse.Namespace) -> int:
    """Silo IT consents to (or refuses) releasing the study's final model; logged at this silo."""
    from policies.audit import open_party_log
    from silo_node.release import record_consent

    state_dir = Path(args.state_dir).resolve()
    log = open_party_log(state_dir, args.name or state_dir.name, "silo")
    consent = record_consent(state_dir, args.study_id, args.release_command, args.by, log)
    verb = "consents to" if consent.decision == "approve" else "refuses"
    print(f"this silo {verb} releasing the final model of {consent.study_id} (policy {consent.policy_hash[:12]})")
    return 0


def _certs_request(args: argparse.Namespace) -> int:
    """Make (once) this silo's SuperNode key pair; print what goes to the coordinator."""
    from silo_node.certs import request_node_key

    key = request_node_key(Path(args.state_dir))
    print(f"{'new' if key.created else 'existing'} SuperNode authentication key: {key.private_path} (mode 0600, "
          "never leaves this machine)")
    print(f"send to the coordinator: {key.public_path}")
    print(key.public.openssh.decode())
    print(f"fingerprint (read it to the coordinator by phone):\n  {key.public.fingerprint()}\n"
          f"  (ssh-keygen -l -f {key.public_path.name} shows {key.public.ssh_fingerprint()})")
    return 0


def _certs_trust(args: argparse.Namespace) -> int:
    from silo_node.certs import trust_ca

    path, fingerprint = trust_ca(Path(args.state_dir), Path(args.ca_file), replace=args.replace)
    print(f"study CA installed as {path}")
    print(f"CA fingerprint (compare with the one the coordinator reads out):\n  {fingerprint}")
    return 0


def _audit_export(args: argparse.Namespace) -> int:
    """Export this silo's own audit log for an auditor (JSONL, CSV, Parquet, manifest, zip)."""
    from policies.audit import AUDIT_FILE, open_party_log

    state_dir = Path(args.state_dir).resolve()
    if not (state_dir / AUDIT_FILE).exists():
        raise PolicyError(f"{state_dir / AUDIT_FILE}: no audit log in this state directory")
    name = args.name or state_dir.name
    bundle = open_party_log(state_dir, name, "silo").export(Path(args.out or state_dir / "exports").resolve(), actor=args.user)
    print(bundle)
    return 0


def _audit_verify(args: argparse.Namespace) -> int:
    from policies.audit_crosscheck import verify_bundles

    ok, lines = verify_bundles(args.bundles, args.silo)
    print("\n".join(lines))
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="silo-node", description="fedcohort silo node (runs at the hospital)")
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("validate", help="check a Parquet cohort against the study schema (counts only)")
    v.add_argument("--study", required=True, help="study policy YAML")
    v.add_argument("--cohort", required=True, help="local cohort, Parquet")
    v.add_argument("--json", action="store_true", help="print the report as JSON")
    v.set_defaults(func=_validate)
    a = sub.add_parser("approve", help="read a study, check the privacy budget fits, pin peers, approve its hash")
    a.add_argument("--study", required=True)
    a.add_argument("--state-dir", required=True)
    a.add_argument("--pin", action="append", default=[], metavar="[NAME=]FINGERPRINT",
                   help="a peer silo's enrolment fingerprint, compared out of band (repeat per peer); name the "
                        "policy's key holder (NAME=FINGERPRINT) so this silo accepts the study key only from it")
    a.add_argument("--by", default="silo-it", help="who approves (recorded)")
    a.add_argument("--epsilon-ceiling", type=float, help="this hospital's lower epsilon cap for this study")
    a.add_argument("--silo-total-epsilon", type=float, help="cap on the sum of all studies' epsilon at this silo")
    a.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    a.add_argument("--release", choices=("manual", "auto"), default="manual",
                   help="consent to releasing the final model: auto, or manual (`silo-node release approve`; default)")
    a.set_defaults(func=_approve)
    rel = sub.add_parser("release", help="consent to, or refuse, releasing a study's final model")
    rel_sub = rel.add_subparsers(dest="release_command", required=True)
    for decision, text in (("approve", "consent to releasing the final model"), ("refuse", "refuse to release it")):
        d = rel_sub.add_parser(decision, help=text)
        d.add_argument("study_id", metavar="STUDY", help="the study's id (as approved at this silo)")
        d.add_argument("--state-dir", required=True)
        d.add_argument("--by", default="silo-it", help="who decides (recorded)")
        d.add_argument("--name", help="this silo's name in its audit log (default: the state directory's name)")
        d.set_defaults(func=_release_decide)
    audit = sub.add_parser("audit", help="export or verify this silo's tamper-evident audit log")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    e = audit_sub.add_parser("export", help="export this silo's audit log as a bundle")
    e.add_argument("--state-dir", required=True)
    e.add_argument("--out", help="directory for the bundle (default STATE/exports)")
    e.add_argument("--name", help="this silo's name (default: the state directory's name)")
    e.add_argument("--user", default="silo-it", help="who exports (recorded in the log)")
    e.set_defaults(func=_audit_export)
    av = audit_sub.add_parser("verify", help="verify exported bundles; names the first broken entry")
    av.add_argument("bundles", nargs="+")
    av.add_argument("--silo", action="append", default=[], metavar="DIR",
                    help="a silo's export: cross-check it against the coordinator export among BUNDLES (repeat per silo)")
    av.set_defaults(func=_audit_verify)
    s = sub.add_parser("start", help="validate, then serve the study through a Flower SuperNode")
    s.add_argument("--study", required=True)
    s.add_argument("--cohort", required=True)
    s.add_argument("--state-dir", required=True)
    s.add_argument("--superlink", required=True, help="HOST:PORT of the coordinator's SuperLink")
    s.add_argument("--name", required=True, help="this silo's name in the study")
    s.add_argument("--node-port", type=int, default=9094, help="local port of the SuperNode (distinct per node)")
    s.add_argument("--node-poll", type=float, default=0.25,
                   help="seconds between the SuperNode's polls when idle (3 = Flower's stock behaviour)")
    s.add_argument("--root-certificates", help="study CA certificate (default: STATE/ca.crt from `certs trust`)")
    s.add_argument("--auth-key", help="SuperNode authentication private key (default: STATE/keys/node-auth.key)")
    s.add_argument("--insecure-local-demo", action="store_true",
                   help="no TLS, no node authentication: only for the local demo on 127.0.0.1")
    s.set_defaults(func=_start)
    c = sub.add_parser("certs", help="TLS and SuperNode authentication for this silo")
    certs_sub = c.add_subparsers(dest="certs_command", required=True)
    cr = certs_sub.add_parser("request", help="make this silo's SuperNode key pair; prints the public key to send")
    cr.add_argument("--state-dir", required=True)
    cr.set_defaults(func=_certs_request)
    ct = certs_sub.add_parser("trust", help="install the study CA certificate the coordinator sent")
    ct.add_argument("ca_file", metavar="CA_FILE")
    ct.add_argument("--state-dir", required=True)
    ct.add_argument("--replace", action="store_true", help="replace a different CA already installed")
    ct.set_defaults(func=_certs_trust)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except PolicyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
