"""`audit verify COORDINATOR --silo SILO ...`: witnessed heads compared across real exports.

The logs are real `AuditLog`s with real keys, exchanging heads the way the ServerApp and the
silo service do (the coordinator logs `silo:NAME`'s head from each reply; the silo logs the
coordinator's head from each request), exported with the real exporter. Each tampering below
is one a party could do with its *own* key: its export verifies alone, the cross-check does not.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import pytest

from coordinator.cli import main as coordinator_main
from policies.audit import GENESIS_HASH, AuditLog, PartyKey, entry_hash, export_bundle, verify_bundle, verify_export
from policies.audit_crosscheck import cross_check, verify_bundles
from policies.errors import PolicyError
from silo_node.cli import main as silo_main

SILOS = ("cleveland", "hungary")
ROUNDS = 3


class Federation:
    """A coordinator and two silos after ROUNDS rounds, each with its own log and key."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.exports = 0
        self.coordinator = AuditLog(root / "coordinator" / "audit.jsonl",
                                    PartyKey.load_or_create(root / "coordinator" / "key.pem"),
                                    "coordinator", "coordinator")
        self.silos = {name: AuditLog(root / name / "audit.jsonl", PartyKey.load_or_create(root / name / "key.pem"),
                                     name, "silo") for name in SILOS}
        self.coordinator.append("study.created", "heart", {"version": 1})
        for name, log in self.silos.items():
            log.append("cohort.validated", "heart", {"rows": 303})
            self.coordinator.append("silo.enrolled", name, {"rows": 303})
        for r in range(1, ROUNDS + 1):
            self.coordinator.append("round.started", f"heart/round-{r}", {"round": r})
            for name, log in self.silos.items():
                log.witness("coordinator", *self.coordinator.head())  # the request carried it
                log.append("train.replied", f"heart/round-{r}", {"epsilon_spent": 0.1 * r})
                self.coordinator.witness(f"silo:{name}", *log.head())  # the reply carried it
            self.coordinator.append("round.finished", f"heart/round-{r}", {"replied": len(SILOS)})

    def export(self, party: str, log_path: Path | None = None) -> Path:
        """Export a party's log (or a rewritten copy of it, signed with the same key)."""
        log = self.coordinator if party == "coordinator" else self.silos[party]
        self.exports += 1
        out = self.root / "exports" / f"{party}-{self.exports}"
        export_bundle(log_path or log.path, out, log.key.public_keys(), party=party)
        return out

    def rewritten(self, party: str, keep: int | None = None, edit_seq: int | None = None) -> Path:
        """The party's own log cut to ``keep`` entries and/or with entry ``edit_seq`` changed, the
        chain recomputed and re-signed with the party's own key: it verifies on its own."""
        log = self.coordinator if party == "coordinator" else self.silos[party]
        entries = [e.model_dump() for e in log.entries()][:keep]
        prev, lines = GENESIS_HASH, []
        for entry in entries:
            if entry["seq"] == edit_seq:
                entry["details"] = {**entry["details"], "rewritten": True}
            entry["prev_hash"] = prev
            entry["hash"] = entry_hash(entry)
            entry["signature"] = base64.b64encode(log.key.sign(entry["hash"].encode())).decode()
            lines.append(json.dumps(entry, sort_keys=True, separators=(",", ":")) + "\n")
            prev = entry["hash"]
        path = self.root / f"{party}-rewritten.jsonl"
        path.write_text("".join(lines), encoding="ascii")
        return path


@pytest.fixture()
def fed(tmp_path: Path) -> Federation:
    return Federation(tmp_path)


def test_intact_exports_cross_check(fed: Federation) -> None:
    ok, lines = verify_bundles([fed.export("coordinator")], [fed.export(s) for s in SILOS])
    assert ok, lines
    assert f"coordinator <-> silo:cleveland: OK, {ROUNDS} heads the coordinator witnessed and {ROUNDS} the silo witnessed all match" in lines
    assert sum("BROKEN" in line for line in lines) == 0


def test_silo_rewriting_its_own_log_is_caught(fed: Federation) -> None:
    bundle = fed.export("cleveland", fed.rewritten("cleveland", edit_seq=3))  # round 1's reply
    assert verify_bundle(bundle).ok  # alone, the rewritten log is flawless
    ok, lines = verify_bundles([fed.export("coordinator")], [bundle, fed.export("hungary")])
    assert not ok
    text = "\n".join(lines)
    # each head the coordinator witnessed from seq 3 on differs; the first is named exactly
    first = [e for e in fed.coordinator.entries() if e.details.get("party") == "silo:cleveland"][0]
    assert first.details["seq"] == 3
    assert (f"MISMATCH: coordinator entry {first.seq} witnessed silo:cleveland at seq 3 with hash "
            f"{first.details['head'][:16]}..., but silo:cleveland's entry 3 has hash") in text
    assert text.count("MISMATCH: coordinator entry") == ROUNDS and "(rewritten?)" in text
    assert "coordinator <-> silo:hungary: OK" in text


def test_silo_log_rolled_back_before_a_witnessed_head_is_caught(fed: Federation) -> None:
    # cleveland restored from a backup taken after round 1: seq 1-3 intact, rounds 2 and 3 gone
    bundle = fed.export("cleveland", fed.rewritten("cleveland", keep=3))
    assert verify_bundle(bundle).ok
    ok, lines = verify_bundles([fed.export("coordinator")], [bundle])
    assert not ok
    cut = [line for line in lines if "ends at seq 3" in line]
    assert len(cut) == ROUNDS - 1  # the heads of rounds 2 and 3
    assert all("witnessed silo:cleveland at seq" in line and "(truncated or rolled back?)" in line for line in cut)


def test_coordinator_rewriting_its_own_log_is_caught_by_each_silo(fed: Federation) -> None:
    coord = fed.export("coordinator", fed.rewritten("coordinator", edit_seq=2))  # an enrolment edited
    assert verify_bundle(coord).ok
    ok, lines = verify_bundles([coord], [fed.export(s) for s in SILOS])
    assert not ok
    for silo in SILOS:
        witnessed = [e for e in fed.silos[silo].entries() if e.action == "audit.witnessed"]
        assert any(line.startswith(f"MISMATCH: silo:{silo} entry {witnessed[0].seq} witnessed coordinator at seq "
                                   f"{witnessed[0].details['seq']} with hash") for line in lines), lines


def test_coordinator_log_truncated_is_caught(fed: Federation) -> None:
    coord = fed.export("coordinator", fed.rewritten("coordinator", keep=4))
    ok, lines = verify_bundles([coord], [fed.export("cleveland")])
    assert not ok
    assert any("silo:cleveland entry" in line and "coordinator's log ends at seq 4" in line for line in lines), lines


def test_export_of_an_unknown_silo_is_a_mismatch(fed: Federation, tmp_path: Path) -> None:
    stranger = AuditLog(tmp_path / "va" / "audit.jsonl", PartyKey.generate(), "va", "silo")
    stranger.append("cohort.validated", "heart", {"rows": 200})
    out = tmp_path / "va-export"
    export_bundle(stranger.path, out, stranger.key.public_keys(), party="va")
    ok, lines = cross_check(verify_export(fed.export("coordinator")), [verify_export(out)])
    assert not ok
    assert lines[0].startswith("MISMATCH: coordinator <-> silo:va: neither log witnessed the other")
    assert any(line.startswith("note: silo:cleveland was witnessed by the coordinator but no --silo") for line in lines)


def test_silo_flag_needs_one_coordinator_export_and_distinct_silos(fed: Federation) -> None:
    cleveland = fed.export("cleveland")
    with pytest.raises(PolicyError, match="exactly one coordinator export"):
        verify_bundles([cleveland], [fed.export("hungary")])
    with pytest.raises(PolicyError, match="both exports of silo:cleveland"):
        verify_bundles([fed.export("coordinator")], [cleveland, fed.export("cleveland")])


def test_cli_exit_codes_and_messages(fed: Federation, capsys: pytest.CaptureFixture[str]) -> None:
    coord, hungary = fed.export("coordinator"), fed.export("hungary")
    good = [str(coord), "--silo", str(fed.export("cleveland")), "--silo", str(hungary)]
    assert coordinator_main(["audit", "verify", *good]) == 0
    assert "coordinator <-> silo:hungary: OK" in capsys.readouterr().out

    rolled_back = fed.export("cleveland", fed.rewritten("cleveland", keep=3))
    bad = [str(coord), "--silo", str(rolled_back), "--silo", str(hungary)]
    assert coordinator_main(["audit", "verify", *bad]) == 1
    assert "silo:cleveland's log ends at seq 3" in capsys.readouterr().out
    assert silo_main(["audit", "verify", *bad]) == 1  # the same code under silo-node
    capsys.readouterr()
    assert coordinator_main(["audit", "verify", str(hungary), "--silo", str(hungary)]) == 2
    assert "exactly one coordinator export" in capsys.readouterr().err


@pytest.mark.slow
def test_console_script_cross_check(fed: Federation) -> None:
    """The installed `coordinator` entry point, as an auditor runs it."""
    script = Path(sys.executable).with_name("coordinator")
    args = [str(fed.export("coordinator")), "--silo", str(fed.export("cleveland", fed.rewritten("cleveland", keep=3)))]
    proc = subprocess.run([str(script), "audit", "verify", *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "MISMATCH: coordinator entry" in proc.stdout and "(truncated or rolled back?)" in proc.stdout
