"""`silo-node`: what silo IT runs at the hospital.

  silo-node validate --study STUDY.yaml --cohort FILE.parquet
  silo-node start --study STUDY.yaml --cohort FILE.parquet --state-dir DIR --superlink HOST:PORT --name NAME
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
    from silo_node.approval import approve
    from silo_node.keys import EnrolmentKey
    from silo_node.ledger import SiloBudget

    study = load_study(args.study)
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
        print("WARNING: no peer fingerprints pinned: this silo would seal the study key to any key the "
              "coordinator relays. Pin each peer with --pin after comparing fingerprints out of band.", file=sys.stderr)
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
    approval = approve(state_dir, study, args.pin, args.by)
    print(f"approved {study.id} policy {approval.policy_hash[:12]} with {len(approval.pins)} pinned peer(s)")
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
    from silo_node.approval import approve, load_approval, require_approval

    if load_approval(state_dir, study) is None and args.insecure_local_demo:
        approve(state_dir, study, [], "local-demo (trust on first use)")
    require_approval(state_dir, study)
    silo = Silo.from_cohort(args.name, study, args.cohort, state_dir=state_dir)
    silo.warm_up()
    node_config = (
        f'silo-name="{args.name}" cohort-path="{Path(args.cohort).resolve()}" '
        f'study-path="{Path(args.study).resolve()}" state-dir="{state_dir}"'
    )
    bin_dir = Path(sys.executable).parent
    cmd = [sys.executable, "-m", "silo_node.supernode_launcher", "--superlink", args.superlink, "--port", str(args.node_port),
           "--node-config", node_config]
    cmd += ["--insecure"] if args.insecure_local_demo else ["--root-certificates", str(args.root_certificates)]
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
    finally:
        node.stop()
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
    from policies.audit import verify_bundles

    ok, lines = verify_bundles(args.bundles)
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
    a.add_argument("--pin", action="append", default=[], metavar="FINGERPRINT",
                   help="a peer silo's enrolment fingerprint, compared out of band (repeat per peer)")
    a.add_argument("--by", default="silo-it", help="who approves (recorded)")
    a.add_argument("--epsilon-ceiling", type=float, help="this hospital's lower epsilon cap for this study")
    a.add_argument("--silo-total-epsilon", type=float, help="cap on the sum of all studies' epsilon at this silo")
    a.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    a.set_defaults(func=_approve)
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
    s.add_argument("--root-certificates", help="CA certificate of the coordinator (TLS)")
    s.add_argument("--insecure-local-demo", action="store_true", help="no TLS: only for the local demo on 127.0.0.1")
    s.set_defaults(func=_start)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "start" and not args.insecure_local_demo and not args.root_certificates:
            raise PolicyError("start needs --root-certificates (TLS) or, for a local demo only, --insecure-local-demo")
        return args.func(args)
    except PolicyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
