"""The silo's durable privacy ledger: what each study has spent here, never forgotten.

One JSON file per study, `state_dir/ledger/<study_id>.json`, holding the study's budget,
the RDP accountant history (as Opacus keeps it: [noise_multiplier, sample_rate, steps])
and one charge per released update. The file's state is plain data, like Opacus'
accountants, so the spend is recomputed by a fresh RDPAccountant from the history.

Why each rule:
  - A charge is on disk (temp file, fsync, rename, fsync of the directory) before the
    update may leave the silo: a crash can lose an update, never the record of its cost.
  - Nothing ever resets the spend: a missing file is a fresh ledger only for a study that
    has never charged here (ledger/index.json remembers those that have); an unreadable
    or inconsistent file is refused, not replaced.
  - Charges form a sha256 hash chain whose genesis covers the study id and its budget, so
    a hand edit shows up as corruption, and a coordinator that witnessed (seq, head) can
    tell when a silo was rolled back to an older backup (check_witness). The chain is
    tamper-evident, not tamper-proof: the witness is what catches a consistent rewrite.
  - Charging the same (round, nonce, release) twice is free: a resent cached update
    releases nothing new. Any other release, including a retrain of a round already
    charged, costs again.
  - The statistics round (round 0) is a release too: its charge (kind "stats") is in the
    same history, and it keeps the release's noised row count, which the silo then uses
    as its aggregation weight for the whole study (post-processing, no further cost).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from policies.errors import PolicyError
from policies.privacy import BudgetDecision, PrivacyPolicy
from policies.study import canonical_json
from silo_node.dp import add_to_history, epsilon_of

LEDGER_DIR = "ledger"
INDEX_FILE = "index.json"
SILO_CEILING_FILE = "silo_ceiling.json"
LOCK_FILE = ".lock"
STATS_ROUND = 0  # the statistics round's number in requests and in the ledger
LATE_JOIN_NONCE = "late-join"  # a late joiner's statistics charge: its count weighs its updates, never sent
TOLERANCE = 1e-9  # epsilon compared with the budget: float noise must not refuse the planned last round
FORMAT = 1
SUPPORT = "the silo's IT / data-protection officer"


class _Plain(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Charge(_Plain):
    """One released update's cost; `hash` covers every other field, `prev` included."""

    seq: int = Field(ge=1)
    round: int
    nonce: str
    kind: Literal["release", "retrain", "stats"]
    noise_multiplier: float
    sample_rate: float
    steps: int = Field(ge=1)
    epsilon_after: float
    release_digest: str | None = None
    released_count: float | None = None  # stats charges: the noised row count that was released
    ts: str
    prev: str
    hash: str


class LedgerState(_Plain):
    """The whole ledger file; `head` is the last charge's hash (the genesis hash if none)."""

    format: Literal[1] = FORMAT
    study_id: str
    policy_hash: str
    epsilon: float = Field(gt=0)
    delta: float = Field(gt=0, lt=1)
    ceiling: float | None = Field(None, gt=0)
    history: list[tuple[float, float, int]] = []
    charges: list[Charge] = []
    head: str
    seq: int = Field(0, ge=0)


# ---- durable files ----------------------------------------------------------------------------


def _ledger_dir(state_dir: str | Path) -> Path:
    return Path(state_dir) / LEDGER_DIR


def write_durably(path: Path, data: Any) -> None:
    """Replace `path` with JSON `data` so that a crash leaves the old or the new file, whole.

    Temp file in the same directory (rename is atomic only within a file system), fsync it,
    rename over the old one, then fsync the directory so the rename itself survives.
    Raises OSError with the old file untouched.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(data, indent=1, sort_keys=True))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _locked(state_dir: str | Path) -> Iterator[None]:
    """One writer at a time across processes (service, CLI), for ledgers and the index."""
    directory = _ledger_dir(state_dir)
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / LOCK_FILE, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise PolicyError(f"{what} ({path}) cannot be read: {exc}; {_refusal()}") from None


def _refusal() -> str:
    return f"refusing to train; restore it from backup or contact {SUPPORT} (spend is never reset)"


# ---- the studies that have charged on this silo ---------------------------------------------------


def _index_path(state_dir: str | Path) -> Path:
    return _ledger_dir(state_dir) / INDEX_FILE


def read_index(state_dir: str | Path) -> dict[str, dict[str, Any]]:
    """{study_id: {epsilon, delta, policy_hash, trained}} of every study committed on this silo."""
    path = _index_path(state_dir)
    if not path.exists():
        return {}
    data = _read_json(path, "the privacy ledger index")
    if not isinstance(data, dict) or not isinstance(data.get("studies"), dict):
        raise PolicyError(f"the privacy ledger index ({path}) is corrupted; {_refusal()}")
    return data["studies"]


def _record_in_index(state_dir: str | Path, study_id: str, entry: dict[str, Any]) -> None:
    """Add or update a study's entry; `trained` once set stays set. Caller holds the lock."""
    studies = read_index(state_dir)
    old = studies.get(study_id, {})
    studies[study_id] = {**old, **entry, "trained": bool(old.get("trained")) or bool(entry.get("trained"))}
    if studies[study_id] != old:
        write_durably(_index_path(state_dir), {"format": FORMAT, "studies": studies})


# ---- the hash chain --------------------------------------------------------------------------------


def genesis_hash(study_id: str, epsilon: float, delta: float) -> str:
    """Head of an empty ledger; binds the chain to the study and its budget."""
    header = {"ledger": "fedcohort-privacy", "format": FORMAT, "study_id": study_id, "epsilon": epsilon, "delta": delta}
    return hashlib.sha256(canonical_json(header).encode()).hexdigest()


def _charge_hash(charge: Charge) -> str:
    """sha256 over every field but the hash; an absent released_count is left out, so the
    hashes of ledgers written before that field existed still verify."""
    body = charge.model_dump(mode="json", exclude={"hash"})
    if body.get("released_count") is None:
        body.pop("released_count", None)
    return hashlib.sha256(canonical_json(body).encode()).hexdigest()


def _seal(**fields: Any) -> Charge:
    """A Charge whose hash covers its fields as they will be stored (validated first)."""
    draft = Charge(**fields, hash="")
    return draft.model_copy(update={"hash": _charge_hash(draft)})


def _verify(state: LedgerState, study_id: str) -> None:
    """Raise unless the file is this study's and its chain, head, seq and history agree."""
    problems = []
    if state.study_id != study_id:
        problems.append(f"it belongs to study {state.study_id!r}")
    head, history = genesis_hash(state.study_id, state.epsilon, state.delta), []
    for i, c in enumerate(state.charges, start=1):
        if c.seq != i or c.prev != head or _charge_hash(c) != c.hash:
            problems.append(f"charge {i} breaks the hash chain")
            break
        head, history = c.hash, add_to_history(history, c.noise_multiplier, c.sample_rate, c.steps)
    if not problems and (state.head != head or state.seq != len(state.charges)):
        problems.append("its head or seq does not match its charges")
    if not problems and [tuple(h) for h in state.history] != history:
        problems.append("its accountant history does not match its charges")
    if problems:
        raise PolicyError(f"privacy ledger for study {study_id} is corrupted ({'; '.join(problems)}); {_refusal()}")


# ---- the ledger -------------------------------------------------------------------------------------


class PrivacyLedger:
    """One study's spend at this silo. Decide before training, charge before sending."""

    def __init__(self, state_dir: str | Path, state: LedgerState) -> None:
        self.state_dir = Path(state_dir)
        self.state = state

    # -- opening --
    @staticmethod
    def path_for(state_dir: str | Path, study_id: str) -> Path:
        return _ledger_dir(state_dir) / f"{study_id}.json"

    @classmethod
    def load(
        cls, state_dir: str | Path, study_id: str, *, policy_hash: str | None = None,
        privacy: PrivacyPolicy | None = None,
    ) -> "PrivacyLedger":
        """The study's ledger; fresh (from `privacy`) only if this silo never charged the study.

        A corrupted file, a deleted ledger of a study that has charged, or a policy that
        would change the budget of a study that has a ledger raises PolicyError.
        """
        state = _read_state(state_dir, study_id)
        if state is None:
            if privacy is None or policy_hash is None:
                raise PolicyError(f"study {study_id} has no privacy ledger on this silo yet; open it with its policy")
            state = LedgerState(study_id=study_id, policy_hash=policy_hash, epsilon=privacy.epsilon,
                                delta=privacy.delta, head=genesis_hash(study_id, privacy.epsilon, privacy.delta))
        elif privacy is not None and (privacy.epsilon, privacy.delta) != (state.epsilon, state.delta):
            raise PolicyError(
                f"study {study_id}'s privacy budget was fixed at epsilon {state.epsilon:g}, delta {state.delta:g} "
                f"when this silo first opened its ledger; this policy says epsilon {privacy.epsilon:g}, delta "
                f"{privacy.delta:g}. A study's budget cannot change once set: give the changed study a new id"
            )
        return cls(state_dir, state)

    # -- reading --
    @property
    def study_id(self) -> str:
        return self.state.study_id

    @property
    def seq(self) -> int:
        return self.state.seq

    @property
    def head(self) -> str:
        return self.state.head

    def budget(self) -> float:
        """min(study epsilon, silo ceiling): what this silo lets the study spend."""
        return _budget_of(self.state)

    def spent(self) -> float:
        return epsilon_of(self.state.history, self.state.delta)

    def released_count(self) -> float | None:
        """The noised row count of this silo's first statistics release (None before it)."""
        return next((c.released_count for c in self.state.charges if c.kind == "stats"), None)

    def head_at(self, seq: int) -> str:
        """The chain head after `seq` charges (the genesis hash for 0)."""
        if seq == 0:
            return genesis_hash(self.state.study_id, self.state.epsilon, self.state.delta)
        return self.state.charges[seq - 1].hash

    # -- deciding --
    def decide(self, noise_multiplier: float, sample_rate: float, steps: int, *, round: int | None = None) -> BudgetDecision:
        """Would one more release of this size stay within the budget? Says why either way."""
        return _decide(self.state, self.budget(), noise_multiplier, sample_rate, steps, round)

    def rounds_left_at_rate(self, noise_multiplier: float, sample_rate: float, steps: int) -> int:
        """How many more rounds of this size fit the budget (bisection on a merged history)."""
        def fits(k: int) -> bool:
            history = add_to_history(self.state.history, noise_multiplier, sample_rate, k * steps)
            return epsilon_of(history, self.state.delta) <= self.budget() + TOLERANCE

        low, high = 0, 1
        while fits(high):
            low, high = high, high * 2
            if high > 1_000_000:
                return low
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (mid, high) if fits(mid) else (low, mid)
        return low

    # -- writing --
    def charge(
        self, round: int, nonce: str, noise_multiplier: float, sample_rate: float, steps: int,
        *, release_digest: str | None = None, released_count: float | None = None,
    ) -> Charge:
        """Record a release durably, or return the charge already recorded for this release.

        The same (round, nonce) is free unless `release_digest` (sha256 of the update's
        bytes) shows a different update: then, like a new nonce, it is a new release
        ("retrain" if the round was charged before). Refuses (PolicyError) a charge that
        would exceed the budget, and any charge it cannot make durable: in both cases the
        update must not be sent. Round 0 is the statistics release (kind "stats"), which
        records the noised count it released in `released_count`.
        """
        with _locked(self.state_dir):
            state = self._current_on_disk()
            existing = _same_release(state, round, nonce, release_digest)
            if existing is not None:
                self.state = state
                return existing
            decision = _decide(state, _budget_of(state), noise_multiplier, sample_rate, steps, round)
            if not decision.allowed:
                raise PolicyError(decision.reason)
            charge = _seal(
                seq=state.seq + 1, round=round, nonce=nonce, noise_multiplier=noise_multiplier,
                sample_rate=sample_rate, steps=steps, epsilon_after=decision.would_spend,
                kind=_kind(state, round), release_digest=release_digest, released_count=released_count,
                ts=_now(), prev=state.head,
            )
            new = state.model_copy(update={
                "history": add_to_history(state.history, noise_multiplier, sample_rate, steps),
                "charges": [*state.charges, charge], "head": charge.hash, "seq": charge.seq,
            })
            self._persist(new, "could not record the privacy charge durably: {}; nothing was sent")
            return charge

    def set_ceiling(self, epsilon: float | None) -> None:
        """The silo's own cap on this study (None: the study's epsilon). Spend is unaffected."""
        if epsilon is not None and not epsilon > 0:
            raise PolicyError(f"a privacy ceiling must be a positive epsilon, not {epsilon}")
        with _locked(self.state_dir):
            new = self._current_on_disk().model_copy(update={"ceiling": epsilon})
            self._persist(new, "could not record the privacy ceiling durably: {}")

    def check_witness(self, witnessed_seq: int, witnessed_head: str) -> None:
        """Refuse if the coordinator saw this ledger further along, or with another history."""
        if witnessed_seq < 0:
            raise PolicyError(f"the coordinator's witness for study {self.study_id} is invalid (seq {witnessed_seq})")
        if witnessed_seq > self.seq:
            raise PolicyError(
                f"privacy ledger for study {self.study_id} holds {self.seq} charges but the coordinator witnessed "
                f"{witnessed_seq}: it was restored from an older backup or rolled back; {_refusal()}"
            )
        if self.head_at(witnessed_seq) != witnessed_head:
            raise PolicyError(
                f"privacy ledger for study {self.study_id} differs at charge {witnessed_seq} from what the "
                f"coordinator witnessed: it was altered or replaced; {_refusal()}"
            )

    # -- internals --
    def _current_on_disk(self) -> LedgerState:
        """The on-disk state (another process may have charged); refuses a vanished ledger."""
        state = _read_state(self.state_dir, self.study_id)
        if state is None:
            if self.state.seq:
                raise PolicyError(f"privacy ledger for study {self.study_id} has disappeared from disk; {_refusal()}")
            return self.state
        if (state.epsilon, state.delta) != (self.state.epsilon, self.state.delta):
            raise PolicyError(f"privacy ledger for study {self.study_id} changed budget on disk; {_refusal()}")
        return state

    def _persist(self, new: LedgerState, failure: str) -> None:
        """Ledger file first, then the index: a crash between them is repaired on next charge."""
        try:
            write_durably(self.path_for(self.state_dir, self.study_id), new.model_dump(mode="json"))
            if new.charges:
                _record_in_index(self.state_dir, self.study_id, _index_entry(new))
        except OSError as exc:
            raise PolicyError(failure.format(exc)) from None
        self.state = new


def _read_state(state_dir: str | Path, study_id: str) -> LedgerState | None:
    """The verified ledger, or None for a study never charged here; refuses the rest."""
    path = PrivacyLedger.path_for(state_dir, study_id)
    if not path.exists():
        if read_index(state_dir).get(study_id, {}).get("trained"):
            raise PolicyError(
                f"privacy ledger for study {study_id} is missing ({path}) but this silo has charged that study "
                f"(see {_index_path(state_dir)}); {_refusal()}"
            )
        return None
    try:
        state = LedgerState.model_validate(_read_json(path, f"privacy ledger for study {study_id}"))
    except ValidationError as exc:
        raise PolicyError(
            f"privacy ledger for study {study_id} is corrupted ({exc.error_count()} invalid fields); {_refusal()}"
        ) from None
    _verify(state, study_id)
    return state


def _budget_of(state: LedgerState) -> float:
    return state.epsilon if state.ceiling is None else min(state.epsilon, state.ceiling)


def _decide(state: LedgerState, budget: float, noise_multiplier: float, sample_rate: float, steps: int,
            round_no: int | None) -> BudgetDecision:
    spent = epsilon_of(state.history, state.delta)
    would = epsilon_of(add_to_history(state.history, noise_multiplier, sample_rate, steps), state.delta)
    allowed = would <= budget + TOLERANCE
    what = ("this round" if round_no is None else "the statistics release" if round_no == STATS_ROUND
            else f"round {round_no}")
    whose = "this silo's budget" if state.ceiling is None or state.ceiling >= state.epsilon else "this silo's ceiling"
    w, b, s = _numbers(would, budget, spent)
    relation = "within" if allowed else "above"
    return BudgetDecision(
        allowed=allowed, spent=spent, would_spend=would, budget=budget,
        reason=f"{what} would bring epsilon to {w} {relation} {whose} {b} (spent {s}) for study {state.study_id}",
    )


def _numbers(would: float, budget: float, spent: float) -> tuple[str, str, str]:
    """Two decimals, unless that would print a refusal as '1.00 above 1.00'."""
    digits = 2 if f"{would:.2f}" != f"{budget:.2f}" or would == budget else 6
    return f"{would:.{digits}f}", f"{budget:.{digits}f}", f"{spent:.{digits}f}"


def _kind(state: LedgerState, round_no: int) -> Literal["release", "retrain", "stats"]:
    if round_no == STATS_ROUND:
        return "stats"
    return "retrain" if any(c.round == round_no for c in state.charges) else "release"


def _same_release(state: LedgerState, round_no: int, nonce: str, digest: str | None) -> Charge | None:
    for c in state.charges:
        if c.round == round_no and c.nonce == nonce and (digest is None or c.release_digest in (None, digest)):
            return c
    return None


def _index_entry(state: LedgerState) -> dict[str, Any]:
    return {"epsilon": state.epsilon, "delta": state.delta, "policy_hash": state.policy_hash, "trained": True}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---- the silo-wide ceiling across studies ---------------------------------------------------------


class SiloBudget:
    """The silo's total epsilon over all its studies (basic composition: budgets add up).

    `state_dir/ledger/silo_ceiling.json` = {"total_epsilon": x}, set by the silo's IT;
    without it there is no silo-wide cap. Studies count from approval (`reserve`) or
    first charge, whichever comes first, at their full study epsilon.
    """

    def __init__(self, state_dir: str | Path) -> None:
        self.state_dir = Path(state_dir)

    def total_epsilon(self) -> float | None:
        path = _ledger_dir(self.state_dir) / SILO_CEILING_FILE
        if not path.exists():
            return None
        data = _read_json(path, "the silo-wide privacy ceiling")
        total = data.get("total_epsilon") if isinstance(data, dict) else None
        if not isinstance(total, (int, float)) or isinstance(total, bool) or not total > 0:
            raise PolicyError(f"{path}: total_epsilon must be a positive number; {_refusal()}")
        return float(total)

    def set_total_epsilon(self, total: float) -> None:
        if not total > 0:
            raise PolicyError(f"the silo-wide privacy ceiling must be a positive epsilon, not {total}")
        with _locked(self.state_dir):
            try:
                write_durably(_ledger_dir(self.state_dir) / SILO_CEILING_FILE, {"total_epsilon": float(total)})
            except OSError as exc:
                raise PolicyError(f"could not record the silo-wide privacy ceiling durably: {exc}") from None

    def committed(self) -> dict[str, float]:
        """Epsilon of every study approved or charged on this silo."""
        return {sid: float(e["epsilon"]) for sid, e in read_index(self.state_dir).items()}

    def fits(self, new_study_epsilon: float, study_id: str | None = None) -> BudgetDecision:
        """Would a study with this budget fit under the silo's total? (`study_id` is not counted twice.)"""
        others = {sid: e for sid, e in self.committed().items() if sid != study_id}
        spent = math.fsum(others.values())
        would = spent + new_study_epsilon
        total = self.total_epsilon()
        budget = math.inf if total is None else total
        allowed = would <= budget + TOLERANCE
        names = ", ".join(sorted(others)) or "none"
        reason = (
            f"a study with epsilon {new_study_epsilon:g} would bring this silo's committed epsilon to {would:g} "
            f"{'within' if allowed else 'above'} its ceiling {budget:g} (committed {spent:g} by: {names})"
        )
        return BudgetDecision(allowed=allowed, spent=spent, would_spend=would, budget=budget, reason=reason)

    def reserve(self, study_id: str, privacy: PrivacyPolicy, policy_hash: str) -> BudgetDecision:
        """Commit a study's budget at approval, if it fits; refuses (PolicyError) otherwise."""
        with _locked(self.state_dir):
            decision = self.fits(privacy.epsilon, study_id)
            if not decision.allowed:
                raise PolicyError(decision.reason)
            entry = {"epsilon": privacy.epsilon, "delta": privacy.delta, "policy_hash": policy_hash}
            try:
                _record_in_index(self.state_dir, study_id, entry)
            except OSError as exc:
                raise PolicyError(f"could not record the study's privacy budget durably: {exc}") from None
        return decision
