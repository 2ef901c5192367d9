"""Which Flower apps (FABs) this silo runs: their sha256, and nothing else decides it.

The coordinator ships a FAB with every run, and a stock SuperNode installs and runs its
code. fedcohort's FAB carries no code: its components point at the installed, pinned
packages. So the one FAB a silo needs is the one *its own* installed fedcohort builds:
`coordinator/flower_app` (package data, found on disk without importing `coordinator`)
bundled in memory by the pinned flwr exactly as `flwr run` bundles it (Flower's build
is deterministic: fixed timestamps, sorted files). Its sha256 is allowed without any
configuration. Silo IT may add other hashes (`silo-node apps allow HASH`) after reviewing
a FAB, e.g. when the coordinator runs a later fedcohort release; each addition and
removal is recorded in the silo's audit log. Anything else is refused (app_launcher.py).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from policies.errors import PolicyError
from silo_node.ledger import write_durably

ALLOWLIST_FILE = Path("apps") / "allowed.json"
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class AllowedApp:
    sha256: str
    source: str  # "installed fedcohort" or who allowed it
    note: str = ""
    at: str = ""


def fab_sha256(fab: bytes) -> str:
    """What the silo compares: the sha256 of the FAB's bytes (Flower names FABs by the same hash)."""
    return hashlib.sha256(fab).hexdigest()


def installed_app_dir() -> Path:
    """`coordinator/flower_app` of the installed fedcohort, located without importing `coordinator`."""
    spec = importlib.util.find_spec("coordinator")
    if spec is None or not spec.submodule_search_locations:
        raise PolicyError("the installed fedcohort has no coordinator package: cannot compute the app it ships")
    app_dir = Path(list(spec.submodule_search_locations)[0]) / "flower_app"
    if not (app_dir / "pyproject.toml").is_file():
        raise PolicyError(f"{app_dir / 'pyproject.toml'}: missing; the installed fedcohort is incomplete")
    return app_dir


def build_fab(app_dir: Path) -> bytes:
    """The FAB `flwr run APP_DIR` would send, built in memory by the pinned flwr."""
    from flwr.cli.build import build_fab_from_disk

    return build_fab_from_disk(Path(app_dir))


@lru_cache(maxsize=1)
def installed_fab_sha256() -> str:
    """sha256 of the FAB this silo's installed fedcohort builds: the app it runs by default."""
    return fab_sha256(build_fab(installed_app_dir()))


def normalise_hash(text: str) -> str:
    """A sha256 as silo IT may paste it (any case, optional `sha256:` prefix); PolicyError otherwise."""
    digest = text.strip().lower().removeprefix("sha256:")
    if not _SHA256.fullmatch(digest):
        raise PolicyError(f"{text!r} is not a sha256 (64 hex digits); see `silo-node apps list`")
    return digest


def _path(state_dir: Path) -> Path:
    return Path(state_dir) / ALLOWLIST_FILE


def _load_added(state_dir: Path) -> dict[str, dict]:
    path = _path(state_dir)
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PolicyError(f"{path}: unreadable allow-list ({exc}); fix or remove it") from exc
    if not isinstance(data, dict) or not all(_SHA256.fullmatch(k) and isinstance(v, dict) for k, v in data.items()):
        raise PolicyError(f"{path}: not a mapping of sha256 -> entry; fix or remove it")
    return data


def allowed_apps(state_dir: Path) -> list[AllowedApp]:
    """The installed app first, then silo IT's additions in the order they were made."""
    added = sorted(_load_added(state_dir).items(), key=lambda kv: kv[1].get("at", ""))
    return [AllowedApp(installed_fab_sha256(), "installed fedcohort")] + [
        AllowedApp(digest, str(e.get("by", "")), str(e.get("note", "")), str(e.get("at", ""))) for digest, e in added]


def is_allowed(state_dir: Path, digest: str) -> bool:
    return digest in {app.sha256 for app in allowed_apps(state_dir)}


def allow(state_dir: Path, digest: str, by: str, note: str = "") -> bool:
    """Add a hash silo IT reviewed; False if it was allowed already (nothing written)."""
    digest = normalise_hash(digest)
    added = _load_added(state_dir)
    if digest in added or digest == installed_fab_sha256():
        return False
    added[digest] = {"by": by, "note": note, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_durably(_path(state_dir), added)
    return True


def revoke(state_dir: Path, digest: str) -> bool:
    """Remove a hash silo IT added; the installed app's hash cannot be removed (it is code already here)."""
    digest = normalise_hash(digest)
    added = _load_added(state_dir)
    if digest not in added:
        if digest == installed_fab_sha256():
            raise PolicyError("that is the app the installed fedcohort builds; it is always allowed")
        return False
    del added[digest]
    write_durably(_path(state_dir), added)
    return True
