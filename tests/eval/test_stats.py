import math

import numpy as np
import pytest

from llava_ft.eval.stats import Estimate, bootstrap, bootstrap_mean

HITS = [1] * 70 + [0] * 30


def test_interval_contains_estimate_and_is_deterministic_per_seed():
    a = bootstrap_mean(HITS, seed=7)
    assert a.value == pytest.approx(0.7) and a.low <= a.value <= a.high and a.n == 100
    assert bootstrap_mean(HITS, seed=7) == a
    assert bootstrap_mean(HITS, seed=8) != a


def test_interval_matches_the_normal_approximation():
    # An independent reference: for a proportion, mean +- 1.96 * sqrt(p (1 - p) / n).
    est = bootstrap_mean(HITS, seed=0, n_resamples=4000)
    half = 1.96 * math.sqrt(0.7 * 0.3 / 100)
    assert est.low == pytest.approx(0.7 - half, abs=0.02)
    assert est.high == pytest.approx(0.7 + half, abs=0.02)


def test_constant_scores_have_a_point_interval_and_empty_input_is_nan():
    assert bootstrap_mean([1.0] * 20).low == 1.0 == bootstrap_mean([1.0] * 20).high
    assert math.isnan(bootstrap_mean([]).value)


def test_generic_statistic_resamples_units():
    # Resampling pairs keeps each unit's values together: the statistic sees whole units.
    pairs = np.array([[1, 1], [0, 0], [1, 1], [1, 1]])
    est = bootstrap(len(pairs), lambda idx: float((pairs[idx, 0] == pairs[idx, 1]).mean()), seed=1)
    assert (est.value, est.low, est.high) == (1.0, 1.0, 1.0)


def test_round_trip_and_format():
    est = bootstrap_mean(HITS, seed=3)
    assert Estimate.from_dict({**est.to_dict(), "metric": "circular"}) == est
    assert est.fmt().startswith("70.00 [")
