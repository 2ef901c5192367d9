"""`silo-node`: what silo IT runs at the hospital.

  silo-node validate --study STUDY.yaml --cohort FILE.parquet
  silo-node start --study STUDY.yaml --cohort FILE.parquet --state-dir DIR --superlink HOST:PORT --name NAME
  silo-node host --silos FILE                    (several co-located silos: one line of `start` arguments each)
  silo-node certs request --state-dir DIR        (SuperNode key; send node-auth.pub to the coordinator)
  silo-node certs trust CA.crt --state-dir DIR   (the study CA the coordinator sent)
  silo-node backup --state-dir DIR --out FILE (--passphrase-file F | --passphrase-stdin | --key-file F)
  silo-node restore --in FILE --state-dir DIR (same key options) [--force]
  silo-node status --state-dir DIR [--json]      (studies, spend vs ceilings, last rounds, connection, cohort)
  silo-node health --state-dir DIR               (exit 0 healthy, else 1 and one line why; for HEALTHCHECK)
  silo-node apps list --state-dir DIR            (the Flower apps (FAB sha256) this silo runs)
  silo-node apps allow SHA256 --state-dir DIR    (after reviewing a FAB; `apps revoke` undoes it)
  silo-node withdraw STUDY --state-dir DIR [--reason TEXT]   (stop taking part; destroys the study's keys)
  silo-node keys destroy STUDY --state-dir DIR --reason TEXT (a finished study's keys, e.g. no release coming)
  silo-node release approve|refuse STUDY_ID --state-dir DIR   (consent to releasing the final model)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
from pathlib import Path

from policies.errors import PolicyError
from silo_node.logs import DEFAULT_KEEP, DEFAULT_MAX_BYTES


# Imported on first use: `silo-node health` runs every 30 s in a container and must not
# pay for pandas and TenSEAL (policies.study, policies.validation) on every call.
def load_study(path):
    from policies.study import load_study as _load_study

    return _load_study(path)


def validate_cohort(path, study):
    from policies.validation import validate_cohort as _validate_cohort

    return _validate_cohort(path, study)


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
    for flag, value in (("--epsilon-ceiling", args.epsilon_ceiling), ("--silo-total-epsilon", args.silo_total_epsilon)):
        if value is not None and not (math.isfinite(value) and value > 0):  # before any key, reservation or ledger
            raise PolicyError(f"{flag} must be a positive, finite epsilon, not {value:g}")
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
    """Validate, load the cohort into the resident service, then join via a SuperNode.

    A bad study or cohort is refused before the state directory is touched and before
    the training stack (torch, TenSEAL) is even imported.
    """
    from silo_node.cohort import CohortFingerprint
    from silo_node.state_format import check_state_format, mark_state_format

    state_dir = Path(args.state_dir).resolve()
    if state_dir.exists():
        check_state_format(state_dir)  # reads only: a state from an unknown version is refused first
    study = load_study(args.study)
    report = validate_cohort(args.cohort, study)
    if not report.ok:
        print(report.render(), file=sys.stderr)
        print(f"{args.cohort}: cohort fails the study's error rules; not joining", file=sys.stderr)
        return 1
    fingerprint = CohortFingerprint.of(args.cohort)  # every round checks the file against this
    from silo_node.service import serve
    from silo_node.worker import Silo

    state_dir.mkdir(parents=True, exist_ok=True)
    mark_state_format(state_dir)
    connection = ["--insecure"] if args.insecure_local_demo else _tls_flags(args, state_dir)  # fail before loading
    from silo_node.approval import approve, load_approval, require_approval

    if load_approval(state_dir, study) is None and args.insecure_local_demo:
        approve(state_dir, study, [], "local-demo (trust on first use)")
    require_approval(state_dir, study)
    silo = Silo.from_cohort(args.name, study, args.cohort, state_dir=state_dir, fingerprint=fingerprint)
    silo.validation = report.model_dump(mode="json", exclude={"file"}) | {"ok": report.ok}  # counts, no local path
    silo.warm_up()
    node_config = (
        f'silo-name="{args.name}" cohort-path="{Path(args.cohort).resolve()}" '
        f'study-path="{Path(args.study).resolve()}" state-dir="{state_dir}"'
    )
    bin_dir = Path(sys.executable).parent
    # the SuperNode runs no ClientApp itself: the silo's app launcher checks each run's FAB first
    cmd = [sys.executable, "-m", "silo_node.supernode_launcher", "--superlink", args.superlink, "--port", str(args.node_port),
           "--node-config", node_config, "--silo-state-dir", str(state_dir), "--silo-name", args.name]
    cmd += connection
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
               FEDCOHORT_NODE_POLL=str(args.node_poll), FLWR_SUPEREXEC_TASK_POLL_INTERVAL=str(min(args.node_poll, 1.0)),
               PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    from silo_node.supernode_keeper import SuperNodeKeeper

    node = SuperNodeKeeper(cmd, env)  # restarts the SuperNode if it exits (e.g. a new SuperLink)

    def _stop(*_: object) -> None:
        # once: a second signal (e.g. the group's and a host's) must not cut short stopping the SuperNode
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    log = _rotated_output(args)  # from here on, the silo's and its SuperNode's output
    pid = node.start()
    print(f"silo '{args.name}' serving study {study.id} ({study.policy_hash()[:12]}); SuperNode pid {pid}", flush=True)
    _record_run(args, state_dir, study)
    try:
        serve(state_dir, silo, stop=lambda: node.stopping)
    except SystemExit:
        pass
    finally:
        node.stop()
        from silo_node.status import clear_run_file

        clear_run_file(state_dir)
        if log is not None:
            log.stop()
    if node.gave_up:
        print("error: the SuperNode exited right after starting, again and again; see its log above (a key the "
              "coordinator has not registered shows 'Failed to activate SuperNode')", file=sys.stderr)
        return 1
    return 0


def _rotated_output(args: argparse.Namespace):
    """With --log-file: everything printed from here on (SuperNode included) goes to a rotated file."""
    if not args.log_file:
        return None
    from silo_node.logs import RotatedOutput

    log = RotatedOutput(Path(args.log_file), args.log_max_bytes, args.log_keep)
    print(f"logging to {Path(args.log_file).resolve()} (rotated at {args.log_max_bytes} bytes, {args.log_keep} kept)",
          flush=True)
    return log.start()


def _record_run(args: argparse.Namespace, state_dir: Path, study) -> None:
    """What `silo-node status` and `health` read about this running silo (no patient data)."""
    from silo_node.status import cohort_fingerprint, write_run_file

    write_run_file(state_dir, {
        "name": args.name, "study_id": study.id, "study_name": study.name, "policy_hash": study.policy_hash(),
        "superlink": args.superlink, "node_port": args.node_port, "insecure_local_demo": args.insecure_local_demo,
        "cohort": str(Path(args.cohort).resolve()), "cohort_sha256": cohort_fingerprint(Path(args.cohort)),
        "log_file": str(Path(args.log_file).resolve()) if args.log_file else None,
    })


def _status(args: argparse.Namespace) -> int:
    """Print what this silo is doing and has spent; counts and hashes only."""
    from silo_node.status import collect_status, render_status

    status = collect_status(Path(args.state_dir), probe_superlink=not args.no_probe)
    print(json.dumps(status, indent=2) if args.json else render_status(status))
    return 0


def _health(args: argparse.Namespace) -> int:
    """Exit 0 when healthy, 1 otherwise; one line either way (a container HEALTHCHECK)."""
    from silo_node.status import health

    ok, line = health(Path(args.state_dir), require_superlink=args.require_superlink)
    print(line)
    return 0 if ok else 1


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


def _apps_list(args: argparse.Namespace) -> int:
    """The FABs this silo lets through its app launcher; everything else is refused."""
    from silo_node.app_allowlist import allowed_apps

    for app in allowed_apps(Path(args.state_dir)):
        extra = f" {app.at} {app.note}".rstrip() if app.at or app.note else ""
        print(f"{app.sha256}  {app.source}{extra}")
    return 0


def _apps_change(args: argparse.Namespace) -> int:
    """Allow or revoke one FAB hash; the change is recorded in the silo's audit log."""
    from policies.audit import open_party_log
    from silo_node.app_allowlist import allow, normalise_hash, revoke

    state_dir = Path(args.state_dir).resolve()
    digest = normalise_hash(args.sha256)
    changed = allow(state_dir, digest, args.by, args.note) if args.apps_command == "allow" else revoke(state_dir, digest)
    if not changed:
        print(f"{digest}: already {'allowed' if args.apps_command == 'allow' else 'not on the allow-list'}; nothing changed")
        return 0
    action = "app.allowed" if args.apps_command == "allow" else "app.revoked"
    open_party_log(state_dir, args.name or state_dir.name, "silo").append(
        action, f"fab-{digest[:12]}", {"fab_sha256": digest, "note": args.note}, actor=args.by)
    print(f"{digest}: {'allowed' if args.apps_command == 'allow' else 'revoked'}")
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


def _backup_secret(args: argparse.Namespace):
    """Exactly one of --passphrase-file, --passphrase-stdin, --key-file (argparse enforces one)."""
    from silo_node.backup import key_from_file, passphrase_from_file, passphrase_from_text

    if args.key_file:
        return key_from_file(Path(args.key_file))
    if args.passphrase_file:
        return passphrase_from_file(Path(args.passphrase_file))
    return passphrase_from_text(sys.stdin.readline())


def _backup(args: argparse.Namespace) -> int:
    """Encrypted archive of this silo's keys, ledgers, approvals, outbox and audit log."""
    from silo_node.backup import backup

    result = backup(Path(args.state_dir), Path(args.out), _backup_secret(args), actor=args.user)
    print(f"backup written: {result.path} ({result.size} bytes, {result.files} files, mode 0600)")
    print(f"sha256 {result.sha256} (recorded in this silo's audit log)")
    for study, head in sorted(result.ledgers.items()):
        print(f"  privacy ledger {study}: {head['seq']} charges")
    for rel, why in sorted(result.skipped.items()):
        print(f"  not backed up: {rel} ({why})")
    return 0


def _restore(args: argparse.Namespace) -> int:
    """Put a backup back; an older one than the coordinator witnessed makes the silo refuse to train."""
    from silo_node.backup import restore

    result = restore(Path(args.in_file), Path(args.state_dir), _backup_secret(args), force=args.force, actor=args.user)
    print(f"restored {result.files} files into {result.state_dir} from a backup made {result.created_at}")
    if result.replaced is not None:
        print(f"the state that was there is kept in {result.replaced} (it may hold newer ledgers: keep it until "
              f"the silo trains again)")
    for study, head in sorted(result.ledgers.items()):
        print(f"  privacy ledger {study}: {head.get('seq')} charges")
    print("If the coordinator witnessed more charges than these, this silo refuses to train in those studies "
          "(the ledger never goes backwards): restore a newer backup, see README 'Backup and restore'.")
    return 0


def _host(args: argparse.Namespace) -> int:
    """Several silos from one process image: torch, tenseal and opacus imported once, one fork per silo."""
    from silo_node.host import host, read_silo_lines

    return host(read_silo_lines(Path(args.silos)))

def _print_destroyed(done) -> None:
    for f in done.files:
        print(f"  destroyed {f['file']} ({f['bytes']} bytes, sha256 before {f['sha256_before']})")
    if not done.files:
        print("  no key files were left to destroy")


def _withdraw(args: argparse.Namespace) -> int:
    """Stop taking part in a study: every later request is refused as withdrawn; keys destroyed."""
    from silo_node.key_lifecycle import withdraw

    state_dir = Path(args.state_dir).resolve()
    done = withdraw(state_dir, args.study, args.reason or "", party=args.name or state_dir.name, actor=args.by)
    print(f"withdrew from study {done.study_id}: every later request is refused (\"withdrawn\"); "
          "the coordinator records it at this silo's next refusal and stops asking it")
    _print_destroyed(done)
    return 0


def _keys_destroy(args: argparse.Namespace) -> int:
    """Destroy a study's secret key material at this silo (recorded in the audit log)."""
    from silo_node.key_lifecycle import destroy_study_secret

    state_dir = Path(args.state_dir).resolve()
    done = destroy_study_secret(state_dir, args.study, args.reason, party=args.name or state_dir.name, actor=args.by)
    print(f"study {done.study_id}: key material destroyed; requests that need it are refused from now on")
    _print_destroyed(done)
    return 0


def _lifecycle_parsers(sub: argparse._SubParsersAction) -> None:
    w = sub.add_parser("withdraw", help="stop taking part in a study (refuse every request, destroy its keys)")
    w.add_argument("study", metavar="STUDY", help="the study's id or policy hash (12+ leading digits)")
    w.add_argument("--state-dir", required=True)
    w.add_argument("--reason", help="why (recorded in this silo's audit log and told to the coordinator)")
    w.add_argument("--name", help="this silo's name (default: the state directory's name)")
    w.add_argument("--by", default="silo-it", help="who withdraws (recorded)")
    w.set_defaults(func=_withdraw)
    k = sub.add_parser("keys", help="this silo's study key material")
    keys_sub = k.add_subparsers(dest="keys_command", required=True)
    d = keys_sub.add_parser("destroy", help="overwrite and delete a study's secret keys (audit-logged)")
    d.add_argument("study", metavar="STUDY", help="the study's id or policy hash (12+ leading digits)")
    d.add_argument("--state-dir", required=True)
    d.add_argument("--reason", required=True, help="why (recorded in this silo's audit log)")
    d.add_argument("--name", help="this silo's name (default: the state directory's name)")
    d.add_argument("--by", default="silo-it", help="who destroys (recorded)")
    d.set_defaults(func=_keys_destroy)


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
    s.add_argument("--log-file", help="write the silo's and its SuperNode's output here, rotated by size "
                                      "(default: standard output, e.g. for a container's log driver)")
    s.add_argument("--log-max-bytes", type=int, default=DEFAULT_MAX_BYTES, help="rotate the log file at this size")
    s.add_argument("--log-keep", type=int, default=DEFAULT_KEEP, help="old log files kept (FILE.1 ... FILE.N)")
    s.set_defaults(func=_start)
    st = sub.add_parser("status", help="studies approved, spend vs ceilings, last rounds, connection, cohort")
    st.add_argument("--state-dir", required=True)
    st.add_argument("--json", action="store_true", help="print the status as JSON")
    st.add_argument("--no-probe", action="store_true", help="do not try to connect to the coordinator's SuperLink")
    st.set_defaults(func=_status)
    h = sub.add_parser("health", help="exit 0 if this silo is running and serving, else 1 with one line why")
    h.add_argument("--state-dir", required=True)
    h.add_argument("--require-superlink", action="store_true",
                   help="also fail when the coordinator's SuperLink does not accept connections")
    h.set_defaults(func=_health)
    hs = sub.add_parser("host", help="run several silos on this machine, importing torch, tenseal and opacus once")
    hs.add_argument("--silos", required=True, metavar="FILE",
                   help="one silo per line: the arguments of its `silo-node start` (each forked from one process)")
    hs.set_defaults(func=_host)
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
    _add_backup_commands(sub)
    apps = sub.add_parser("apps", help="the Flower apps (FABs, by sha256) this silo agrees to serve")
    apps_sub = apps.add_subparsers(dest="apps_command", required=True)
    al = apps_sub.add_parser("list", help="allowed FAB hashes: the installed fedcohort's app, then silo IT's additions")
    al.add_argument("--state-dir", required=True)
    al.set_defaults(func=_apps_list)
    for verb, text in (("allow", "allow a FAB hash silo IT has reviewed"), ("revoke", "remove a hash added with allow")):
        ap = apps_sub.add_parser(verb, help=text)
        ap.add_argument("sha256", metavar="SHA256", help="sha256 of the FAB (as `apps list` and refusals show it)")
        ap.add_argument("--state-dir", required=True)
        ap.add_argument("--by", default="silo-it", help="who decides (recorded)")
        ap.add_argument("--note", default="", help="why (recorded)")
        ap.add_argument("--name", help="this silo's name in its audit log (default: the state directory's name)")
        ap.set_defaults(func=_apps_change)

    _lifecycle_parsers(sub)
    return parser


def _add_backup_commands(sub: argparse._SubParsersAction) -> None:
    for name, what in (("backup", "write an encrypted archive of this silo's state (keys, ledgers, audit log)"),
                       ("restore", "put a backup back into a state directory (refuses a wrong key or altered archive)")):
        b = sub.add_parser(name, help=what)
        b.add_argument("--state-dir", required=True)
        if name == "backup":
            b.add_argument("--out", required=True, help="archive file to create (never overwritten)")
        else:
            b.add_argument("--in", dest="in_file", required=True, help="archive file written by `silo-node backup`")
            b.add_argument("--force", action="store_true",
                           help="replace a non-empty state directory (it is moved aside, not deleted)")
        key = b.add_mutually_exclusive_group(required=True)
        key.add_argument("--passphrase-file", help="file (mode 0600) whose first line is the passphrase (scrypt)")
        key.add_argument("--passphrase-stdin", action="store_true", help="read the passphrase from standard input")
        key.add_argument("--key-file", help="file (mode 0600) with a 32-byte key (raw or hex)")
        b.add_argument("--user", default="silo-it", help="who runs it (recorded in the audit log)")
        b.set_defaults(func=_backup if name == "backup" else _restore)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except PolicyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
