"""Start Flower's SuperNode with a short idle poll: the one lever below Flower's public API.

Stock flwr 1.41.0 sleeps 3 s whenever its SuperNode finds no message and 0.5 s while it
waits for a reply, so every phase of a round rounds up to those ticks. This launcher
swaps the `time` module seen by `flwr.supernode.start_client_internal` for one whose
idle sleeps are shorter, then runs the stock `flower-supernode` entry point unchanged.
It depends on flwr internals: flwr is pinned exactly, and `check_internals()` (run by
the launcher and by a test) fails loudly if those internals move.

Given `--silo-state-dir` and `--silo-name` (what `silo-node start` passes), the SuperNode
runs with `--isolation process`, so it starts no executor of its own, and this launcher
starts the silo's app launcher (app_launcher.py) as its child: the only process that
takes the SuperNode's ClientApp tasks, and one that refuses FABs the silo has not allowed.
"""

from __future__ import annotations

import argparse
import inspect
import os
import socket
import subprocess
import sys
import threading
import time as _time

import flwr
from flwr.supercore.constant import SUPERNODE_UVICORN_DEFAULT_PORT
from flwr.supernode import start_client_internal as _sci

PINNED_FLWR = "1.41.0"
IDLE_SLEEP, REPLY_WAIT_SLEEP = 3, 0.5


class _ShortClock:
    def __init__(self, idle: float):
        self.idle = idle

    def sleep(self, seconds: float) -> None:
        if seconds == IDLE_SLEEP:
            seconds = self.idle
        elif seconds == REPLY_WAIT_SLEEP:
            seconds = min(self.idle, REPLY_WAIT_SLEEP)
        _time.sleep(seconds)

    def __getattr__(self, name: str):
        return getattr(_time, name)


def check_internals() -> None:
    """Raise if the flwr internals this launcher relies on are not the ones it was built for."""
    if flwr.__version__ != PINNED_FLWR:
        raise RuntimeError(f"supernode launcher was built for flwr {PINNED_FLWR}, found {flwr.__version__}")
    src = inspect.getsource(_sci)
    for needle in ("import time\n", f"time.sleep({IDLE_SLEEP})", f"time.sleep({REPLY_WAIT_SLEEP})"):
        if needle not in src:
            raise RuntimeError(f"flwr.supernode.start_client_internal no longer contains {needle.strip()!r}")


def patch(idle: float) -> None:
    check_internals()
    _sci.time = _ShortClock(idle)  # type: ignore[assignment]


def _split_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Our own options (the silo behind the app launcher) apart from flower-supernode's."""
    ours = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    ours.add_argument("--silo-state-dir")
    ours.add_argument("--silo-name")
    return ours.parse_known_args(argv)


def _option(args: list[str], name: str, default: str) -> str:
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return default


def guarded_args(flower_args: list[str]) -> list[str]:
    """flower-supernode's arguments with the ClientApp left to our launcher: `--isolation process`,
    Runtime API on loopback. Refuses arguments that would undo either."""
    if _option(flower_args, "--isolation", "process") != "process":
        raise SystemExit("the silo's app launcher needs `--isolation process`; do not pass another isolation")
    if _option(flower_args, "--host", "127.0.0.1") != "127.0.0.1":
        raise SystemExit("the SuperNode's Runtime API must stay on 127.0.0.1 when the app launcher serves it")
    args = list(flower_args)
    for name, value in (("--isolation", "process"), ("--host", "127.0.0.1")):
        if _option(args, name, "") == "":
            args += [name, value]
    return args


def start_app_launcher(flower_args: list[str], state_dir: str, name: str) -> threading.Thread:
    """The silo's app launcher, a child of this SuperNode process (it exits when we do).

    Started once the SuperNode's Runtime API is up, so on a busy machine its imports do not
    slow down the SuperNode's own start (the keeper tells a broken setup by quick exits).
    The thread stays alive while the launcher runs: Linux ties the launcher's parent-death
    signal to the thread that started it."""
    port = int(_option(flower_args, "--port", str(SUPERNODE_UVICORN_DEFAULT_PORT)))
    cmd = [sys.executable, "-m", "silo_node.app_launcher", "--runtime-api-address", f"127.0.0.1:{port}",
           "--state-dir", state_dir, "--name", name, "--parent-pid", str(os.getpid())]

    def run() -> None:
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            _time.sleep(0.2)
        subprocess.Popen(cmd).wait()

    thread = threading.Thread(target=run, name="app-launcher", daemon=True)
    thread.start()
    return thread


def main() -> None:
    idle = float(os.environ.get("FEDCOHORT_NODE_POLL", "0.25"))
    if idle < IDLE_SLEEP:
        patch(idle)
    from flwr.supernode.cli import flower_supernode

    ours, flower_args = _split_args(sys.argv[1:])
    if ours.silo_state_dir and ours.silo_name:
        flower_args = guarded_args(flower_args)
        start_app_launcher(flower_args, ours.silo_state_dir, ours.silo_name)
    sys.argv = ["flower-supernode", *flower_args]
    flower_supernode()


if __name__ == "__main__":
    main()
