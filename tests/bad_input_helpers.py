"""Shared by the bad-input tests: a silo state directory with real content, and its snapshot.

"Nothing written" is checked byte for byte: every path under the directory with the
sha256 of each file, before and after the bad input.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from policies.study import shipped_study


def tree(root: Path) -> dict[str, str]:
    """Every path under `root` -> sha256 of its bytes ("dir" for directories, "special" for sockets)."""
    out = {}
    for path in sorted(Path(root).rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_dir():
            out[rel] = "dir"
        elif path.is_file():
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            out[rel] = "special"  # the silo service's socket
    return out


def approved_silo_state(state: Path, name: str = "cleveland") -> Path:
    """A silo state dir as silo IT leaves it: study approved (keys, budget reserved) and an audit log."""
    from policies.audit import open_party_log
    from silo_node.cli import main

    assert main(["approve", "--study", str(shipped_study()), "--state-dir", str(state), "--yes",
                 "--pin", f"{name}=ab12 cd34"]) == 0
    open_party_log(state, name, "silo").append("silo.started", "heart-disease", {"note": "fixture"})
    return state
