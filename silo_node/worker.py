"""What a silo does for each request, free of any transport.

The Flower ClientApp and the in-process benchmark both call these functions, so the
numbers in bench/ come from the same code that runs at a hospital.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from policies.errors import PolicyError
from policies.messages import Reply, Request, check_request
from policies.metrics import silo_report
from policies.study import StudySpec
from policies.update import pack_update, unpack_sum
from silo_node.cohort import CohortFingerprint, read_cohort
from silo_node.dp import STATS_SAMPLE_RATE, STATS_STEPS, DPPlan, dp_local_train, plan_with_stats
from silo_node.codec import CkksCodec, Codec, PlainCodec
from silo_node.features import (
    Design, build_design, clipped_moments, feature_scales, moments, normalise, normaliser_from_moments, stat_bounds,
)
from silo_node.ledger import LATE_JOIN_NONCE, STATS_ROUND, Charge, PrivacyLedger
from silo_node.stats_release import add_gaussian_noise, pooled_normaliser, released_count, weight_rows
from silo_node.server_optimizer import replay
from silo_node.training import derive_seed, evaluate, init_weights, local_train


class TrainResult(NamedTuple):
    update: np.ndarray  # encoded: plaintext float64 or CKKS ciphertext bytes
    counts: np.ndarray  # plaintext evaluation counts, for the silo's own suppressed report
    privacy: dict | None  # ledger head and spend after this round's charge (DP studies)


class StatsResult(NamedTuple):
    moments: np.ndarray  # encoded clipped (and, under DP, noised) moments
    privacy: dict | None  # ledger head and spend after the statistics charge (DP studies)


@dataclass
class Silo:
    name: str
    study: StudySpec
    design: Design
    state_dir: Path | None = None  # ledger and keys live here; required for DP or CKKS studies
    _codec: Codec | None = field(default=None, repr=False)
    audit: Any = field(default=None, repr=False)  # the silo's own AuditLog, set by the service
    validation: dict | None = None  # counts-only validation report, shared with the statistics reply
    cohort: CohortFingerprint | None = None  # the file as validated and loaded; checked before each round

    # key lifecycle: which key epoch to encrypt under now, and which each received sum was made under
    key_epoch: int = 0
    history_epochs: list[int] = field(default_factory=list)  # [stats_sum, agg_1, ...]; empty = all epoch 0
    eval_epoch: int | None = None
    _codecs: dict[int, Codec] = field(default_factory=dict, repr=False)

    @classmethod
    def from_cohort(cls, name: str, study: StudySpec, cohort: str | Path, state_dir: Path | None = None,
                    fingerprint: CohortFingerprint | None = None) -> "Silo":
        """Load the cohort; `fingerprint` is the file as it was validated (taken now if not given).

        The file is checked against it once more after loading, so the rows in memory are
        exactly the validated file's."""
        fingerprint = fingerprint or CohortFingerprint.of(cohort)
        design = build_design(read_cohort(cohort), study)
        fingerprint.check()
        return cls(name=name, study=study, design=design, state_dir=state_dir, cohort=fingerprint)

    def check_cohort(self) -> None:
        """Before a round: refuse if the cohort file is no longer the one validated at start."""
        if self.cohort is not None:
            self.cohort.check()

    def warm_up(self) -> None:
        """Load the heavy libraries once, in the resident service, not per round."""
        import tenseal  # noqa: F401  (CKKS, used for encrypted studies)

        init_weights(self.study, self.design.x.shape[1])
        if self.study.dp is not None:
            self.dp_plan()  # calibrates the noise once (cached) and imports opacus' accountant

    # ---- encoding ----------------------------------------------------------------
    @property
    def codec(self) -> Codec:
        """The codec this silo encrypts under now (the current key epoch)."""
        if self.study.encryption == "none":
            if self._codec is None:
                self._codec = PlainCodec()
            return self._codec
        return self.codec_at(self.key_epoch)

    def codec_at(self, epoch: int) -> Codec:
        """The codec of one key epoch: silos keep every epoch's key until the study's keys are
        destroyed, since the history replayed each round mixes sums made under each."""
        if self.study.encryption == "none":
            return self.codec
        if epoch not in self._codecs:
            from policies.ckks import load_context
            from silo_node.key_lifecycle import refuse_if_destroyed
            from silo_node.keys import load_study_secret

            refuse_if_destroyed(self.state_dir, self.study.id)
            secret = load_study_secret(self._require_state_dir("CKKS"), self.study.id, epoch)
            self._codecs[epoch] = CkksCodec(load_context(secret, self.study.ckks), self.study.ckks)
        return self._codecs[epoch]

    def use_key_epochs(self, arrays: dict[str, np.ndarray]) -> None:
        """Read a request's key epochs: which key to encrypt under, which decrypts each sum it carries."""
        from policies.messages import EVAL_EPOCH, KEY_EPOCH, epoch_list, epoch_of

        self.key_epoch = epoch_of(arrays, KEY_EPOCH)
        self.history_epochs = epoch_list(arrays)
        self.eval_epoch = epoch_of(arrays, EVAL_EPOCH, self.key_epoch)

    def _history_epoch(self, index: int) -> int:
        """Key epoch of the statistics sum (0) or of aggregate `index` (1-based)."""
        return self.history_epochs[index] if index < len(self.history_epochs) else 0

    def _require_state_dir(self, what: str) -> Path:
        if self.state_dir is None:
            raise PolicyError(f"a {what} study needs the silo's state directory")
        return Path(self.state_dir)

    def _stats_scale(self) -> np.ndarray:
        """Moments divided by max_rows and by the schema's feature bounds: every slot <= 1."""
        m, s = float(self.study.cohort.max_rows), feature_scales(self.study)
        return np.concatenate([[1.0 / m], 1.0 / (m * s), 1.0 / (m * s * s)])

    def _eval_scale(self) -> float:
        return 1.0 / float(self.study.cohort.max_rows)

    def encode_eval(self, counts: np.ndarray) -> np.ndarray:
        """Evaluation counts plus a contributor slot, encoded for summing."""
        return self.codec.encode(np.concatenate([counts, [1.0]]), self._eval_scale())

    def reveal(self, eval_sum: np.ndarray) -> np.ndarray:
        """Decrypt a pooled evaluation sum and round it before it leaves (IND-CPA-D)."""
        vec = self.codec_at(self.eval_epoch if self.eval_epoch is not None else self.key_epoch).decode(
            eval_sum, self._eval_scale())
        contributors = int(round(vec[-1]))
        if contributors < self.study.min_silos:
            raise PolicyError(f"pooled evaluation has {contributors} contributors, below the study minimum "
                              f"of {self.study.min_silos}: refused")
        counts = vec[:-1].copy()
        counts[4] = round(counts[4], 6)  # loss sum
        mask = np.ones(len(counts), dtype=bool)
        mask[4] = False
        counts[mask] = np.round(counts[mask])
        return counts

    # ---- key ceremony ---------------------------------------------------------------
    def _context_info(self, epoch: int = 0) -> bytes:
        """What a sealed study key is bound to: the study, its policy, and (after a re-key) the
        key epoch, so an old epoch's sealed key cannot be replayed as a new one."""
        base = f"{self.study.id}:{self.study.policy_hash()}"
        return (base if epoch == 0 else f"{base}:key-epoch-{epoch}").encode()

    def enrolment_public(self) -> bytes:
        from silo_node.keys import EnrolmentKey

        return EnrolmentKey.load_or_create(self._require_state_dir("CKKS")).public_bytes()

    def make_study_key(self, peers: dict[str, bytes], epoch: int = 0) -> tuple[bytes, dict[str, bytes]]:
        """Key ceremony at the key-holding silo: make the CKKS key, keep it, seal it to each peer.

        Returns the keyless aggregator context (all the coordinator may hold) and one
        sealed blob per trusted peer that only that peer's enrolment key opens. A silo the
        policy does not name as key holder refuses: the others would refuse its key anyway.
        """
        from policies.ckks import aggregator_context_bytes, new_secret_context, secret_context_bytes
        from silo_node.keys import store_study_secret

        holder = self.study.ckks.key_holder
        if epoch and epoch in self._known_epochs():
            raise PolicyError(f"this silo already holds the key of key epoch {epoch}; a re-key makes a new epoch")
        if holder is not None and holder != self.name:
            raise PolicyError(f"the policy names '{holder}' as key holder, not this silo ('{self.name}'): "
                              "refusing to make the study key")
        ctx = new_secret_context(self.study.ckks)
        secret = secret_context_bytes(ctx)
        store_study_secret(self._require_state_dir("CKKS"), self.study.id, secret, replace=True, epoch=epoch)
        self._codecs.pop(epoch, None)
        return aggregator_context_bytes(ctx), self._seal_to_trusted(secret, peers, epoch)

    def share_study_key(self, peers: dict[str, bytes]) -> dict[str, bytes]:
        """A silo that joins later gets the same key, sealed the same way."""
        from silo_node.keys import load_study_secret

        return self._seal_to_trusted(load_study_secret(self._require_state_dir("CKKS"), self.study.id), peers)

    def _known_epochs(self) -> set[int]:
        from silo_node.keys import study_secret_files

        files = study_secret_files(self._require_state_dir("CKKS"), self.study.id)
        return {0 if ".e" not in p.name else int(p.name.split(".e")[1].split(".")[0]) for p in files}

    def _seal_to_trusted(self, secret: bytes, peers: dict[str, bytes], epoch: int = 0) -> dict[str, bytes]:
        """Seal to each peer; when silo IT pinned fingerprints, a key not pinned (substituted?) gets nothing."""
        from silo_node.approval import load_approval
        from silo_node.keys import EnrolmentKey, fingerprint_matches

        state_dir = self._require_state_dir("CKKS")
        approval = load_approval(state_dir, self.study)
        pins = approval.pins if approval else ()
        me = EnrolmentKey.load_or_create(state_dir)
        return {peer: me.seal_to(pub, secret, self._context_info(epoch)) for peer, pub in peers.items()
                if not pins or any(fingerprint_matches(pub, pin) for pin in pins)}

    def receive_study_key(self, sealed: bytes, epoch: int = 0) -> tuple[bytes, bool]:
        """Open and keep the study key, only if the pinned key holder sealed it for this study.

        Refused (PolicyError) before anything is stored otherwise. Returns the enrolment
        public key that sealed it and whether it was checked against a pin (False only in
        trust-on-first-use demos), for the silo's audit log.
        """
        from silo_node.approval import key_holder_pins, load_approval
        from silo_node.keys import EnrolmentKey, store_study_secret

        state_dir = self._require_state_dir("CKKS")
        pins = key_holder_pins(load_approval(state_dir, self.study), self.study)
        opened = EnrolmentKey.load_or_create(state_dir).open(sealed, self._context_info(epoch), pins)
        store_study_secret(state_dir, self.study.id, opened.plaintext, replace=True, epoch=epoch)
        self._codecs.pop(epoch, None)
        return opened.sender_public, pins is not None

    # ---- round 0 ---------------------------------------------------------------
    def stats_contribution(self, nonce: str = "") -> np.ndarray:
        """Training-split moments for pooled normalisation (count, sums, sums of squares), encoded."""
        return self.release_stats(nonce).moments

    def release_stats(self, nonce: str = "") -> StatsResult:
        """The statistics round: moments of the rows clipped to the schema, noised and charged under DP.

        Under DP the ledger decides before any noise is drawn, the noise comes from OS
        entropy, and the charge (with the noised count, the silo's aggregation weight from
        now on) is on disk before the encoded moments are returned, i.e. before they leave.
        """
        bounds = stat_bounds(self.study)
        m = clipped_moments(self.design.x_train, bounds)
        if self.study.dp is None:
            return StatsResult(self.codec.encode(m, self._stats_scale()), None)
        ledger, plan = self.ledger(), self.dp_plan()
        sigma = plan.stats_noise_multiplier
        decision = ledger.decide(sigma, STATS_SAMPLE_RATE, STATS_STEPS, round=STATS_ROUND)
        if not decision.allowed:
            raise PolicyError(decision.reason)
        noised = add_gaussian_noise(m, bounds, sigma, np.random.default_rng())  # OS entropy, never the study seed
        encoded = self.codec.encode(noised, self._stats_scale())  # bounds checked before anything is charged
        charge = ledger.charge(STATS_ROUND, nonce, sigma, STATS_SAMPLE_RATE, STATS_STEPS,
                               release_digest=hashlib.sha256(noised.tobytes()).hexdigest(),
                               released_count=released_count(noised))
        return StatsResult(encoded, self._privacy_report(ledger, charge, plan))

    # ---- the global model --------------------------------------------------------
    def _normaliser(self, stats_sum: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        mode = self.study.features.normalisation
        d = self.design.x.shape[1]
        if mode == "none":
            return np.zeros(d), np.ones(d)
        if mode == "local":
            return normaliser_from_moments(moments(self.design.x_train))
        if stats_sum is None:
            raise PolicyError("pooled normalisation needs the statistics round's sum, which is missing")
        pooled = self.codec_at(self._history_epoch(0)).decode(stats_sum, self._stats_scale())
        return pooled_normaliser(pooled, stat_bounds(self.study), noised=self.study.dp is not None)

    def global_weights(self, aggregates: list[np.ndarray]) -> np.ndarray:
        """Rebuild the global model from the policy's init and every round's summed update."""
        means = []
        for r, agg in enumerate(aggregates, start=1):
            summed = unpack_sum(self.codec_at(self._history_epoch(r)).decode(agg))
            if summed.contributors < self.study.min_silos:
                raise PolicyError(
                    f"round {r} aggregate has {summed.contributors} contributors, below the study minimum "
                    f"of {self.study.min_silos}: refused (a single update could be isolated)"
                )
            means.append(summed.mean)
        init = init_weights(self.study, self.design.x.shape[1])
        return replay(self.study.training, init, means)

    def aggregation_weight(self) -> float:
        """a_k / max_rows: 1 (uniform), else the training rows, or under DP the noised count released
        in the statistics round (the exact count would reveal one patient's presence)."""
        if self.study.training.weighting == "uniform":
            return 1.0
        if self.study.dp is None:
            return len(self.design.train_idx) / self.study.cohort.max_rows
        cohort = self.study.cohort
        return weight_rows(self._released_count(), cohort.min_rows, cohort.max_rows) / cohort.max_rows

    def _released_count(self) -> float:
        """The noised count of this silo's statistics release; a silo that joined after the
        statistics round makes (and is charged for) that release now, and sends only the update."""
        count = self.ledger().released_count()
        if count is None:
            self.release_stats(nonce=LATE_JOIN_NONCE)
            count = self.ledger().released_count()
        assert count is not None
        return count

    # ---- requests -----------------------------------------------------------------
    def train(self, round_no: int, stats_sum: np.ndarray | None, aggregates: list[np.ndarray],
              nonce: str = "", witness: tuple[int, str] | None = None) -> TrainResult:
        """Evaluate the current global model, then train from it.

        Under DP the ledger decides before any work, and the charge is on disk before
        this returns, i.e. before the update can leave the silo.
        """
        mean, std = self._normaliser(stats_sum)
        w = self.global_weights(aggregates)
        counts = evaluate(w, normalise(self.design.x_test, mean, std), self.design.y_test)
        x_train = normalise(self.design.x_train, mean, std)
        if self.study.dp is None:
            seed = derive_seed(self.study.seed, round_no, self.name)
            trained = local_train(w, x_train, self.design.y_train, self.study, seed)
            return TrainResult(self.codec.encode(pack_update(trained, self.aggregation_weight())), counts, None)
        return self._dp_train(round_no, nonce, w, x_train, counts, witness)

    def ledger(self) -> PrivacyLedger:
        if self.state_dir is None:
            raise PolicyError("a DP study needs the silo's state directory for its privacy ledger")
        return PrivacyLedger.load(self.state_dir, self.study.id, policy_hash=self.study.policy_hash(), privacy=self.study.dp)

    def dp_plan(self) -> DPPlan:
        """Statistics release plus planned rounds, calibrated together to the study's epsilon."""
        return plan_with_stats(self.study.training, self.study.dp, len(self.design.train_idx))

    def _privacy_report(self, ledger: PrivacyLedger, charge: Charge, plan: DPPlan) -> dict:
        return {
            "ledger_seq": charge.seq, "ledger_head": charge.hash, "epsilon_spent": charge.epsilon_after,
            "epsilon_budget": ledger.budget(),
            "rounds_left": ledger.rounds_left_at_rate(plan.noise_multiplier, plan.sample_rate, plan.steps_per_round),
        }

    def _dp_train(self, round_no: int, nonce: str, w: np.ndarray, x_train: np.ndarray, counts: np.ndarray,
                  witness: tuple[int, str] | None) -> TrainResult:
        ledger, plan = self.ledger(), self.dp_plan()
        if witness and witness[0]:
            ledger.check_witness(*witness)
        weight = self.aggregation_weight()  # a late joiner's statistics charge comes first
        ledger = self.ledger()
        decision = ledger.decide(plan.noise_multiplier, plan.sample_rate, plan.steps_per_round, round=round_no)
        if not decision.allowed:
            raise PolicyError(decision.reason)
        # Noise from OS entropy, never from the study seed: the coordinator knows that seed.
        trained = dp_local_train(w, x_train, self.design.y_train, self.study.training, self.study.dp, plan.noise_multiplier)
        update = pack_update(trained, weight)
        encoded = self.codec.encode(update)  # bounds checked before anything is charged
        charge = ledger.charge(round_no, nonce, plan.noise_multiplier, plan.sample_rate, plan.steps_per_round,
                               release_digest=hashlib.sha256(update.tobytes()).hexdigest())
        return TrainResult(encoded, counts, self._privacy_report(ledger, charge, plan))

    def evaluate(self, stats_sum: np.ndarray | None, aggregates: list[np.ndarray]) -> np.ndarray:
        mean, std = self._normaliser(stats_sum)
        w = self.global_weights(aggregates)
        return evaluate(w, normalise(self.design.x_test, mean, std), self.design.y_test)

    # ---- replies ------------------------------------------------------------------
    def reply(self, req: Request, counts: np.ndarray | None = None, privacy: dict | None = None) -> Reply:
        report = json.dumps(silo_report(counts, self.study.small_cell_min)) if counts is not None else "{}"
        return Reply(
            study_id=req.study_id, policy_hash=req.policy_hash, round=req.round, nonce=req.nonce,
            silo=self.name, status="ok", report=report, **(privacy or {}),
        )

    def check(self, req: Request) -> None:
        """Refuse another study or policy, and every request of a study this silo withdrew from."""
        from silo_node.key_lifecycle import lifecycle_record, refuse_if_withdrawn

        check_request(req, self.study.id, self.study.policy_hash())
        refuse_if_withdrawn(self.state_dir, self.study.id)
        if self.state_dir is not None and lifecycle_record(self.state_dir, self.study.id).get("destroyed"):
            self._codecs.clear()  # destroyed on disk by another process: not used from memory either

