"""The silo's own ClientApp launcher: it checks the coordinator's app before anything of it runs.

A stock SuperNode (`--isolation subprocess`) starts Flower's SuperExec, which runs
`flwr-clientapp` per message; that installs the FAB the coordinator sent and imports
whatever its `clientapp` component names, so a malicious coordinator could make every
silo run its code. Flower's own check (`--trusted-entities`) only accepts hub-signed
apps, and a check inside the ClientApp runs too late (the coordinator ships that code).

So `silo-node start` runs the SuperNode with `--isolation process` (it then starts no
executor of its own) and this launcher takes the SuperNode's ClientApp tasks from its
Runtime API on 127.0.0.1, one forked child per task. The child pulls the task's input
(message, context, run and the FAB *bytes*: nothing is unpacked, installed or imported),
hashes the FAB and looks the hash up in the silo's allow-list (app_allowlist.py):

- unknown FAB: the refusal, with the hash, goes to the silo's audit log, the message
  gets an error reply (so the coordinator does not wait for a timeout), nothing else;
- allowed FAB: the *installed* `silo_node.client_app:app` answers the message; code in
  the FAB is never used, whatever its `clientapp` component says.

Forking from a process that imported flwr and the ClientApp once saves each message the
seconds a fresh `flwr-clientapp` spends on imports. It relies on flwr internals (the
Runtime API client and `run_clientapp`'s pull/push helpers): flwr is pinned exactly and
`check_internals()` fails when they move.
"""

from __future__ import annotations

import argparse
import ctypes
import inspect
import os
import signal
import sys
import time
import traceback
from pathlib import Path

import flwr
from flwr.app import Context, Message
from flwr.app.error import Error
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime import run_clientapp as _flwr_clientapp

from policies.errors import PolicyError
from silo_node.app_allowlist import fab_sha256, installed_fab_sha256, is_allowed

PINNED_FLWR = "1.41.0"
REFUSED_ACTION = "app.refused"
_PR_SET_PDEATHSIG = 1


def check_internals() -> None:
    """Raise if the flwr internals this launcher relies on are not the ones it was built for."""
    if flwr.__version__ != PINNED_FLWR:
        raise RuntimeError(f"app launcher was built for flwr {PINNED_FLWR}, found {flwr.__version__}")
    for name in ("pull_task_input", "push_message", "push_task_output"):
        if not callable(getattr(_flwr_clientapp, name, None)):
            raise RuntimeError(f"flwr.supernode.runtime.run_clientapp.{name} is gone")
    expected = {"pull_task_input": ["client"], "push_message": ["client", "message", "context"],
                "push_task_output": ["client", "context", "sub_status", "details"]}
    for name, params in expected.items():
        found = list(inspect.signature(getattr(_flwr_clientapp, name)).parameters)
        if found != params:
            raise RuntimeError(f"flwr run_clientapp.{name} now takes {found}, not {params}")
    # flwr-clientapp installs the FAB between pulling the input and running the app: that step
    # is exactly what this launcher leaves out, so it must still sit after `pull_task_input`.
    src = inspect.getsource(_flwr_clientapp.run_clientapp)
    if src.find("pull_task_input(client)") > src.find("install_from_fab(") or "install_from_fab(" not in src:
        raise RuntimeError("flwr-clientapp no longer pulls the task input before installing the FAB")
    for method in ("AcquireTask", "PullTaskInput", "PushTaskOutput", "SendTaskHeartbeat"):
        if not hasattr(RuntimeHttpClient, method):
            raise RuntimeError(f"flwr RuntimeHttpClient has no {method}")
    if TaskType.CLIENT_APP != "flwr-clientapp":
        raise RuntimeError(f"flwr's ClientApp task type is now {TaskType.CLIENT_APP!r}")
    from flwr.supernode import start_client_internal as sci

    body = inspect.getsource(sci.start_client_internal)
    if 'if isolation == ISOLATION_MODE_SUBPROCESS:\n        runtime_address' not in body:
        raise RuntimeError("flwr SuperNode may now start an executor in `--isolation process` mode too")


def _client(address: str, *interceptors) -> RuntimeHttpClient:
    """A client of the SuperNode's Runtime API on loopback (plain HTTP, as Flower's own SuperExec uses)."""
    return RuntimeHttpClient.from_server_address(
        server_address=address, insecure=True, root_certificates=None,
        interceptors=list(interceptors), retry_invoker=make_simple_http_retry_invoker())


def _record_refusal(state_dir: Path, silo: str, run, fab, digest: str, message: Message, why: str) -> str:
    """Write the refusal to the silo's audit log first; the reason is what the coordinator sees."""
    from policies.audit import open_party_log

    reason = f"silo {silo} refuses app {digest[:12]}: {why}; nothing from it was installed or run"
    try:
        open_party_log(state_dir, silo, "silo").append(REFUSED_ACTION, f"run-{run.run_id}", {
            "fab_sha256": digest, "fab_id": run.fab_id, "fab_version": run.fab_version,
            "fab_hash_claimed": fab.hash_str, "message_type": message.metadata.message_type,
            "fab_bytes": len(fab.content),
        })
    except Exception:  # the refusal stands even when the log cannot be written
        traceback.print_exc()
        reason += " (and the silo could not write its audit log)"
    print(reason, file=sys.stderr, flush=True)
    return reason


def _answer(state_dir: Path, silo: str, message: Message, context: Context, run, fab) -> tuple[Message, str, str]:
    """The reply, the task's final status and its details: refused, answered, or failed."""
    digest = fab_sha256(fab.content)
    try:
        why = "" if is_allowed(state_dir, digest) else \
            f"FAB sha256 {digest} is not on this silo's allow-list (`silo-node apps list`)"
    except PolicyError as exc:  # an unreadable allow-list allows nothing
        why = f"FAB sha256 {digest} cannot be checked: {exc}"
    if why:
        reason = _record_refusal(state_dir, silo, run, fab, digest, message, why)
        return Message(Error(code=ErrorCode.INVALID_FAB, reason=reason), reply_to=message), SubStatus.FAILED, reason
    from silo_node.client_app import app  # the installed one, never the FAB's

    try:
        return app(message=message, context=context), SubStatus.COMPLETED, ""
    except Exception as exc:  # as flwr-clientapp does: the coordinator gets the type, the log the traceback
        traceback.print_exc()
        reason = f"{type(exc).__name__} in the silo's ClientApp"
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message), \
            SubStatus.FAILED, reason


def run_task(address: str, token: str, state_dir: Path, silo: str) -> None:
    """One ClientApp task: pull its input, check the FAB, answer or refuse, report the outcome."""
    client = _client(address, RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                     RuntimeTokenHttpInterceptor(token))
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    context: Context | None = None
    status, details = SubStatus.FAILED, "the silo's launcher failed before answering"
    try:
        message, context, run, fab = _flwr_clientapp.pull_task_input(client)
        reply, status, details = _answer(state_dir, silo, message, context, run, fab)
        _flwr_clientapp.push_message(client, reply, context)
    finally:
        _flwr_clientapp.push_task_output(client=client, context=context, sub_status=status, details=details)
        heartbeat.stop()
        client.close()


def _die_with_parent(parent_pid: int | None) -> None:
    """Linux: SIGTERM this launcher when the SuperNode that started it dies (even by SIGKILL)."""
    if parent_pid is None:
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:  # it died before the prctl took effect
        raise SystemExit(0)


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _fork_task(address: str, token: str, state_dir: Path, silo: str) -> int:
    """Handle the task in a child of this (already warm) process; the parent goes on polling."""
    pid = os.fork()
    if pid:
        return pid
    code = 0
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        run_task(address, token, state_dir, silo)
    except BaseException:  # noqa: BLE001 - the child must never return into the parent's loop
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _warm_up(silo: str) -> None:
    """Hash the installed app and import the ClientApp once; every forked task inherits both."""
    allowed = installed_fab_sha256()
    import policies.audit  # noqa: F401
    import silo_node.client_app  # noqa: F401

    print(f"app launcher for silo {silo}: runs only the installed ClientApp, for FABs on the allow-list "
          f"(installed fedcohort app sha256 {allowed})", flush=True)


def serve(address: str, state_dir: Path, silo: str, poll: float, parent_pid: int | None = None) -> None:
    """Take ClientApp tasks from the SuperNode until it (our parent) goes away."""
    check_internals()
    _die_with_parent(parent_pid)
    client = _client(address, RuntimeVersionHttpInterceptor(component_name="SuperExec"))
    request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
    warm = False
    while parent_pid is None or os.getppid() == parent_pid:
        _reap()
        res = client.AcquireTask(request)
        if res.HasField("task") and res.token:
            if not warm:  # at the first task, not at start: a SuperNode that fails to connect stays cheap
                _warm_up(silo)
                warm = True
            _fork_task(address, res.token, state_dir, silo)
            continue  # there may be more messages waiting
        time.sleep(poll)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m silo_node.app_launcher", description=__doc__.splitlines()[0])
    p.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API, HOST:PORT on loopback")
    p.add_argument("--state-dir", required=True, help="the silo's state directory (allow-list, audit log)")
    p.add_argument("--name", required=True, help="this silo's name (its audit log's party)")
    p.add_argument("--parent-pid", type=int, help="exit when this process (the SuperNode) exits")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    poll = float(os.environ.get("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "1.0"))
    try:
        serve(args.runtime_api_address, Path(args.state_dir).resolve(), args.name, poll, args.parent_pid)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
