"""Start and stop the Flower deployment runtime on this machine (the demo and tests).

Every process gets its own session so it can be stopped by its own process group,
never by name; every run gets its own FLWR_HOME; telemetry and update checks are off.
With `tls` set, the SuperLink serves TLS with the study CA's certificate and admits only
registered SuperNodes (`--enable-supernode-auth`); without it, everything runs as the
insecure local demo.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from coordinator.certs import SuperLinkTls, register_node_key, write_connection

APP_DIR = Path(__file__).resolve().parent / "flower_app"
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flower_env(flwr_home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "FLWR_HOME": str(flwr_home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        "PYTHONUNBUFFERED": "1",
    })
    env.update(extra or {})
    return env


def _tool(name: str) -> str:
    path = BIN / name
    return str(path) if path.exists() else (shutil.which(name) or name)


@dataclass
class Process:
    name: str
    popen: subprocess.Popen
    log: Path
    grace: float = 5.0  # seconds between SIGTERM and SIGKILL

    def stop(self, grace: float | None = None) -> None:
        """SIGTERM the process group, SIGKILL it if it has not gone after `grace` seconds.

        Whatever of the group outlives its leader is killed too: a ServerApp left behind by
        its SuperLink ignores SIGTERM and would otherwise retry forever.
        """
        grace = self.grace if grace is None else grace
        try:
            if self.popen.poll() is None:
                os.killpg(self.popen.pid, signal.SIGTERM)
                self.popen.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            if self._killpg():
                self.popen.wait(timeout=grace)
        except ProcessLookupError:
            pass
        self._killpg()

    def _killpg(self) -> bool:
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
            return True
        except ProcessLookupError:
            return False

    def alive(self) -> bool:
        return self.popen.poll() is None


def end_serverapp(pid: int, grace: float = 3.0) -> bool:
    """End a ServerApp whose SuperLink is being stopped under it, by its pid.

    Flower starts the ServerApp in its SuperExec's process group, not the SuperLink's, and
    once the SuperLink is gone it ignores SIGTERM and retries forever, holding the study's
    run lock. Only a process whose command line is still Flower's ServerApp is signalled
    (the pid may have been reused). Returns whether one was ended.
    """
    try:
        if b"flwr-serverapp" not in Path(f"/proc/{pid}/cmdline").read_bytes():
            return False
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
            time.sleep(0.1)
        os.kill(pid, signal.SIGKILL)
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return True


@dataclass
class SiloSpec:
    name: str
    cohort: Path
    study: Path
    state_dir: Path


@dataclass
class LocalFederation:
    """A SuperLink and a set of SuperNodes on 127.0.0.1, all started and stopped together."""

    work_dir: Path
    env_extra: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    processes: list[Process] = field(default_factory=list)
    tls: SuperLinkTls | None = None  # None: the insecure local demo

    @property
    def flwr_home(self) -> Path:
        return self.work_dir / "flwr_home"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _spawn(self, name: str, cmd: list[str]) -> Process:
        log_dir = self.work_dir / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        log = log_dir / f"{name}.log"
        with open(log, "ab") as fh:
            popen = subprocess.Popen(
                cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                env=flower_env(self.flwr_home, self.env_extra), cwd=self.work_dir,
            )
        proc = Process(name, popen, log)
        self.processes.append(proc)
        return proc

    def write_connection(self) -> None:
        """The `flwr` CLI's connection to this SuperLink ($FLWR_HOME/config.toml), TLS when provisioned."""
        write_connection(self.flwr_home, self.address, self.tls.ca_cert if self.tls else None)

    def superlink_reachable(self) -> bool:
        """Does anything accept connections on the SuperLink's port (ours or one started earlier)?"""
        with socket.socket() as s:
            s.settimeout(2.0)
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def start_superlink(self) -> Process:
        self.write_connection()
        security = self.tls.superlink_flags() + ["--enable-supernode-auth"] if self.tls else ["--insecure"]
        proc = self._spawn("superlink", [
            _tool("flower-superlink"), *security, "--port", str(self.port),
            "--disable-runtime-dependency-installation",
        ])
        self._wait_port(self.port, proc)
        return proc

    def start_silo(self, silo: SiloSpec, node_poll: float = 0.25, wrapper: Sequence[str] = ()) -> Process:
        """Start a silo exactly as silo IT would: `silo-node start` (service + SuperNode).

        With TLS the silo's state dir must hold its CA and registered node key
        (`silo-node certs trust` / `certs request`, then `register_silo`). `wrapper` runs the
        command under another (fault tests: a shifted clock, a mount namespace with a full disk)."""
        return self._spawn(f"silo-{silo.name}", [*wrapper, _tool("silo-node"), "start", *self._start_args(silo, node_poll)])

    def start_silo_host(self, silos: list[SiloSpec], node_poll: float = 0.25) -> Process:
        """Start co-located silos as one `silo-node host`: torch, tenseal and opacus imported
        once, one forked `silo-node start` per silo (each with its own SuperNode)."""
        lines = self.work_dir / "silos.args"
        lines.parent.mkdir(parents=True, exist_ok=True)
        lines.write_text("".join(shlex.join(self._start_args(s, node_poll)) + "\n" for s in silos))
        proc = self._spawn("silo-host", [_tool("silo-node"), "host", "--silos", str(lines)])
        proc.grace = 30.0  # every child stops its own SuperNode first
        return proc

    def _start_args(self, silo: SiloSpec, node_poll: float) -> list[str]:
        """One silo's `silo-node start` arguments (its state dir is made here)."""
        silo.state_dir.mkdir(parents=True, exist_ok=True)
        return [
            "--study", str(silo.study), "--cohort", str(silo.cohort),
            "--state-dir", str(silo.state_dir), "--superlink", self.address, "--name", silo.name,
            "--node-port", str(free_port()), "--node-poll", str(node_poll),
            *([] if self.tls else ["--insecure-local-demo"]),
        ]

    def register_silo(self, name: str, public_key: Path) -> int:
        """Register a silo's SuperNode public key with the running SuperLink; its node id."""
        return register_node_key(_tool("flwr"), flower_env(self.flwr_home, self.env_extra), public_key, name)

    def submit(self, run_config: dict[str, object]) -> str:
        """`flwr run` the study app; returns the Flower run id (kept as text: it is u64)."""
        cfg = " ".join(f"{k}={json.dumps(v)}" for k, v in run_config.items())
        out = subprocess.run(
            [_tool("flwr"), "run", str(APP_DIR), "local", "--run-config", cfg, "--format", "json"],
            env=flower_env(self.flwr_home, self.env_extra), cwd=self.work_dir,
            capture_output=True, text=True, timeout=120,
        )
        if out.returncode != 0:
            raise RuntimeError(f"flwr run failed ({out.returncode}): {out.stderr.strip() or out.stdout.strip()}")
        return _run_id(out.stdout)

    def run_status(self, run_id: str) -> str:
        """Flower's status of the run, or "unknown" (also when `flwr ls` is too slow to answer:
        on a loaded machine it can take a minute, and a status check must not end the study)."""
        try:
            out = subprocess.run(
                [_tool("flwr"), "ls", "local", "--run-id", run_id, "--format", "json"],
                env=flower_env(self.flwr_home, self.env_extra), cwd=self.work_dir,
                capture_output=True, text=True, timeout=60,
            )
        except subprocess.TimeoutExpired:
            return "unknown"
        try:
            runs = json.loads(out.stdout).get("runs", [])
            return str(runs[0].get("status", "unknown")) if runs else "unknown"
        except (json.JSONDecodeError, AttributeError):
            return "unknown"

    def stop(self) -> None:
        for proc in reversed(self.processes):
            proc.stop()
        self.processes.clear()

    @staticmethod
    def _wait_port(port: int, proc: Process, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited early; see {proc.log}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"{proc.name} did not open port {port} within {timeout:.0f} s; see {proc.log}")


def _run_id(stdout: str) -> str:
    try:
        return str(json.loads(stdout)["run-id"])
    except (json.JSONDecodeError, KeyError):
        for token in stdout.replace(",", " ").split():
            if token.isdigit() and len(token) > 6:
                return token
        raise RuntimeError(f"could not read the run id from flwr run output: {stdout.strip()[:200]}") from None


@contextmanager
def local_federation(work_dir: Path, env_extra: dict[str, str] | None = None,
                     tls: SuperLinkTls | None = None) -> Iterator[LocalFederation]:
    fed = LocalFederation(work_dir=work_dir, env_extra=env_extra or {}, tls=tls)
    try:
        yield fed
    finally:
        fed.stop()
