"""Start Flower's SuperNode with a short idle poll: the one lever below Flower's public API.

Stock flwr 1.41.0 sleeps 3 s whenever its SuperNode finds no message and 0.5 s while it
waits for a reply, so every phase of a round rounds up to those ticks. This launcher
swaps the `time` module seen by `flwr.supernode.start_client_internal` for one whose
idle sleeps are shorter, then runs the stock `flower-supernode` entry point unchanged.
It depends on flwr internals: flwr is pinned exactly, and `check_internals()` (run by
the launcher and by a test) fails loudly if those internals move.
"""

from __future__ import annotations

import inspect
import os
import sys
import time as _time

import flwr
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


def main() -> None:
    idle = float(os.environ.get("FEDCOHORT_NODE_POLL", "0.25"))
    if idle < IDLE_SLEEP:
        patch(idle)
    from flwr.supernode.cli import flower_supernode

    sys.argv[0] = "flower-supernode"
    flower_supernode()


if __name__ == "__main__":
    main()
