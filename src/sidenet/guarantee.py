"""Thresholds whose promise holds on new data with a stated probability.

The setting is that of "Learn then Test" (Angelopoulos, Bates, Candès, Jordan, Lei, 2021) and of
risk-controlling prediction sets (Bates et al., 2021): each candidate threshold is a null hypothesis
"its risk on the data distribution exceeds the limit", tested with a finite-sample p-value computed
on n calibration samples; the hypotheses are tested in a fixed order (from the safest threshold to
the most aggressive) and testing stops at the first one that cannot be rejected. All the rejected
thresholds are then safe simultaneously, with probability at least 1 - delta over the draw of the
calibration data.

Assumption: calibration samples and future samples are exchangeable (i.i.d. draws from the same
distribution). Under distribution shift the guarantee is void; see :mod:`sidenet.shift`.

Risks used by :meth:`sidenet.TradeoffCurve.threshold_for`:

- accuracy: the share of samples that exit with another answer than the MainNet's. It bounds the
  accuracy drop from above (a sample can only lose accuracy by disagreeing), is a 0/1 loss per sample,
  and grows as the threshold falls, so the exact binomial (Clopper-Pearson) p-value applies.
- compute: the mean FLOPs per sample, scaled to [0, 1] by the cheapest and dearest possible sample
  cost; exact binomial when every sample costs one of two values (vision), Hoeffding-Bentkus otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np

__all__ = [
    "binomial_pvalue",
    "hoeffding_bentkus_pvalue",
    "mean_pvalue",
    "fixed_sequence",
    "upper_bound",
    "certified_cheapest",
]


def _stats() -> Any:
    """scipy.stats, imported when a guarantee is computed: ``import sidenet`` (routing, serving, the GPU
    benchmark on an image without scipy) needs none of it."""
    from scipy import stats

    return stats


def binomial_pvalue(successes: int, n: int, limit: float) -> float:
    """p-value of "mean of n 0/1 losses > limit" given ``successes`` ones: P(Binomial(n, limit) <= k).

    Rejecting when it is at most delta is the exact (Clopper-Pearson) one-sided test.
    """
    if limit >= 1.0:
        return 0.0  # no mean of 0/1 losses exceeds 1
    if limit <= 0.0:
        return 1.0
    return float(_stats().binom.cdf(successes, n, limit))


def hoeffding_bentkus_pvalue(mean: float, n: int, limit: float) -> float:
    """p-value of "E[loss] > limit" for losses in [0, 1] with empirical ``mean`` over n samples
    (Bates et al. 2021, Hoeffding-Bentkus)."""
    if limit >= 1.0:
        return 0.0
    if limit <= 0.0:
        return 1.0
    a = min(mean, limit)
    # Kullback-Leibler divergence between Bernoulli(a) and Bernoulli(limit), with 0 log 0 = 0.
    kl = (a * math.log(a / limit) if a > 0 else 0.0) + ((1 - a) * math.log((1 - a) / (1 - limit)) if a < 1 else 0.0)
    hoeffding = math.exp(-n * kl)
    bentkus = math.e * float(_stats().binom.cdf(math.ceil(n * mean), n, limit))
    return min(hoeffding, bentkus, 1.0)


def mean_pvalue(losses: np.ndarray, limit: float) -> float:
    """p-value of "E[loss] > limit" for losses in [0, 1]: exact binomial if they are all 0 or 1."""
    losses = np.asarray(losses, dtype=np.float64)
    if losses.size == 0:
        raise ValueError("no losses to test")
    if losses.min() < -1e-12 or losses.max() > 1 + 1e-12:
        raise ValueError("losses must lie in [0, 1]")
    n = losses.size
    if np.all((losses == 0) | (losses == 1)):
        return binomial_pvalue(int(losses.sum()), n, limit)
    return hoeffding_bentkus_pvalue(float(losses.mean()), n, limit)


def fixed_sequence(pvalues: Iterable[float], delta: float) -> int:
    """How many of the hypotheses, tested in the given order at level delta, are rejected before the
    first that is not (fixed-sequence testing controls the family-wise error at delta).

    ``pvalues`` may be any iterable, a generator included: it is read only up to the first p-value
    above delta, so p-values computed lazily after that are never computed.
    """
    if not 0 < delta < 1:
        raise ValueError(f"delta must lie in (0, 1), got {delta}")
    count = 0
    for p in pvalues:
        if not p <= delta:  # a NaN p-value rejects nothing
            break
        count += 1
    return count


def upper_bound(successes: int, n: int, delta: float) -> float:
    """One-sided Clopper-Pearson upper bound on a binomial proportion at confidence 1 - delta."""
    if n <= 0:
        raise ValueError("n must be positive")
    if successes >= n:
        return 1.0
    return float(_stats().beta.ppf(1 - delta, successes + 1, n - successes))


def certified_cheapest(
    mean_costs: np.ndarray,
    low: float,
    high: float,
    limit: float,
    n: int,
    delta: float,
    continuing: np.ndarray | None = None,
) -> int:
    """How many of a curve's points, tested from the last (the cheapest) towards the first with
    fixed-sequence testing at level ``delta``, are certified to keep the mean cost per sample at most
    ``limit``, a sample's cost lying in [``low``, ``high``] (as seen on the ``n`` calibration samples).

    ``mean_costs[i]`` is point i's mean cost on them. ``continuing``, when every sample costs either
    ``low`` or ``high``, is per point the count paying ``high``: the scaled cost is then a 0/1 loss and
    the exact binomial test applies; otherwise Hoeffding-Bentkus on the scaled mean."""
    span = max(high - low, 1e-300)
    scaled_limit = (limit - low) / span

    def pvalues() -> Iterable[float]:
        for i in range(len(mean_costs) - 1, -1, -1):
            if continuing is not None:
                yield binomial_pvalue(int(continuing[i]), n, scaled_limit)
            else:
                scaled = min(max((float(mean_costs[i]) - low) / span, 0.0), 1.0)
                yield hoeffding_bentkus_pvalue(scaled, n, scaled_limit)

    return fixed_sequence(pvalues(), delta)
