"""Bad input, part 2: broken study policy files (issue 7, point 5).

Each broken policy goes through the library (`load_study`), `silo-node approve` (silo
IT's path) and the coordinator's paths that create a study: `coordinator start --study`,
`coordinator demo --study` and the store's `create_study` / `new_version` (what the web
UI calls). Each must be refused with an error naming the file and the key or rule, and
write nothing: the silo's keys, approvals, budget and audit log, the coordinator's
store (rows and file bytes) and audit log stay as they were.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from bad_input_helpers import approved_silo_state, tree

import policies.yamlsafe as yamlsafe
from coordinator.cli import main as coordinator_cli
from coordinator.store import open_store
from policies.audit import open_party_log
from policies.errors import PolicyError
from policies.study import load_study, shipped_study
from silo_node.cli import main as silo_cli

HEART = shipped_study().read_text(encoding="utf-8")


def _swap(old: str, new: str) -> Callable[[], bytes]:
    assert old in HEART, old
    return lambda: HEART.replace(old, new, 1).encode()


def _hundred_mb() -> bytes:
    return HEART.encode() + b"#" * (100 * 2**20 - len(HEART))


def _alias_bomb() -> bytes:
    lines = ["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]" for i in range(9)]
    return (HEART + "\n".join(lines) + "\n").encode()


@dataclass(frozen=True)
class Broken:
    make: Callable[[], bytes]
    expect: tuple[str, ...]  # all of these appear in the error


CASES: dict[str, Broken] = {
    "unknown_key": Broken(_swap("seed: 42", "seed: 42\ncolour: blue"), ("colour: unknown key",)),
    "unknown_nested_key": Broken(_swap("  rounds: 15", "  rounds: 15\n  turbo: true"), ("training.turbo: unknown key",)),
    "wrong_type_rounds": Broken(_swap("rounds: 15", "rounds: fifteen"), ("training.rounds", "valid integer")),
    "wrong_type_privacy": Broken(_swap("  epsilon: 1.0", "  epsilon: [1.0]"), ("privacy.epsilon",)),
    "negative_rounds": Broken(_swap("rounds: 15", "rounds: -3"), ("training.rounds", "greater than or equal to 1")),
    "rounds_1e9": Broken(_swap("rounds: 15", "rounds: 1000000000"), ("training.rounds", "less than or equal to 1000")),
    "epsilon_zero": Broken(_swap("  epsilon: 1.0", "  epsilon: 0"), ("privacy.epsilon", "greater than 0")),
    "epsilon_inf": Broken(_swap("  epsilon: 1.0", "  epsilon: .inf"), ("privacy.epsilon", "finite number")),
    "epsilon_nan": Broken(_swap("  epsilon: 1.0", "  epsilon: .nan"), ("privacy.epsilon", "finite number")),
    "delta_one": Broken(_swap("  delta: 1.0e-5", "  delta: 1.0"), ("privacy.delta", "less than 1")),
    "delta_above_one": Broken(_swap("  delta: 1.0e-5", "  delta: 7"), ("privacy.delta", "less than 1")),
    "small_cell_min_zero": Broken(_swap("small_cell_min: 5", "small_cell_min: 0"), ("small_cell_min", "greater than or equal to 1")),
    "huge_batch": Broken(_swap("batch_size: 4", "batch_size: 1000000000000"),
                         ("training.batch_size 1000000000000 is above cohort.max_rows 1000",)),
    "huge_local_steps": Broken(_swap("local_steps: 100", "local_steps: 1000000000"), ("training.local_steps",)),
    "range_inf": Broken(_swap("range: [18, 100]", "range: [18, .inf]"), ("cohort.columns.age.range",)),
    "hundred_mb": Broken(_hundred_mb, ("104857600 bytes, above the 1000000-byte limit", "refused")),
    "alias_bomb": Broken(_alias_bomb, ("anchors and aliases are not allowed",)),
    "not_utf8": Broken(lambda: HEART.replace("Heart", "C\xf4eur", 1).encode("latin-1"), ("not UTF-8",)),
    "empty": Broken(lambda: b"", ("the study policy is empty",)),
    "only_comments": Broken(lambda: b"# nothing here\n", ("the study policy is empty",)),
    "list": Broken(lambda: b"- id: heart-disease\n- rounds: 15\n", ("must be a YAML mapping",)),
    "not_yaml": Broken(lambda: b"id: [unclosed\n", ("not valid YAML",)),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("studies")
    out = {}
    for name, case in CASES.items():
        out[name] = root / f"{name}.yaml"
        out[name].write_bytes(case.make())
    return out


@pytest.fixture(scope="module")
def silo_state(tmp_path_factory) -> Path:
    return approved_silo_state(tmp_path_factory.mktemp("silo") / "state")


@pytest.fixture(scope="module")
def coordinator_state(tmp_path_factory) -> Path:
    """A coordinator that already holds the shipped study (a draft) and an audit log."""
    state = tmp_path_factory.mktemp("coordinator")
    store = open_store(None, state)
    store.create_study(HEART, "lead")
    store.close()
    open_party_log(state / "coordinator", "coordinator", "coordinator").append("study.created", "heart-disease", {})
    return state


def _check(message: str, path: Path, case: Broken) -> None:
    assert str(path) in message, message
    for words in case.expect:
        assert words in message, (words, message)
    assert "Traceback" not in message


@pytest.mark.parametrize("name", sorted(CASES))
def test_library_refuses_with_file_and_key(files, name):
    with pytest.raises(PolicyError) as info:
        load_study(files[name])
    _check(str(info.value), files[name], CASES[name])


def test_hundred_mb_is_refused_by_size_without_reading_it(files, monkeypatch):
    """The size is checked on the file's metadata: the text is never read, let alone parsed."""
    monkeypatch.setattr(Path, "read_text", lambda *a, **k: pytest.fail("the 100 MB policy was read"))
    monkeypatch.setattr(yamlsafe.yaml, "load", lambda *a, **k: pytest.fail("the 100 MB policy was parsed"))
    t0 = time.perf_counter()
    with pytest.raises(PolicyError, match="104857600 bytes, above the 1000000-byte limit"):
        load_study(files["hundred_mb"])
    print(f"100 MB policy refused in {1e3 * (time.perf_counter() - t0):.2f} ms")


@pytest.mark.parametrize("name", sorted(CASES))
def test_silo_node_approve_refuses_and_writes_nothing(files, silo_state, name, capsys):
    before = tree(silo_state)
    code = silo_cli(["approve", "--study", str(files[name]), "--state-dir", str(silo_state), "--yes"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ")
    _check(err, files[name], CASES[name])
    assert tree(silo_state) == before, "a refused policy changed the silo's keys, approvals, budget or audit log"


@pytest.mark.parametrize(("flag", "value"), [("--epsilon-ceiling", "nan"), ("--epsilon-ceiling", "-1"),
                                             ("--epsilon-ceiling", "inf"), ("--silo-total-epsilon", "0"),
                                             ("--silo-total-epsilon", "nan")])
def test_approve_refuses_absurd_budget_flags_before_writing(tmp_path, flag, value, capsys):
    """Checked before the enrolment key is made or the study's budget reserved (not half-approved)."""
    state = tmp_path / "fresh"
    code = silo_cli(["approve", "--study", str(shipped_study()), "--state-dir", str(state), "--yes", flag, value])
    err = capsys.readouterr().err
    assert code == 2
    assert f"{flag} must be a positive, finite epsilon" in err
    assert not state.exists() or tree(state) == {}


@pytest.mark.parametrize("name", sorted(CASES))
def test_coordinator_start_and_demo_refuse_and_write_nothing(files, coordinator_state, name, capsys):
    before = tree(coordinator_state)
    for argv in (["start", "--study", str(files[name]), "--state-dir", str(coordinator_state), "--insecure-local-demo"],
                 ["demo", "--study", str(files[name]), "--state-dir", str(coordinator_state / "demo")]):
        code = coordinator_cli(argv)
        err = capsys.readouterr().err
        assert code == 2, (argv, err)
        _check(err, files[name], CASES[name])
        assert tree(coordinator_state) == before, f"`coordinator {argv[0]}` with a refused policy wrote to the state"


@pytest.mark.parametrize("name", sorted(set(CASES) - {"not_utf8"}))  # the store takes text: decoding is the caller's
def test_store_refuses_new_study_and_new_version(files, coordinator_state, name):
    """The store path (the web UI's): no study row, no version, nothing mirrored."""
    text = files[name].read_text(encoding="utf-8")
    expect = ("1000000-byte limit", "refused") if name == "hundred_mb" else CASES[name].expect
    store = open_store(None, coordinator_state)
    try:
        studies = store.list_studies(all_versions=True)
        mirrored = store.audit_mirror()
        for create in (lambda: store.create_study(text, "lead"), lambda: store.new_version("heart-disease", text, "lead")):
            with pytest.raises(PolicyError) as info:
                create()
            assert all(words in str(info.value) for words in expect), str(info.value)
        assert store.list_studies(all_versions=True) == studies
        assert store.audit_mirror() == mirrored
    finally:
        store.close()


def test_coordinator_console_script_with_a_bomb(files, coordinator_state):
    """The installed command: exit code 2 and one message, under a C locale."""
    exe = Path(sys.executable).parent / "coordinator"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "coordinator.cli"]
    before = tree(coordinator_state)
    proc = subprocess.run([*cmd, "start", "--study", str(files["alias_bomb"]), "--state-dir", str(coordinator_state),
                           "--insecure-local-demo"], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, LC_ALL="C", LANG="C"))
    assert proc.returncode == 2, proc.stderr
    assert "anchors and aliases are not allowed" in proc.stderr and "Traceback" not in proc.stderr
    assert tree(coordinator_state) == before
