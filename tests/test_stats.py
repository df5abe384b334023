"""The benchmark's paired statistics (``leanopt.bench.stats``) on synthetic numbers."""

from __future__ import annotations

import math
import statistics

import pytest

from leanopt.bench import stats
from leanopt.bench.stats import FAILS, HOLDS, INCONCLUSIVE, PairedDiff, better, non_inferior, on_par, paired, t975


def test_t_quantiles():
    assert t975(1) == pytest.approx(12.706) and t975(2) == pytest.approx(4.303) and t975(30) == pytest.approx(2.042)
    assert t975(31) == pytest.approx(2.0395, abs=2e-4) and t975(120) == pytest.approx(1.9799, abs=2e-4)
    assert t975(10**6) == pytest.approx(1.95996, abs=1e-4)
    with pytest.raises(ValueError):
        t975(0)


def test_paired_difference_and_its_interval_by_hand():
    ours, base = {0: 4.1, 1: 4.5, 2: 3.95, 7: 9.0}, {0: 4.0, 1: 4.3, 2: 3.9, 5: 1.0}
    d = paired(ours, base)  # seeds 0, 1, 2 only
    diffs = [0.1, 0.2, 0.05]
    half = 4.303 * statistics.stdev(diffs) / math.sqrt(3)
    assert d.n == 3 and d.mean == pytest.approx(statistics.fmean(diffs))
    assert d.low == pytest.approx(d.mean - half) and d.high == pytest.approx(d.mean + half)
    assert paired({0: 1.0}, {1: 1.0}) is None


def test_one_seed_has_no_interval_and_decides_nothing():
    d = paired({0: 4.2}, {0: 4.0})
    assert d.n == 1 and not d.has_interval and "no CI" in d.text()
    assert on_par(d, 1.0) == non_inferior(d, 1.0) == better(d) == INCONCLUSIVE


def test_a_diverged_run_is_an_infinite_difference():
    d = paired({0: math.nan, 1: 4.0}, {0: 4.0, 1: 4.0})
    assert d.mean == math.inf and on_par(d, 0.1) == INCONCLUSIVE


def ci(low, high):
    return PairedDiff((low + high) / 2, low, high, 3)


@pytest.mark.parametrize("low, high, expected", [
    (-0.01, 0.02, HOLDS),        # inside the margin
    (0.04, 0.06, FAILS),         # wholly above
    (-0.06, -0.04, FAILS),       # wholly below: not "on par" (better, see below)
    (0.00, 0.05, INCONCLUSIVE),  # straddles +margin
])
def test_on_par_is_equivalence_within_the_margin(low, high, expected):
    assert on_par(ci(low, high), 0.03) == expected


@pytest.mark.parametrize("low, high, expected", [
    (-0.06, -0.04, HOLDS), (-0.01, 0.02, HOLDS), (0.04, 0.06, FAILS), (0.00, 0.05, INCONCLUSIVE)])
def test_on_par_or_better_is_non_inferiority(low, high, expected):
    assert non_inferior(ci(low, high), 0.03) == expected


@pytest.mark.parametrize("low, high, expected", [
    (-0.06, -0.01, HOLDS), (0.01, 0.06, FAILS), (-0.01, 0.02, INCONCLUSIVE)])
def test_better_needs_the_whole_interval_below_zero(low, high, expected):
    assert better(ci(low, high)) == expected


def test_the_default_margin_is_one_percent():
    assert stats.MARGIN == 0.01


def test_speed_up_ratios_take_the_geometric_mean_with_a_log_interval():
    r = stats.ratio({0: 2.0, 1: 0.5})  # symmetric around 1 in log space
    assert r.mean == pytest.approx(1.0) and r.n == 2
    logs = [math.log(2.0), math.log(0.5)]
    half = 12.706 * statistics.stdev(logs) / math.sqrt(2)
    assert r.low == pytest.approx(math.exp(-half)) and r.high == pytest.approx(math.exp(half))
    assert stats.ratio({3: 1.7}).has_interval is False and stats.ratio({}) is None
    with pytest.raises(ValueError, match="positive"):
        stats.ratio({0: 0.0, 1: 1.0})


def test_at_least_a_speed_up():
    tight = stats.ratio({0: 2.0, 1: 2.1, 2: 1.95})
    assert stats.at_least(tight, 1.5) == HOLDS
    assert stats.at_least(tight, 2.5) == INCONCLUSIVE  # above 1, below 2.5: neither
    slow = stats.ratio({0: 0.8, 1: 0.85, 2: 0.82})
    assert stats.at_least(slow, 1.5, floor=1.0) == FAILS
    assert stats.at_least(stats.ratio({0: 3.0}), 1.5) == INCONCLUSIVE  # one seed, no interval
