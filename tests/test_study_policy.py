"""Loading study policies: strict keys and values, safe YAML, size cap, and the policy hash."""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

import policies.yamlsafe as yamlsafe
from policies import PROTOCOL_VERSION
from policies.errors import PolicyError
from policies.study import StudySpec, load_study, load_study_text, shipped_study


@pytest.fixture(scope="module")
def heart_text() -> str:
    return shipped_study("heart_disease").read_text(encoding="utf-8")


@pytest.fixture()
def heart_dict(heart_text) -> dict[str, Any]:
    return yaml.safe_load(heart_text)


def load_dict(data: dict[str, Any], source: str = "test-policy.yaml") -> StudySpec:
    return load_study_text(yaml.safe_dump(data, sort_keys=False), source)


def error_of(data: dict[str, Any]) -> str:
    with pytest.raises(PolicyError) as info:
        load_dict(data)
    return str(info.value)


# ---------------------------------------------------------------- the shipped study


def test_shipped_heart_study_loads():
    study = load_study(shipped_study("heart_disease"))
    assert study.id == "heart-disease"
    assert study.protocol_version == PROTOCOL_VERSION
    assert study.cohort.label_column == "num"
    assert re.fullmatch(r"[0-9a-f]{64}", study.policy_hash())


def test_text_and_file_loading_agree(heart_text):
    assert load_study_text(heart_text).policy_hash() == load_study(shipped_study()).policy_hash()


# ---------------------------------------------------------------- strict keys and values


def test_unknown_top_level_key(heart_dict):
    heart_dict["encrypt_everything"] = True
    msg = error_of(heart_dict)
    assert "test-policy.yaml" in msg
    assert "encrypt_everything: unknown key" in msg


def test_unknown_nested_key_names_its_path(heart_dict):
    heart_dict["training"]["roundz"] = 10
    msg = error_of(heart_dict)
    assert "training.roundz: unknown key" in msg


def test_unknown_key_in_a_column_rule(heart_dict):
    heart_dict["cohort"]["columns"]["age"]["maximum"] = 100
    assert "cohort.columns.age.maximum: unknown key" in error_of(heart_dict)


@pytest.mark.parametrize(
    ("path", "value", "named"),
    [
        (("training", "rounds"), -1, "training.rounds"),
        (("training", "strategy"), "sgd-with-vibes", "training.strategy"),
        (("encryption",), "rot13", "encryption"),
        (("privacy",), "maybe", "privacy"),
        (("small_cell_min",), 0, "small_cell_min"),
        (("id",), "Heart Disease!", "id"),
        (("cohort", "columns", "fbs", "max_missing_share"), 1.5, "cohort.columns.fbs.max_missing_share"),
        (("cohort", "columns", "age", "type"), "decimal", "cohort.columns.age.type"),
    ],
)
def test_wrong_value_names_the_key(heart_dict, path, value, named):
    target = heart_dict
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    msg = error_of(heart_dict)
    assert f"  - {named}:" in msg


def test_cross_field_rules(heart_dict):
    heart_dict["cohort"]["columns"]["age"]["range"] = [100, 18]
    assert "lower bound" in error_of(heart_dict)


def test_features_must_refer_to_schema_columns(heart_dict):
    heart_dict["features"]["numeric"].append("bmi")
    assert "'bmi'" in error_of(heart_dict)


def test_top_level_must_be_a_mapping():
    with pytest.raises(PolicyError, match="mapping"):
        load_study_text("- just\n- a list\n", "list.yaml")


def test_protocol_version_mismatch(heart_dict):
    heart_dict["protocol_version"] = PROTOCOL_VERSION + 1
    msg = error_of(heart_dict)
    assert "protocol_version" in msg
    assert "not supported" in msg


# ---------------------------------------------------------------- safe YAML


def test_anchors_and_aliases_are_refused(heart_text):
    text = heart_text.replace("governance:\n", "governance: &gov\n", 1) + "extra: *gov\n"
    with pytest.raises(PolicyError, match="anchors and aliases are not allowed"):
        load_study_text(text, "anchored.yaml")


def test_alias_bomb_is_refused_quickly():
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
        for i in range(8)
    )
    with pytest.raises(PolicyError, match="anchor"):
        load_study_text(bomb, "bomb.yaml")


def test_invalid_yaml_is_a_policy_error():
    with pytest.raises(PolicyError, match="broken.yaml: not valid YAML"):
        load_study_text("id: [unclosed\n", "broken.yaml")


def test_oversized_file_is_refused_before_parsing(tmp_path, monkeypatch):
    path = tmp_path / "huge.yaml"
    path.write_text("[[[ not yaml\n" + "#" * (yamlsafe.MAX_POLICY_BYTES + 10))

    def must_not_parse(*args, **kwargs):
        raise AssertionError("the parser ran on an oversized policy")

    monkeypatch.setattr(yamlsafe.yaml, "load", must_not_parse)
    with pytest.raises(PolicyError) as info:
        load_study(path)
    msg = str(info.value)
    assert str(path) in msg
    assert "refused" in msg and "not valid YAML" not in msg


def test_oversized_text_is_refused(monkeypatch):
    monkeypatch.setattr(yamlsafe.yaml, "load", lambda *a, **k: pytest.fail("parser ran"))
    with pytest.raises(PolicyError, match="larger than"):
        load_study_text("a: 1\n" + "#" * yamlsafe.MAX_POLICY_BYTES, "big.yaml")


def test_missing_file(tmp_path):
    path = tmp_path / "no-such-study.yaml"
    with pytest.raises(PolicyError) as info:
        load_study(path)
    assert str(path) in str(info.value)
    assert "not found" in str(info.value)


def test_non_utf8_file(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(PolicyError, match="not UTF-8"):
        load_study(path)


# ---------------------------------------------------------------- the policy hash


def test_hash_is_stable_across_reloads(heart_text, tmp_path):
    first = load_study(shipped_study()).policy_hash()
    assert load_study(shipped_study()).policy_hash() == first
    copy_path = tmp_path / "copy.yaml"
    copy_path.write_text(heart_text)
    assert load_study(copy_path).policy_hash() == first


def test_hash_ignores_formatting(heart_dict):
    """Comments, key order and flow style are not part of the study; the content is."""
    reordered = dict(reversed(list(heart_dict.items())))
    assert load_dict(reordered).policy_hash() == load_dict(heart_dict).policy_hash()
    flow = yaml.safe_dump(heart_dict, default_flow_style=True)
    assert load_study_text(flow).policy_hash() == load_dict(heart_dict).policy_hash()


def test_defaults_are_part_of_the_hash(heart_dict):
    """Spelling out a default gives the same study, hence the same hash."""
    spelled = copy.deepcopy(heart_dict)
    spelled["privacy"]["max_grad_norm"] = 1.0  # the default, written out
    spelled["privacy"]["accountant"] = "rdp"
    without = copy.deepcopy(heart_dict)
    without["privacy"].pop("max_grad_norm", None)
    assert load_dict(without).policy_hash() == load_dict(spelled).policy_hash()


def _leaves(obj: Any, path: tuple = ()) -> Iterator[tuple]:
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from _leaves(value, (*path, key))
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            yield from _leaves(value, (*path, i))
    else:
        yield path


def _candidates(value: Any) -> list[Any]:
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return [value + 1, value - 1]
    if isinstance(value, float):
        return [value / 2, value + 1, value - 1] if value else [value + 1, 0.5]
    if isinstance(value, str):
        literals = ["warning", "error", "auto", "manual", "none", "ckks", "dp", "fedavg", "uniform", "local",
                    "float", "integer"]
        return [value + "x", *literals, "age", "cp"]  # the last two: columns, for references to columns
    if value is None:
        return ["x", [0, 1]]
    return []


def _set(data: dict, path: tuple, value: Any) -> dict:
    out = copy.deepcopy(data)
    target = out
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return out


def _variant(data: dict, path: tuple, value: Any) -> StudySpec | None:
    for candidate in _candidates(value):
        if candidate == value:
            continue
        try:
            return StudySpec.model_validate(_set(data, path, candidate))
        except ValueError:
            continue
    return None


def test_hash_changes_when_any_field_changes(heart_study):
    """Every field of the full policy (defaults included) is perturbed one at a time."""
    data = heart_study.model_dump(mode="json")
    base = heart_study.policy_hash()
    seen = {base: "original"}
    untested = []
    for path in _leaves(data):
        value = data
        for key in path:
            value = value[key]
        variant = _variant(data, path, value)
        if variant is None:
            untested.append(".".join(map(str, path)))
            continue
        digest = variant.policy_hash()
        where = ".".join(map(str, path))
        assert digest not in seen, f"changing {where} did not change the hash (same as {seen.get(digest)})"
        seen[digest] = where
    assert len(seen) > 100
    # no valid policy can change protocol_version, model.kind or the DP accountant and
    # sampling (one choice each), nor set patient_id_column without also adding a column
    # (nor N alone: the coefficient moduli must change with it)
    assert sorted(untested) == ["ckks.poly_modulus_degree", "cohort.patient_id_column", "model.kind", "privacy.accountant",
                                "privacy.sampling", "protocol_version"]


def test_hash_changes_with_a_new_column(heart_dict):
    heart_dict["cohort"]["columns"]["bmi"] = {"type": "float", "required": False, "max_missing_share": 1.0}
    assert load_dict(heart_dict).policy_hash() != load_study(shipped_study()).policy_hash()
