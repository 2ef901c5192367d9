"""Keep the silo's SuperNode running for as long as the silo serves a study.

Flower's SuperNode retries while its SuperLink is unreachable, but when the coordinator
brings up a fresh SuperLink (after a crash) the old node id is unknown there: the
SuperNode is refused (401) and exits. The silo service must not go with it: the keeper
starts a new SuperNode, which registers again under a new node id, and the coordinator
recognises the silo by its enrolment key when it resumes the study.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence


QUICK = 60.0  # seconds: a SuperNode that exits sooner than this did not get going (generous: a loaded
#               machine takes tens of seconds to start one, and a working one stays up for hours)
GIVE_UP_AFTER = 5  # quick exits in a row before the silo stops instead of looping


class SuperNodeKeeper:
    """Start a SuperNode process and restart it (after `backoff` seconds) whenever it exits."""

    def __init__(self, cmd: Sequence[str], env: dict[str, str], backoff: float = 2.0,
                 say: Callable[[str], None] = lambda line: print(line, flush=True),
                 on_give_up: Callable[[], None] = lambda: os.kill(os.getpid(), signal.SIGTERM)):
        self.cmd, self.env, self.backoff, self.say, self.on_give_up = list(cmd), env, backoff, say, on_give_up
        self.process: subprocess.Popen | None = None
        self.restarts = 0
        self.gave_up = False  # stopped because the SuperNode kept dying at start, not by request
        self._started_at = 0.0
        self._quick_exits = 0  # consecutive exits within QUICK seconds of starting: a broken setup
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._watcher: threading.Thread | None = None

    def start(self) -> int:
        """Launch the SuperNode and watch it from a daemon thread; returns its pid."""
        self._launch()
        self._watcher = threading.Thread(target=self._watch, name="supernode-keeper", daemon=True)
        self._watcher.start()
        assert self.process is not None
        return self.process.pid

    def _launch(self) -> None:
        with self._lock:
            if not self._stopping.is_set():
                self.process = subprocess.Popen(self.cmd, env=self.env, start_new_session=True)
                self._started_at = time.monotonic()

    def _watch(self) -> None:
        while not self._stopping.wait(0.5):
            proc = self.process
            if proc is None or proc.poll() is None:
                continue
            self._quick_exits = self._quick_exits + 1 if time.monotonic() - self._started_at < QUICK else 0
            if self._quick_exits >= GIVE_UP_AFTER:
                self.say(f"SuperNode exited {GIVE_UP_AFTER} times within {QUICK:g} s of starting "
                         f"(last code {proc.returncode}); giving up: check --superlink and the node's log")
                self.gave_up = True
                self._stopping.set()
                self.on_give_up()
                return
            self.say(f"SuperNode exited with code {proc.returncode} (SuperLink restarted or unreachable? or this "
                     "machine's clock is off: Flower refuses a node more than 5 s ahead of the coordinator's clock "
                     f"or 5 min behind it); starting a new one in {self.backoff:g} s")
            if self._stopping.wait(self.backoff):
                return
            self.restarts += 1
            self._launch()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def stop(self, grace: float = 10.0) -> None:
        """Stop watching and end the SuperNode by its own process group (SIGTERM, then SIGKILL)."""
        with self._lock:
            self._stopping.set()
            proc = self.process
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=grace)
        except ProcessLookupError:
            pass

