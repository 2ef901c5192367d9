"""Writing files so that a crash leaves either the old file or the new one, never half.

Keys, audit logs and approvals are written this way at every party; one implementation.
"""

from __future__ import annotations

import errno
import os
import secrets
from pathlib import Path

from policies.errors import PolicyError


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def write_new_file(path: Path, data: bytes, mode: int) -> None:
    """Create `path` (must not exist) with exactly `mode`, whatever the umask, and fsync it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def link_no_clobber(tmp: Path, path: Path) -> None:
    """Publish `tmp` as `path` unless another process created `path` first (it wins)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
            raise
        if not path.exists():  # filesystem without hard links: best effort
            os.rename(tmp, path)


def fsync_dir(directory: Path) -> None:
    """Make a new file's name durable; some filesystems cannot, which is not fatal."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def write_atomic(path: Path, data: bytes, *, replace: bool, mode: int = 0o600) -> None:
    """Temp file + fsync, then rename (replace) or hard link (never clobbers a file another
    process created meanwhile), then fsync the directory. PolicyError on failure."""
    tmp = temp_name(path)
    try:
        write_new_file(tmp, data, mode)
        if replace:
            os.replace(tmp, path)
        else:
            link_no_clobber(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        raise PolicyError(f"{path}: cannot write: {exc.strerror or exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)


def read_private(path: Path, what: str) -> bytes:
    """Read a key file, refusing one others can read (like ssh does)."""
    try:
        mode = os.stat(path).st_mode & 0o777
        data = path.read_bytes()
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read the {what}: {exc.strerror or exc}") from exc
    if mode & 0o077:
        raise PolicyError(f"{path}: the {what} is readable by others (mode {mode:o}); run: chmod 600 {path}")
    return data


def private_dir(path: Path) -> Path:
    """Create (or tighten to) a directory only its owner can enter, for key files."""
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        if path.stat().st_mode & 0o077:
            path.chmod(0o700)  # our own directory: tighten, never loosen
    except OSError as exc:
        raise PolicyError(f"{path}: cannot create the key directory: {exc.strerror or exc}") from exc
    return path
