"""Decision rule (temperature, OOD, confidence) and the differential with intervals."""

from __future__ import annotations

import numpy as np
import pytest

from leukoflow.core.stats import clopper_pearson_interval, wilson_interval
from leukoflow.core.vocabulary import DECISIONS
from leukoflow.inference.decision import DecisionRule
from leukoflow.inference.differential import Differential


class FixedScores:
    def __init__(self, scores):
        self.scores = np.asarray(scores, float)

    def score(self, logits, features):
        return self.scores


def test_decision_order_ood_then_uncertain_then_counted():
    logits = np.array([[5.0, 0, 0, 0], [5.0, 0, 0, 0], [0.1, 0, 0, 0], [0, 0, 6.0, 0],
                       [0, 6.0, 0, 0]])
    feats = np.zeros((5, 3))
    rule = DecisionRule(temperature=1.0, confidence_threshold=0.5,
                        detector=FixedScores([0.0, 2.0, 0.0, 1.0, np.nan]), ood_threshold=1.0)
    d = rule(logits, feats)
    # cell 1: confident but OOD; cell 2: uncertain; cell 3: score == threshold -> not OOD;
    # cell 4: NaN score -> OOD (a cell that cannot be scored is never counted)
    assert d.names() == ["counted", "ood", "uncertain", "counted", "ood"]
    assert d.pred.tolist() == [0, 0, 0, 2, 1]
    assert d.conf[0] == pytest.approx(np.e**5 / (np.e**5 + 3), rel=1e-6)
    # temperature changes confidence, hence the uncertain decision
    hot = DecisionRule(temperature=10.0, confidence_threshold=0.5)(logits, feats)
    assert hot.names()[0] == "uncertain"
    assert np.isnan(hot.ood_score).all()  # no detector: no OOD test
    with pytest.raises(ValueError):
        DecisionRule(1.0, 0.5, FixedScores([1.0]), 0.0)(logits, feats)


def test_differential_counts_intervals_and_probabilistic_count():
    d = Differential(("a", "b"))
    pred = np.array([0, 0, 1, 1, 0, 1])
    dec = np.array([0, 0, 0, 1, 2, 0])  # counted: cells 0,1,2,5
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.45, 0.55], [0.6, 0.4],
                      [0.1, 0.9]])
    d.add(pred, dec, probs)
    d.add([0], ["counted"], np.array([[1.0, 0.0]]))
    d.reject("non_finite", 2)
    d.drop("gap", 3)
    s = d.snapshot()
    assert s["decisions"] == {"counted": 5, "uncertain": 1, "ood": 1}
    assert s["classes"]["a"]["count"] == 3 and s["classes"]["b"]["count"] == 2
    assert s["classes"]["a"]["fraction"] == pytest.approx(0.6)
    assert (s["classes"]["a"]["lower"], s["classes"]["a"]["upper"]) == pytest.approx(
        wilson_interval(3, 5))
    assert s["classes"]["a"]["probabilistic_count"] == pytest.approx(0.9 + 0.8 + 0.3 + 0.1 + 1)
    assert s["classes"]["b"]["probabilistic_count_in_distribution"] == pytest.approx(
        0.1 + 0.2 + 0.7 + 0.55 + 0.9 + 0.0)
    assert s["rejected"] == {"non_finite": 2} and s["dropped"] == {"gap": 3}
    assert s["total"] == 7 + 2 + 3
    assert s["interval"]["method"] == "wilson"
    other = Differential(("a", "b"), method="clopper-pearson")
    other.add([1], ["counted"])
    d.merge(other)
    assert d.counted == 6
    cp = other.snapshot()["classes"]["b"]
    assert (cp["lower"], cp["upper"]) == pytest.approx(clopper_pearson_interval(1, 1))
    empty = Differential().snapshot()
    assert all(c["fraction"] is None for c in empty["classes"].values())
    with pytest.raises(ValueError):
        d.add([5], [0])
    with pytest.raises(ValueError):
        d.add([0], ["maybe"])
    with pytest.raises(ValueError):
        Differential(method="wald")
    assert DECISIONS == ("counted", "uncertain", "ood")


def test_differential_add_results_from_wire_header():
    d = Differential()
    d.add_results({"pred": [0, 3, 3], "decision": ["counted", "counted", "ood"]},
                  np.eye(4, dtype=np.float32)[[0, 3, 3]])
    s = d.snapshot()
    assert s["classes"]["lymphocyte"]["count"] == 1 and s["decisions"]["ood"] == 1


def test_precomputed_scores_replace_host_scoring():
    logits = np.array([[5.0, 0, 0, 0], [5.0, 0, 0, 0]])
    rule = DecisionRule(1.0, 0.5, FixedScores([0.0, 0.0]), ood_threshold=1.0)
    assert rule(logits, np.zeros((2, 1))).names() == ["counted", "counted"]
    d = rule(logits, np.zeros((2, 1)), ood_score=np.array([0.5, 3.0]))
    assert d.names() == ["counted", "ood"] and d.ood_score.tolist() == [0.5, 3.0]
