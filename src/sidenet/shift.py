"""Is new traffic distributed like the data the threshold was chosen on?

Every promise a threshold makes (accuracy drop, compute) was measured or bounded on calibration data;
it carries over only to data from the same distribution. The SideNet's confidence is a cheap,
label-free summary of that distribution: if its distribution on new inputs differs from the
calibration one (two-sample Kolmogorov-Smirnov test), or the exit rate moves, the promise is void.
SST-2 shows it: a threshold chosen on train phrases over-exits on dev sentences.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = ["ShiftReport", "confidence_shift"]


@dataclass
class ShiftReport:
    """Outcome of :func:`confidence_shift`.

    Attributes:
        statistic: the KS statistic (largest gap between the two empirical CDFs), in [0, 1].
        p_value: two-sided KS p-value; NaN when there are too few new samples.
        shifted: True when ``p_value < alpha``.
        reference_exit_rate, observed_exit_rate: share of each sample at or above the threshold.
        reference_size, observed_size: sample counts.
        alpha: the test's level.
    """

    statistic: float
    p_value: float
    shifted: bool
    reference_exit_rate: float
    observed_exit_rate: float
    reference_size: int
    observed_size: int
    alpha: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        if np.isnan(self.p_value):
            return f"shift check: too few samples ({self.observed_size}) to test"
        verdict = "SHIFT: the threshold's promises may not hold" if self.shifted else "no shift detected"
        return (
            f"{verdict} (KS statistic {self.statistic:.3f}, p = {self.p_value:.2g}, alpha {self.alpha:g}; "
            f"exit rate {self.observed_exit_rate:.3f} now vs {self.reference_exit_rate:.3f} on calibration; "
            f"{self.observed_size} vs {self.reference_size} samples)"
        )


def confidence_shift(
    reference: np.ndarray,
    observed: np.ndarray,
    threshold: float = float("inf"),
    alpha: float = 0.01,
    min_samples: int = 100,
) -> ShiftReport:
    """Two-sample KS test between calibration confidences and new ones.

    Args:
        reference: SideNet confidences on the calibration data (under the deployed policy).
        observed: confidences on new traffic.
        threshold: the deployed threshold, for the exit rates in the report.
        alpha: level of the test; ``shifted`` when the p-value is below it.
        min_samples: fewer observed samples than this give ``p_value = NaN`` and ``shifted = False``.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    reference = np.asarray(reference, dtype=np.float64).ravel()
    observed = np.asarray(observed, dtype=np.float64).ravel()
    if reference.size == 0:
        raise ValueError("the reference sample is empty")
    # float32 comparison, as the exit policy compares float32 confidences
    exit_rate = lambda c: float((c.astype(np.float32) >= np.float32(threshold)).mean()) if c.size else float("nan")  # noqa: E731
    if observed.size < min_samples:
        statistic, p_value = float("nan"), float("nan")
    else:
        from scipy import stats  # here, not at import: serving and the GPU image's tests need no scipy

        result = stats.ks_2samp(reference, observed)
        statistic, p_value = float(result.statistic), float(result.pvalue)
    return ShiftReport(
        statistic=statistic,
        p_value=p_value,
        shifted=bool(p_value < alpha) if not np.isnan(p_value) else False,
        reference_exit_rate=exit_rate(reference),
        observed_exit_rate=exit_rate(observed),
        reference_size=int(reference.size),
        observed_size=int(observed.size),
        alpha=alpha,
    )
