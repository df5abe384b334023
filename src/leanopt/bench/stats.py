"""Paired statistics for the benchmark's verdicts: one module, the rules written once.

Every optimizer in a seed shares that seed's initial weights and data order, so the seed
moves all of them together. A comparison "X vs baseline" therefore takes, per seed, the
*paired* difference ``d_s = X_s − baseline_s`` and reports its mean over the ``n`` common
seeds with a 95 % confidence interval, ``mean ± t(0.975, n−1) · sd(d) / sqrt(n)`` (Student
t). The spread of either group across seeds is not the noise of the difference.

Verdicts, for a lower-is-better metric (a loss) and a practical-equivalence ``margin``
(by default 1 % of the baseline's mean):

* **on par** (equivalence): holds when the whole CI lies inside ``[−margin, +margin]``,
  does not hold when it lies wholly outside, else inconclusive;
* **on par or better** (non-inferiority): holds when the CI's upper end is at most
  ``+margin``, does not hold when its lower end is above ``+margin``;
* **better**: holds when the CI's upper end is below 0, does not hold when its lower end
  is above 0 (worse), else inconclusive.

One seed gives no interval: every verdict on it is inconclusive.

Speed-ups (tokens-to-target) are ratios per seed, ``r_s = baseline_s / X_s``; their
summary is the geometric mean with the t interval taken on ``log r_s`` and mapped back
(:func:`ratio`), so that 2x and 0.5x are equally far from 1.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["Estimate", "PairedDiff", "paired", "Ratio", "ratio", "at_least", "by_seed", "t975", "on_par", "non_inferior", "better", "MARGIN",
           "HOLDS", "FAILS", "INCONCLUSIVE"]

HOLDS, FAILS, INCONCLUSIVE = "holds", "does not hold", "inconclusive"
MARGIN = 0.01  # practical equivalence: 1 % of the baseline's value

# two-sided 95 % quantiles of Student's t, t(0.975, df), df = 1..30
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t975(df: int) -> float:
    """``t(0.975, df)``: tabulated to 30 degrees of freedom, then the normal quantile with
    the first two terms of its Cornish-Fisher expansion (error < 1e-4 beyond 30)."""
    if df < 1:
        raise ValueError(f"a t quantile needs df >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


@dataclass(frozen=True)
class Estimate:
    """A value over ``n`` seeds with its 95 % CI (``low``, ``high``; NaN for one seed)."""

    mean: float
    low: float
    high: float
    n: int

    @property
    def has_interval(self) -> bool:
        return self.n >= 2 and math.isfinite(self.low) and math.isfinite(self.high)


class PairedDiff(Estimate):
    """Mean paired difference ``ours − baseline``."""

    def text(self, digits: int = 4, unit: str = "seed") -> str:
        ci = f"95% CI [{self.low:+.{digits}f}, {self.high:+.{digits}f}]" if self.has_interval else f"no CI (1 {unit})"
        return f"Δ {self.mean:+.{digits}f}, {ci}, n={self.n}"


def paired(ours: dict[int, float], baseline: dict[int, float]) -> PairedDiff | None:
    """The paired difference over the seeds both have (``{seed: value}``); None without a
    common seed. Non-finite values (a diverged run) make the difference infinite."""
    seeds = sorted(set(ours) & set(baseline))
    if not seeds:
        return None
    d = [ours[s] - baseline[s] for s in seeds]
    mean = statistics.fmean(d) if all(math.isfinite(x) for x in d) else math.inf
    if len(d) < 2 or not math.isfinite(mean):
        return PairedDiff(mean, math.nan, math.nan, len(d))
    half = t975(len(d) - 1) * statistics.stdev(d) / math.sqrt(len(d))
    return PairedDiff(mean, mean - half, mean + half, len(d))


class Ratio(Estimate):
    """Geometric mean of per-seed ratios."""

    def text(self) -> str:
        ci = f"95% CI [{self.low:.2f}, {self.high:.2f}]" if self.has_interval else "no CI (1 seed)"
        return f"{self.mean:.2f}x, {ci}, n={self.n}"


def ratio(values: dict[int, float]) -> Ratio | None:
    """The geometric mean of positive per-seed ratios ``{seed: r}`` and its CI (a t
    interval on the logarithms); None without a seed."""
    if not values:
        return None
    if any(not (v > 0 and math.isfinite(v)) for v in values.values()):
        raise ValueError(f"ratios must be positive and finite, got {sorted(values.values())}")
    logs = [math.log(v) for v in values.values()]
    mean = statistics.fmean(logs)
    if len(logs) < 2:
        return Ratio(math.exp(mean), math.nan, math.nan, 1)
    half = t975(len(logs) - 1) * statistics.stdev(logs) / math.sqrt(len(logs))
    return Ratio(math.exp(mean), math.exp(mean - half), math.exp(mean + half), len(logs))


def at_least(r: Ratio, target: float, floor: float = 1.0) -> str:
    """A speed-up of at least ``target``: holds when the CI's lower end reaches it, does
    not hold when its upper end stays below ``floor`` (no better than ``floor``)."""
    if not r.has_interval:
        return INCONCLUSIVE
    if r.low >= target:
        return HOLDS
    return FAILS if r.high < floor else INCONCLUSIVE


def on_par(diff: PairedDiff, margin: float) -> str:
    """Equivalence within ``±margin``."""
    if not diff.has_interval:
        return INCONCLUSIVE
    if -margin <= diff.low and diff.high <= margin:
        return HOLDS
    if diff.low > margin or diff.high < -margin:
        return FAILS
    return INCONCLUSIVE


def non_inferior(diff: PairedDiff, margin: float) -> str:
    """On par or better: not worse than ``+margin``."""
    if not diff.has_interval:
        return INCONCLUSIVE
    if diff.high <= margin:
        return HOLDS
    return FAILS if diff.low > margin else INCONCLUSIVE


def better(diff: PairedDiff, by: float = 0.0) -> str:
    """Lower than the baseline (by more than ``by``)."""
    if not diff.has_interval:
        return INCONCLUSIVE
    if diff.high < -by:
        return HOLDS
    return FAILS if diff.low > -by else INCONCLUSIVE


def by_seed(runs: Iterable[dict], value) -> dict[int, float]:
    """``{seed: value(run)}`` of a group's runs."""
    return {r["seed"]: value(r) for r in runs}
