"""`coordinator`: run studies and the demo.

  coordinator demo [--state-dir DIR] [--json PATH] [--rounds N]
  coordinator certs init --state-dir DIR [--host NAME ...]
  coordinator certs register --state-dir DIR --silo NAME --superlink HOST:PORT PUBKEY_FILE
  coordinator start --state-dir DIR [--study STUDY.yaml] [--superlink HOST:PORT] [--insecure-local-demo]
  coordinator serve --state-dir DIR [--host 0.0.0.0] [--port 9092]   (the TLS SuperLink, in the foreground)
  coordinator health --state-dir DIR            (exit 0 when `serve` and its SuperLink answer; for HEALTHCHECK)
  coordinator silo revoke NAME --state-dir DIR --reason TEXT [--superlink HOST:PORT]
  coordinator study release --state-dir DIR [--study ID] [--superlink HOST:PORT] [--insecure-local-demo]
  coordinator study export-model --state-dir DIR [--study ID] --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import yaml
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from policies.audit import AUDIT_FILE, open_party_log
from policies.audit_crosscheck import verify_bundles
from policies.errors import PolicyError
from policies.study import load_study, shipped_study
from policies.validation import validate_cohort
from coordinator.demo import run_local_study, sample_cohorts
from coordinator.start import interrupted_round
from coordinator.users import ensure_demo_lead, register_cli as register_users_cli

# FLamby Fed-Heart-Disease published means over the 4 hospitals (see ../shared/BENCHMARKS.md)
FLAMBY = {"FedAvg (FLamby)": 0.6850, "FedYogi (FLamby, best federated)": 0.7314, "pooled training (FLamby)": 0.7353}


def _archive_previous_demo(state_dir: Path) -> Path | None:
    """A finished demo's state is kept, not overwritten: move it under archive/<time>/.

    The demo's study would otherwise meet its own history: the store holds the study as
    completed, and each silo's privacy ledger holds the budget it already spent.
    """
    parts = [state_dir / p for p in ("coordinator", "silos", "runtime", "exports", "study.yaml")]
    if not (state_dir / "coordinator").exists():
        return None
    dest = state_dir / "archive" / time.strftime("%Y%m%dT%H%M%S")
    dest.mkdir(parents=True, exist_ok=False)
    for part in parts:
        if part.exists():
            shutil.move(str(part), str(dest / part.name))
    return dest


def _study_file(args: argparse.Namespace, state_dir: Path) -> Path:
    """The study this demo runs: the given one, or a copy with other rounds (a new hash)."""
    path = Path(args.study) if args.study else shipped_study()
    study = load_study(path)
    data = study.model_dump(mode="json")
    if args.rounds is not None and args.rounds != study.training.rounds:
        data["training"]["rounds"] = args.rounds
        data["approval"]["auto_rounds"] = max(args.rounds, data["approval"]["auto_rounds"])
    if data == study.model_dump(mode="json"):
        return path
    out = state_dir / "study.yaml"
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    load_study(out)
    return out


def _fmt(x: object) -> str:
    return f"{x:.3f}" if isinstance(x, float) else ("suppressed" if x is None else str(x))


def print_results(console: Console, summary: dict) -> None:
    final = summary.get("final") or {}
    table = Table(title=f"Study {summary.get('study_id')} — {summary.get('rounds')} rounds, final model on each hospital's test set")
    for col in ("hospital", "test rows", "accuracy", "sensitivity", "specificity"):
        table.add_column(col, justify="right" if col != "hospital" else "left")
    for silo, rep in sorted((final.get("per_silo") or {}).items()):
        table.add_row(silo, _fmt(rep.get("n")), _fmt(rep.get("accuracy")), _fmt(rep.get("sensitivity")), _fmt(rep.get("specificity")))
    pooled = final.get("pooled") or {}
    table.add_row("[bold]pooled test set[/]", _fmt(int(pooled.get("n", 0))), _fmt(pooled.get("accuracy")),
                  _fmt(pooled.get("sensitivity")), _fmt(pooled.get("specificity")))
    table.add_row("[bold]4-hospital mean[/]", "", _fmt(final.get("mean_center_accuracy")), "", "")
    console.print(table)
    ref = Table(title="Published reference (FLamby Fed-Heart-Disease, mean accuracy over 4 hospitals)")
    ref.add_column("method")
    ref.add_column("mean accuracy", justify="right")
    for name, value in FLAMBY.items():
        ref.add_row(name, f"{value:.4f}")
    ref.add_row("[bold]this run[/]", _fmt(final.get("mean_center_accuracy")))
    console.print(ref)
    console.print("Cells below the study's small-cell minimum are suppressed at the silo and shown as 'suppressed' or '<k'.")


def demo_json(summary: dict) -> dict:
    final = summary.get("final") or {}
    return {
        "status": summary.get("status"),
        "reason": summary.get("reason", ""),
        "study_id": summary.get("study_id"),
        "policy_hash": summary.get("policy_hash"),
        "mean_center_accuracy": final.get("mean_center_accuracy"),
        "center_accuracy": final.get("center_accuracy"),
        "pooled_test_accuracy": final.get("pooled_test_accuracy"),
        "pooled": final.get("pooled"),
        "per_silo": final.get("per_silo"),
        "rounds": summary.get("rounds"),
        "history": summary.get("history"),
        "wall_seconds": summary.get("wall_seconds"),
        "flower_run_id": summary.get("flower_run_id"),
    }


def _print_demo_lead(console: Console, state_dir: Path) -> None:
    """The demo's study lead account for `make ui`: a random password, shown once, kept 0600."""
    from coordinator.store import open_store

    store = open_store(None, state_dir)
    try:
        name, password = ensure_demo_lead(store, state_dir)
    finally:
        store.close()
    if password:
        console.print(f"web UI account: [bold]{name}[/] / [bold]{password}[/] (shown once; also in "
                      f"{state_dir / 'coordinator' / 'lead-password.txt'}, mode 0600). Start it with `make ui`.")


def _demo(args: argparse.Namespace) -> int:
    console = Console()
    if args.study:
        load_study(args.study)  # a bad policy is refused before the state directory is made or archived
    state_dir = Path(args.state_dir).resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    resume_after = interrupted_round(state_dir, load_study(_study_file(args, state_dir)))
    if resume_after is not None:  # same policy, unfinished, checkpointed: continue it, archive nothing
        console.print(f"resuming the interrupted demo after round {resume_after} (a new Flower run)")
    elif archived := _archive_previous_demo(state_dir):
        console.print(f"previous demo state kept in {archived}")
    study_path = _study_file(args, state_dir)
    study = load_study(study_path)
    cohorts = sample_cohorts()
    console.print(f"[bold]fedcohort demo[/]: study [cyan]{study.id}[/] (policy {study.policy_hash()[:12]}), "
                  f"{study.training.strategy}, {study.training.rounds} rounds, 4 silos on 127.0.0.1; state in {state_dir}")
    for name, path in cohorts.items():
        report = validate_cohort(path, study)
        warn = sum(1 for r in report.results if not r.passed and r.severity == "warning")
        console.print(f"  silo {name:12s} cohort {report.rows} rows: {'valid' if report.ok else 'BLOCKED'}, {warn} warning rule(s)")
        if not report.ok:
            raise PolicyError(f"{path}: sample cohort fails validation:\n{report.render()}")
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} rounds"),
                  TimeElapsedColumn(), console=console, transient=False) as progress:
        task = progress.add_task("starting SuperLink and silos", total=study.training.rounds)

        def on_progress(summary: dict) -> None:
            hist = summary.get("history") or []
            desc = summary.get("status", "")
            if hist and hist[-1].get("pooled_entering_model"):
                desc += f" | pooled acc of model r{len(hist) - 1}: {hist[-1]['pooled_entering_model']['accuracy']:.3f}"
            progress.update(task, completed=summary.get("rounds", 0), description=desc)

        summary = run_local_study(study_path, state_dir, cohorts, on_progress=on_progress, timeout=args.timeout)
    out = demo_json(summary)
    (state_dir / "coordinator").mkdir(parents=True, exist_ok=True)
    (state_dir / "coordinator" / "demo_summary.json").write_text(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))
    if summary.get("status") != "completed":
        console.print(f"[red]study did not complete[/]: {summary.get('reason')}")
        return 1
    print_results(console, summary)
    _print_demo_lead(console, state_dir)
    console.print(f"wall time {summary['wall_seconds']:.1f} s; all processes stopped. Summary: {state_dir / 'coordinator' / 'demo_summary.json'}")
    return 0


def _start(args: argparse.Namespace) -> int:
    """Run the given study, or resume the unfinished one, over a SuperLink; print the outcome."""
    from coordinator.start import plan_start, start_study

    state_dir = Path(args.state_dir).resolve()
    tls = _study_tls(state_dir, args.insecure_local_demo, "start")
    plan = plan_start(state_dir, Path(args.study) if args.study else None, args.db_url)
    where = "from the start" if plan.resume_after is None else f"resuming after round {plan.resume_after}"
    print(f"study {plan.label} ({where}); SuperLink {args.superlink}; state in {state_dir}", flush=True)
    last = [""]

    def on_progress(summary: dict) -> None:
        status = str(summary.get("status", ""))
        if status != last[0]:
            last[0] = status
            print(f"  {status}", flush=True)

    summary = start_study(state_dir, plan, args.superlink, expected_silos=args.expected_silos, db_url=args.db_url,
                          timeout=args.timeout, on_progress=on_progress, tls=tls)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(demo_json(summary), indent=2))
    if summary.get("status") != "completed":
        print(f"study did not complete: {summary.get('reason')}; `coordinator start --state-dir {args.state_dir}` "
              "resumes it from its last checkpoint", file=sys.stderr)
        return 1
    print_results(Console(), summary)
    return 0


def _serve(args: argparse.Namespace) -> int:
    """Run the study's TLS SuperLink in the foreground (a container's one command)."""
    from coordinator.serve import serve

    return serve(Path(args.state_dir), args.host, args.port)


def _health(args: argparse.Namespace) -> int:
    """Exit 0 when `coordinator serve` and its SuperLink answer, else 1; one line either way."""
    from coordinator.serve import health

    ok, line = health(Path(args.state_dir))
    print(line)
    return 0 if ok else 1


def _audit_export(args: argparse.Namespace) -> int:
    """Export the coordinator's log (and, for a local demo, each local silo's) as bundles."""
    state_dir = Path(args.state_dir).resolve()
    out = Path(args.out or state_dir / "exports").resolve()
    coordinator_dir = state_dir / "coordinator"
    if not (coordinator_dir / AUDIT_FILE).exists():
        raise PolicyError(f"{coordinator_dir / AUDIT_FILE}: no coordinator audit log here; run a study first")
    parties = [(coordinator_dir, "coordinator", "coordinator")]
    parties += [(d, d.name, "silo") for d in sorted((state_dir / "silos").glob("*")) if (d / AUDIT_FILE).exists()]
    for party_dir, party, role in parties:
        bundle = open_party_log(party_dir, party, role).export(out / party, actor=args.user)
        print(f"{party:12s} -> {bundle}")
    return 0


def _audit_verify(args: argparse.Namespace) -> int:
    ok, lines = verify_bundles(args.bundles, args.silo)
    print("\n".join(lines))
    return 0 if ok else 1


def _certs_init(args: argparse.Namespace) -> int:
    """Make the study CA and the SuperLink's certificate; print what goes to the silos."""
    from coordinator.certs import init_study_ca

    tls = init_study_ca(Path(args.state_dir), args.host or None, args.study_name)
    print(f"study CA and SuperLink certificate written to {tls.ca_cert.parent} (keys mode 0600)")
    print(f"send to every silo: {tls.ca_cert}")
    print(f"CA fingerprint (read it to each silo's IT by phone; `silo-node certs trust` prints the same):\n  "
          f"{tls.ca_fingerprint()}")
    database = Path(args.state_dir).resolve() / "coordinator" / "superlink.db"
    print(f"start the SuperLink with: flower-superlink {' '.join(tls.superlink_flags())} --enable-supernode-auth "
          f"--database {database} (the database keeps registered node keys across restarts)")
    return 0


def _certs_register(args: argparse.Namespace) -> int:
    """Check a silo's SuperNode key (fingerprint read out by its IT), register it, record it."""
    from coordinator.certs import describe, load_superlink_tls, register_node_key, registered_nodes, write_connection
    from coordinator.runtime import _tool, flower_env
    from coordinator.store import open_store
    from policies.node_identity import read_node_public_key

    state_dir = Path(args.state_dir).resolve()
    key = read_node_public_key(Path(args.public_key))
    print(f"silo {args.silo}: SuperNode key {describe(key)}")
    if args.fingerprint is not None:
        if "".join(args.fingerprint.split()).replace(":", "").lower() != key.fingerprint().replace(" ", ""):
            raise PolicyError(f"{args.public_key}: fingerprint {key.fingerprint()} is not the one silo IT read out "
                              f"({args.fingerprint}); not registered")
    elif not args.yes:
        try:
            answer = input("Did the silo's IT read out exactly this fingerprint? [y/N] ")
        except EOFError:  # no terminal: nobody confirmed
            answer = ""
        if answer.strip().lower() not in ("y", "yes"):
            print("not registered")
            return 1
    tls = load_superlink_tls(state_dir)
    with open_store(args.db_url, state_dir) as store:
        known = store.get_silo(args.silo)
        if known and known.node_auth_key not in (None, key.openssh.decode()):
            raise PolicyError(f"silo {args.silo} is already registered with another SuperNode key; not registered")
        flwr_home = state_dir / "coordinator" / "flwr_home"
        write_connection(flwr_home, args.superlink, tls.ca_cert)
        if known and known.node_auth_key == key.openssh.decode() and str(known.flower_node_id) in {
                n.get("node-id") for n in registered_nodes(_tool("flwr"), flower_env(flwr_home))}:
            print(f"silo {args.silo} is already registered with this key as Flower node {known.flower_node_id}")
            return 0  # (a SuperLink without --database forgets registrations: then register again)
        node_id = register_node_key(_tool("flwr"), flower_env(flwr_home), Path(args.public_key), args.silo)
        store.register_node_key(args.silo, key.openssh.decode(), node_id)
    open_party_log(state_dir / "coordinator", "coordinator", "coordinator").append(
        "silo.node_key_registered", args.silo, {"node_id": str(node_id), "fingerprint": key.fingerprint()},
        actor=args.user)
    print(f"registered silo {args.silo} as Flower node {node_id}")
    return 0


def _silo_revoke(args: argparse.Namespace) -> int:
    """Revoke a silo: unregister its SuperNode key, end its enrolments, audit-log it."""
    from coordinator.revocation import CERTIFICATE_NOTE, revoke_silo

    done = revoke_silo(Path(args.state_dir), args.name, args.reason, db_url=args.db_url, superlink=args.superlink,
                       user=args.user)
    node = "no node id on record" if done.node_id is None else f"Flower node {done.node_id}"
    at_link = "unregistered at the SuperLink" if done.unregistered else "not registered at the SuperLink (any more)"
    print(f"revoked silo {done.silo} ({node}, {at_link}); enrolments ended: {', '.join(done.studies) or 'none'}")
    print(f"certificate: {CERTIFICATE_NOTE}")
    print("a running study drops it before its next round and re-keys (CKKS) for the remaining silos")
    return 0


def _silo_parser(sub: argparse._SubParsersAction) -> None:
    silo = sub.add_parser("silo", help="a silo's standing in the federation: revoke")
    silo_sub = silo.add_subparsers(dest="silo_command", required=True)
    r = silo_sub.add_parser("revoke", help="unregister a silo's SuperNode key, end its enrolments, re-key running studies")
    r.add_argument("name", metavar="NAME", help="the silo's name as registered")
    r.add_argument("--state-dir", required=True)
    r.add_argument("--reason", required=True, help="why (recorded in the audit log)")
    r.add_argument("--superlink", help="HOST:PORT of the SuperLink's Control API (default: the one `certs register` used)")
    r.add_argument("--db-url", help="SQLAlchemy URL of the store (default: SQLite under the state dir)")
    r.add_argument("--user", default="coordinator-cli", help="who revokes (recorded in the audit log)")
    r.set_defaults(func=_silo_revoke)

def _study_tls(state_dir: Path, insecure_local_demo: bool, command: str):
    """TLS to the study CA (`certs init`), e.g. the SuperLink `serve` runs; None only when asked."""
    if insecure_local_demo:
        return None
    from coordinator.certs import load_superlink_tls

    try:
        return load_superlink_tls(state_dir)
    except PolicyError as exc:
        raise PolicyError(f"{command} runs over TLS to the study CA: {exc}; for a study on 127.0.0.1 without TLS "
                          "pass --insecure-local-demo") from None


def _study_release(args: argparse.Namespace) -> int:
    """Request the model release (unless one is pending) and deliver it to the silos in a Flower run."""
    from coordinator.release import run_release

    state_dir = Path(args.state_dir).resolve()
    tls = _study_tls(state_dir, args.insecure_local_demo, "release")
    summary = run_release(state_dir, args.study, args.superlink, args.user,
                          expected_silos=args.expected_silos, db_url=args.db_url, timeout=args.timeout, tls=tls)
    for silo, answer in sorted((summary.get("consents") or {}).items()):
        print(f"  {silo:14s} {answer}")
    if summary.get("release_status") != "released":
        print(f"release failed: {summary.get('reason')}", file=sys.stderr)
        return 1
    print(f"model released: sha256 {summary['model_sha256']}; {summary.get('reason')}")
    print(f"export it with `coordinator study export-model --state-dir {args.state_dir} --out DIR`")
    return 0


def _study_export_model(args: argparse.Namespace) -> int:
    """Write the released model's card and weights (model_card.json, model.safetensors) to --out."""
    from coordinator.release import _study_row, export_model
    from coordinator.store import open_store

    with open_store(args.db_url, Path(args.state_dir).resolve()) as store:
        row = _study_row(store, args.study)
        out = export_model(store, row.id, Path(args.out), version=row.version)
    print(f"model card and weights of {row.label} written to {out}")
    return 0


def _study_parser(sub: argparse._SubParsersAction) -> None:
    study = sub.add_parser("study", help="a finished study's model: release it to the store, export it")
    study_sub = study.add_subparsers(dest="study_command", required=True)
    r = study_sub.add_parser("release", help="ask the silos to release the final model (each by its consent policy)")
    r.add_argument("--state-dir", default=".fedcohort")
    r.add_argument("--study", help="study id (default: the one completed study in the store)")
    r.add_argument("--superlink", default="127.0.0.1:9092", help="HOST:PORT of the SuperLink the silos connect to")
    r.add_argument("--expected-silos", type=int, default=4, help="wait (bounded) for this many silos")
    r.add_argument("--user", default="lead-cli", help="who requests (recorded in the store and audit log)")
    r.add_argument("--db-url", help="SQLAlchemy URL of the store (default: SQLite under the state dir)")
    r.add_argument("--timeout", type=float, default=1800.0, help="give up following the run after this many seconds")
    r.add_argument("--insecure-local-demo", action="store_true", help="no TLS: only for studies on 127.0.0.1")
    r.set_defaults(func=_study_release)
    e = study_sub.add_parser("export-model", help="write the released model card and weights to a directory")
    e.add_argument("--state-dir", default=".fedcohort")
    e.add_argument("--study", help="study id (default: the one completed study in the store)")
    e.add_argument("--out", required=True, help="directory to write model_card.json and model.safetensors into")
    e.add_argument("--db-url", help="SQLAlchemy URL of the store (default: SQLite under the state dir)")
    e.set_defaults(func=_study_export_model)


def _ui(args: argparse.Namespace) -> int:
    """Serve the web UI; replaces this process with `python -m ui` (ui imports coordinator, not the reverse)."""
    argv = [sys.executable, "-m", "ui", "--state-dir", args.state_dir, "--address", args.address, "--port", str(args.port)]
    if args.db_url:
        argv += ["--db-url", args.db_url]
    os.execv(sys.executable, argv)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="coordinator", description="fedcohort coordinator")
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="run the heart study on the 4 sample hospitals on this machine")
    d.add_argument("--state-dir", default=".fedcohort", help="where coordinator and silo state go (default .fedcohort)")
    d.add_argument("--json", help="also write the summary as JSON here")
    d.add_argument("--study", help="study policy YAML (default: the shipped heart study)")
    d.add_argument("--rounds", type=int, help="override the number of rounds (makes a new policy version)")
    d.add_argument("--timeout", type=float, default=1800.0, help="give up after this many seconds")
    d.set_defaults(func=_demo)
    st = sub.add_parser("start", help="run a study, or resume the one a crash interrupted, over a SuperLink")
    st.add_argument("--state-dir", default=".fedcohort")
    st.add_argument("--study", help="study policy YAML (default: the one unfinished study in the store)")
    st.add_argument("--superlink", default="127.0.0.1:9092",
                    help="HOST:PORT of the SuperLink; one is started there if none listens (default 127.0.0.1:9092)")
    st.add_argument("--expected-silos", type=int, default=4, help="wait (bounded) for this many silos before a phase")
    st.add_argument("--db-url", help="SQLAlchemy URL of the store (default: SQLite under the state dir)")
    st.add_argument("--json", help="also write the summary as JSON here")
    st.add_argument("--timeout", type=float, default=3600.0, help="give up following the run after this many seconds")
    st.add_argument("--insecure-local-demo", action="store_true", help="no TLS: only for studies on 127.0.0.1")
    st.set_defaults(func=_start)
    sv = sub.add_parser("serve", help="run the study's SuperLink (TLS, SuperNode authentication) in the foreground")
    sv.add_argument("--state-dir", required=True, help="holds coordinator/tls from `certs init`")
    sv.add_argument("--host", default="0.0.0.0", help="address the SuperLink listens on (default all interfaces)")
    sv.add_argument("--port", type=int, default=9092, help="the one port silos connect to (default 9092)")
    sv.set_defaults(func=_serve)
    he = sub.add_parser("health", help="exit 0 if `coordinator serve` and its SuperLink answer, else 1 with why")
    he.add_argument("--state-dir", required=True)
    he.set_defaults(func=_health)
    audit = sub.add_parser("audit", help="export or verify tamper-evident audit logs")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    e = audit_sub.add_parser("export", help="export audit bundles (JSONL, CSV, Parquet, manifest, zip)")
    e.add_argument("--state-dir", default=".fedcohort")
    e.add_argument("--out", help="directory for the bundles (default STATE/exports)")
    e.add_argument("--user", default="coordinator-cli", help="who exports (recorded in the log)")
    e.set_defaults(func=_audit_export)
    v = audit_sub.add_parser("verify", help="verify exported bundles; names the first broken entry")
    v.add_argument("bundles", nargs="+", help="bundle zip files or directories")
    v.add_argument("--silo", action="append", default=[], metavar="DIR",
                   help="a silo's export: cross-check its witnessed heads against the coordinator export (repeat per silo)")
    v.set_defaults(func=_audit_verify)
    u = sub.add_parser("ui", help="serve the web UI (Streamlit) over the coordinator's store")
    u.add_argument("--state-dir", default=".fedcohort")
    u.add_argument("--db-url", help="SQLAlchemy URL of a shared store (default: SQLite under the state dir)")
    u.add_argument("--address", default="127.0.0.1")
    u.add_argument("--port", type=int, default=8501)
    u.set_defaults(func=_ui)
    _certs_parser(sub)
    _silo_parser(sub)

    _study_parser(sub)
    register_users_cli(sub)
    return parser


def _certs_parser(sub: argparse._SubParsersAction) -> None:
    certs = sub.add_parser("certs", help="TLS and SuperNode authentication: study CA, silo key registration")
    certs_sub = certs.add_subparsers(dest="certs_command", required=True)
    i = certs_sub.add_parser("init", help="make the study CA and the SuperLink's TLS certificate (once)")
    i.add_argument("--state-dir", required=True)
    i.add_argument("--host", action="append", metavar="NAME",
                   help="DNS name or IP the silos use to reach the SuperLink (repeat; default 127.0.0.1, localhost)")
    i.add_argument("--study-name", default="fedcohort", help="name shown in the CA certificate")
    i.set_defaults(func=_certs_init)
    r = certs_sub.add_parser("register", help="register a silo's SuperNode public key with the SuperLink")
    r.add_argument("public_key", metavar="PUBKEY_FILE", help="the node-auth.pub the silo sent")
    r.add_argument("--state-dir", required=True)
    r.add_argument("--silo", required=True, help="the silo's name in the study")
    r.add_argument("--superlink", required=True, help="HOST:PORT of the running SuperLink (its Control API)")
    r.add_argument("--fingerprint", help="the fingerprint silo IT read out; registration fails if it differs")
    r.add_argument("--yes", action="store_true", help="do not ask to confirm the fingerprint")
    r.add_argument("--db-url", help="SQLAlchemy URL of the store (default: SQLite under the state dir)")
    r.add_argument("--user", default="coordinator-cli", help="who registers (recorded in the audit log)")
    r.set_defaults(func=_certs_register)


def _exit_on_sigterm(*_: object) -> None:
    raise SystemExit(143)  # unwinds like Ctrl-C: every process the command started is stopped


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("demo", "start", "study"):
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        return args.func(args)
    except PolicyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
