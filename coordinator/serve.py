"""`coordinator serve`: the coordinator's long-running process in a deployment (a container).

It runs the Flower SuperLink in the foreground with the study CA's certificate, SuperNode
authentication and a database under the state directory (registered silo keys survive a
restart), on one port that silos reach from outside. Studies are submitted to it with
`coordinator start` on the same machine (127.0.0.1), and silo keys are registered with
`coordinator certs register`. `coordinator health` reads the run file it writes; the
container's HEALTHCHECK runs the same check as `python -m coordinator.serve health
--state-dir DIR`, which skips loading the whole coordinator CLI (seconds and 160 MB on a
busy machine) every 30 s.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from policies.durable import write_atomic
from policies.errors import PolicyError

RUN_FILE = Path("coordinator") / "run" / "superlink.json"
DATABASE = Path("coordinator") / "superlink.db"


def superlink_argv(state_dir: Path, host: str, port: int) -> list[str]:
    """The SuperLink command: TLS to the study CA, only registered SuperNodes, keys kept on disk."""
    from coordinator.certs import load_superlink_tls
    from coordinator.runtime import _tool

    tls = load_superlink_tls(state_dir)  # refuses (naming the file) before anything starts
    return [_tool("flower-superlink"), *tls.superlink_flags(), "--enable-supernode-auth",
            "--database", str(Path(state_dir) / DATABASE), "--host", host, "--port", str(port),
            "--disable-runtime-dependency-installation"]


def serve(state_dir: Path, host: str, port: int) -> int:
    """Run the SuperLink until it exits or this process gets SIGTERM/SIGINT; its exit code."""
    from coordinator.runtime import flower_env

    state_dir = Path(state_dir).resolve()
    argv = superlink_argv(state_dir, host, port)
    flwr_home = state_dir / "coordinator" / "flwr_home"
    flwr_home.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(argv, env=flower_env(flwr_home), start_new_session=True)

    def _forward(signum: int, _frame: object) -> None:
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:
            pass

    signal.signal(signal.SIGTERM, _forward)
    signal.signal(signal.SIGINT, _forward)
    _write_run_file(state_dir, {"pid": os.getpid(), "superlink_pid": proc.pid, "host": host, "port": port})
    print(f"SuperLink serving on {host}:{port} (TLS, SuperNode authentication, database {state_dir / DATABASE}); "
          f"pid {proc.pid}", flush=True)
    try:
        return proc.wait()
    finally:
        _clear_run_file(state_dir)


def _write_run_file(state_dir: Path, record: dict[str, Any]) -> None:
    path = state_dir / RUN_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(record | {"started_at": time.time()}).encode(), replace=True, mode=0o644)


def _clear_run_file(state_dir: Path) -> None:
    (state_dir / RUN_FILE).unlink(missing_ok=True)


def health(state_dir: Path) -> tuple[bool, str]:
    """(healthy, one line why): `coordinator serve` and its SuperLink alive, the port accepting."""
    import socket

    path = Path(state_dir).resolve() / RUN_FILE
    try:
        run = json.loads(path.read_text())
    except FileNotFoundError:
        return False, f"unhealthy: no SuperLink served from this state dir ({path} missing: `coordinator serve` not running)"
    except (OSError, ValueError) as exc:
        raise PolicyError(f"{path}: unreadable ({exc})") from None
    for what in ("pid", "superlink_pid"):
        try:
            os.kill(int(run[what]), 0)
        except ProcessLookupError:
            return False, f"unhealthy: {what.replace('_', ' ')} {run[what]} is not running; the run file is stale"
        except PermissionError:
            pass
    host = "127.0.0.1" if run["host"] in ("0.0.0.0", "::", "") else run["host"]
    try:
        with socket.create_connection((host, int(run["port"])), timeout=2.0):
            pass
    except OSError as exc:
        return False, f"unhealthy: the SuperLink does not accept connections on {host}:{run['port']} ({exc})"
    return True, f"healthy: SuperLink pid {run['superlink_pid']} accepting on {run['host']}:{run['port']}"


def main(argv: list[str] | None = None) -> int:
    """`python -m coordinator.serve health --state-dir DIR`: the cheap HEALTHCHECK entry point."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m coordinator.serve")
    parser.add_argument("command", choices=["health"])
    parser.add_argument("--state-dir", required=True)
    args = parser.parse_args(argv)
    try:
        ok, line = health(Path(args.state_dir))
    except PolicyError as exc:
        ok, line = False, f"unhealthy: {exc}"
    print(line)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
