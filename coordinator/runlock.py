"""One ServerApp per coordinator state directory, enforced with a lock the kernel drops on death.

A study must never be driven by two ServerApps at once (say `coordinator start` while
the first run still lives): both would send rounds and write the same store rows. An
`flock` on a file in the state directory is held for the ServerApp's whole life and
released by the kernel however the process ends, SIGKILL included, so a crashed run
never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_FILE = "serverapp.lock"


def hold_study_lock(coordinator_dir: Path) -> int | None:
    """Take the coordinator's run lock (released when the process dies, even by SIGKILL).

    One ServerApp per state directory: a second run started while the first still lives
    (e.g. `coordinator start` while a study runs) must not drive the same study. Returns
    the lock's file descriptor, or None when another process holds it.
    """
    coordinator_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(coordinator_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd
