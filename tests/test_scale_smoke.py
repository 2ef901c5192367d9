"""The scale harness (bench/scale.py) cannot rot: shards, the silo host's input, and one
real study with 6 silo services forked from one `silo-node host`."""

from __future__ import annotations

import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from policies.errors import PolicyError
from silo_node.host import read_silo_lines

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import scale  # noqa: E402


def test_shards_are_disjoint_cover_every_row_and_keep_min_rows(tmp_path: Path) -> None:
    cohorts = scale.shard_cohorts(32, tmp_path, "num", 20)
    assert len(cohorts) == 32
    for hospital in scale.HOSPITALS:
        original = pq.read_table(scale.SAMPLE_DATA / f"{hospital}.parquet").to_pandas()
        shards = [pq.read_table(p).to_pandas() for name, p in cohorts.items() if name.startswith(hospital)]
        assert all(len(s) >= 20 for s in shards)
        assert all((s["num"] > 0).any() and (s["num"] == 0).any() for s in shards)  # both classes in every shard
        schema = pq.read_schema(scale.SAMPLE_DATA / f"{hospital}.parquet")
        assert all(pq.read_schema(p) == schema for name, p in cohorts.items() if name.startswith(hospital))
        rows = sorted(repr(tuple(r)) for s in shards for r in s.itertuples(index=False))
        assert rows == sorted(repr(tuple(r)) for r in original.itertuples(index=False))  # no row lost or repeated


def test_too_many_silos_for_the_files_is_refused_with_the_shard_sizes() -> None:
    with pytest.raises(ValueError, match="below the study's min_rows 20"):
        scale.shard_counts(64, {"a": 303, "b": 123}, 20)


def test_silo_host_checks_every_line_before_starting_any(tmp_path: Path) -> None:
    ok = "--study s.yaml --cohort c.parquet --state-dir {d} --superlink 127.0.0.1:1 --name {n}"
    lines = tmp_path / "silos.args"
    lines.write_text("# two silos\n" + ok.format(d=tmp_path / "a", n="a") + "\n\n" + ok.format(d=tmp_path / "b", n="b") + "\n")
    assert [argv[argv.index("--name") + 1] for argv in read_silo_lines(lines)] == ["a", "b"]
    lines.write_text(ok.format(d=tmp_path / "a", n="a") + "\n--study s.yaml --name b\n")
    with pytest.raises(PolicyError, match="line 2: not valid `silo-node start` arguments .*required"):
        read_silo_lines(lines)
    lines.write_text(ok.format(d=tmp_path / "a", n="a") + "\n" + ok.format(d=tmp_path / "b", n="a") + "\n")
    with pytest.raises(PolicyError, match="line 2: name 'a' is already used on line 1"):
        read_silo_lines(lines)


@pytest.mark.slow
def test_six_forked_silos_complete_a_round_all_contributing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in scale.THREAD_VARS:
        monkeypatch.setenv(var, "1")
    row = scale.run_scale(6, 1, tmp_path, layout="host", timeout=1500)
    assert row["contributed_per_round"] == [6] and row["refused_per_round"] == [{}]
    assert row["most_processes_at_once"]["silo-service"] == 6 and row["most_processes_at_once"]["silo-host"] == 1
    assert row["most_processes_at_once"]["supernode"] == 6
    # every silo sent an update and an evaluation ciphertext; every silo got the history
    assert row["bytes_up_per_round"][0] > 6 * 20_000 and row["bytes_down_per_round"][0] > 6 * 20_000
    assert row["silos_peak_pss_mib"] > 0 and row["coordinator_peak_rss_mib"] > 0
    assert row["time_to_first_round_s"] is not None
