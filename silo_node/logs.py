"""Size-rotated log file for everything a running silo prints, its SuperNode included.

`silo-node start` runs for months. Its own messages, the silo service's tracebacks, the
SuperNode keeper's restarts and the SuperNode's (and its ClientApps') output all go to
file descriptors 1 and 2, which the SuperNode inherits. With `--log-file`, those two
descriptors are pointed at a pipe whose reader writes the lines through the standard
library's `RotatingFileHandler`: at `max_bytes` the file becomes `.1`, `.1` becomes `.2`,
and no more than `keep` old files are kept. No process has to know it is being logged.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from logging.handlers import RotatingFileHandler
from pathlib import Path

from policies.errors import PolicyError

DEFAULT_MAX_BYTES = 10 * 1024 * 1024
DEFAULT_KEEP = 5


class _QuietHandler(RotatingFileHandler):
    def handleError(self, record: logging.LogRecord) -> None:
        """A line that cannot be written (disk full) is dropped: reporting it on stderr would
        feed it back into this same log, forever."""


class RotatedOutput:
    """Fds 1 and 2 of this process (and of children started later) feed a rotating log file."""

    def __init__(self, path: Path, max_bytes: int = DEFAULT_MAX_BYTES, keep: int = DEFAULT_KEEP) -> None:
        if max_bytes < 1024 or keep < 1:
            raise PolicyError(f"log rotation needs --log-max-bytes >= 1024 and --log-keep >= 1 "
                              f"(got {max_bytes} and {keep})")
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.handler = _QuietHandler(path, maxBytes=max_bytes, backupCount=keep, encoding="utf-8")
        except OSError as exc:
            raise PolicyError(f"{path}: cannot open the log file: {exc.strerror or exc}") from None
        self.handler.setFormatter(logging.Formatter("%(message)s"))
        self.path = path
        self._saved: list[int] = []
        self._reader = -1
        self._thread: threading.Thread | None = None

    def start(self) -> "RotatedOutput":
        """Point fds 1 and 2 at the log from now on; returns self."""
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        self._reader, writer = os.pipe()
        self._saved = [os.dup(1), os.dup(2)]
        os.dup2(writer, 1)
        os.dup2(writer, 2)
        os.close(writer)
        for stream in (sys.stdout, sys.stderr):
            stream.reconfigure(line_buffering=True)  # type: ignore[union-attr]
        self._thread = threading.Thread(target=self._pump, name="log-rotation", daemon=True)
        self._thread.start()
        return self

    def _pump(self) -> None:
        pending = b""
        while chunk := os.read(self._reader, 65536):
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                self._emit(line)
        if pending:
            self._emit(pending)
        os.close(self._reader)

    def _emit(self, line: bytes) -> None:
        record = logging.makeLogRecord({"msg": line.decode("utf-8", "replace")})
        self.handler.emit(record)  # rotates first when this line would pass max_bytes

    def stop(self, wait: float = 5.0) -> None:
        """Give fds 1 and 2 back; the log gets whatever was printed up to here (children
        still holding the pipe keep writing to it until they exit)."""
        if self._thread is None:
            return
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os.dup2(self._saved[0], 1)
        os.dup2(self._saved[1], 2)
        for fd in self._saved:
            os.close(fd)
        self._thread.join(wait)
        self._thread = None
        self.handler.close()
