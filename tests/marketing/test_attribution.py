"""Attribution models on hand-made path sets whose answers are known."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from towerline.marketing.attribution import (
    attribute,
    build_paths,
    conversion_probability,
    last_touch,
    linear,
    markov,
    position_based,
    position_weights,
    removal_effects,
    transition_matrix,
)


def _paths(rows: list[tuple[tuple[str, ...], bool, float]]) -> pd.DataFrame:
    return pd.DataFrame([(f"u{i}", p, c, v) for i, (p, c, v) in enumerate(rows)],
                        columns=["user_id", "path", "converted", "value"])


def test_single_touch_paths_give_every_model_the_same_answer():
    paths = _paths([(("email",), True, 10.0), (("email",), True, 20.0), (("sms",), True, 5.0),
                    (("email",), False, 0.0), (("sms",), False, 0.0), (("push",), True, 7.0)])
    table = attribute(paths)
    for model in ("linear", "position_based", "markov"):
        np.testing.assert_allclose(table[f"{model}_conversions"], table["last_touch_conversions"], atol=1e-9)
        np.testing.assert_allclose(table[f"{model}_revenue"], table["last_touch_revenue"], atol=1e-9)
    assert table.loc["email", "last_touch_conversions"] == 2 and table.loc["email", "last_touch_revenue"] == 30


def test_markov_removal_effect_matches_the_hand_computation():
    # start->A 2/3, start->B 1/3; A->B 1/2, A->null 1/2; B->conversion 1.
    # P(conv) = 2/3 * 1/2 + 1/3 = 2/3; without A: 1/3 (RE 1/2); without B: 0 (RE 1).
    # Credit of 2 conversions in proportion 1/2 : 1 -> A 2/3, B 4/3.
    paths = _paths([(("A", "B"), True, 30.0), (("A",), False, 0.0), (("B",), True, 60.0)])
    states, P = transition_matrix(paths)
    assert states == ["(start)", "A", "B", "(conversion)", "(null)"]
    assert conversion_probability(P) == pytest.approx(2 / 3)
    effects = removal_effects(paths)
    assert effects["A"] == pytest.approx(0.5) and effects["B"] == pytest.approx(1.0)
    m = markov(paths)
    assert m.loc["A", "conversions"] == pytest.approx(2 / 3) and m.loc["B", "conversions"] == pytest.approx(4 / 3)
    assert m["revenue"].sum() == pytest.approx(90.0)
    assert last_touch(paths)["conversions"].to_dict() == {"A": 0.0, "B": 2.0}
    assert linear(paths).loc["A", "conversions"] == pytest.approx(0.5)


def test_markov_handles_loops_in_paths():
    # A -> A self-loops do not change where A leads: the answer equals the loop-free path set's.
    looped = _paths([(("A", "A", "B"), True, 1.0), (("A",), False, 0.0), (("B",), True, 1.0)])
    plain = _paths([(("A", "B"), True, 1.0), (("A",), False, 0.0), (("B",), True, 1.0)])
    np.testing.assert_allclose(markov(looped)["conversions"], markov(plain)["conversions"], atol=1e-9)


def test_position_based_weights():
    np.testing.assert_allclose(position_weights(1), [1.0])
    np.testing.assert_allclose(position_weights(2), [0.5, 0.5])
    np.testing.assert_allclose(position_weights(3), [0.4, 0.2, 0.4])
    np.testing.assert_allclose(position_weights(4), [0.4, 0.1, 0.1, 0.4])
    paths = _paths([(("a", "b", "c"), True, 100.0)])
    pb = position_based(paths)
    assert pb["conversions"].to_dict() == pytest.approx({"a": 0.4, "b": 0.2, "c": 0.4})
    assert pb.loc["b", "revenue"] == pytest.approx(20.0)


def test_every_model_credits_exactly_the_conversions():
    rng = np.random.default_rng(0)
    rows = [(tuple(rng.choice(["email", "sms", "push"], rng.integers(1, 5))), bool(rng.random() < 0.4),
             float(rng.integers(1, 50))) for _ in range(300)]
    paths = _paths(rows)
    paths.loc[~paths["converted"], "value"] = 0.0
    table = attribute(paths)
    n, revenue = paths["converted"].sum(), paths["value"].sum()
    for model in ("last_touch", "linear", "position_based", "markov"):
        assert table[f"{model}_conversions"].sum() == pytest.approx(n)
        assert table[f"{model}_revenue"].sum() == pytest.approx(revenue)


def test_build_paths_cuts_journeys_at_conversions_and_respects_the_lookback():
    day = 86_400
    touches = pd.DataFrame({
        "user_id": ["u1", "u1", "u1", "u1", "u2", "u3"],
        "channel": ["email", "sms", "push", "email", "sms", "push"],
        "timestamp": [0, day, 2 * day, 10 * day, 0, 0],
    })
    conversions = pd.DataFrame({"user_id": ["u1", "u2", "u4"], "timestamp": [3 * day, 40 * day, day],
                                "value": [12.0, 5.0, 1.0]})
    paths = build_paths(touches, conversions, lookback_s=30 * day).sort_values(["user_id", "converted"])
    got = [(r.user_id, r.path, r.converted, r.value) for r in paths.itertuples()]
    assert got == [
        ("u1", ("email",), False, 0.0),  # the touch after u1's conversion: a null path
        ("u1", ("email", "sms", "push"), True, 12.0),
        ("u2", ("sms",), False, 0.0),  # u2's one touch is 40 days before its conversion: outside the window
        ("u3", ("push",), False, 0.0),
    ]
