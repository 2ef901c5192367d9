"""Reading the silo's Parquet cohort for training (validation streams; see policies.validation),
and the cohort's fingerprint, fixed when the silo validated and loaded it.

The silo service loads the cohort once, at `silo-node start`, right after validating it.
A file changed on disk after that would mean the rows the silo trains on are no longer
the rows it validated (or, after a restart, not the rows earlier rounds used), so every
round first checks the file against the fingerprint taken at start and refuses if it
differs. The fingerprint is the sha256 of the file's bytes: it says *that* the file
changed, never how, so the refusal carries no value from the cohort.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from policies.errors import PolicyError
from policies.validation import open_parquet

_CHUNK = 1 << 20


def read_cohort(path: str | Path) -> pd.DataFrame:
    return open_parquet(path).read().to_pandas()


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, streamed (a 10-million-row cohort is not read into memory)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                digest.update(chunk)
    except OSError as exc:
        raise PolicyError(f"cohort file cannot be read ({exc.strerror or exc}): round refused") from None
    return digest.hexdigest()


@dataclass(frozen=True)
class CohortFingerprint:
    """The cohort file as validated at start: where it is and the sha256 of its bytes."""

    path: Path
    sha256: str

    @classmethod
    def of(cls, path: str | Path) -> "CohortFingerprint":
        return cls(Path(path).resolve(), file_sha256(path))

    def check(self) -> None:
        """Refuse (PolicyError) if the file is no longer the one validated at start.

        The reason names the short fingerprints only (no path: the coordinator does not
        need the hospital's file layout; no value or count from the file)."""
        now = file_sha256(self.path) if self.path.exists() else None
        if now == self.sha256:
            return
        found = "is missing" if now is None else f"has fingerprint {now[:12]}"
        raise PolicyError(
            f"the cohort file changed since this silo validated it at start (validated {self.sha256[:12]}, "
            f"now {found}): round refused; silo IT: restore the validated file, or re-validate and restart "
            "`silo-node start` with the new one"
        )
