"""Are the confidences honest? Calibration metrics, temperature scaling and reliability diagrams.

A model is calibrated when, among the samples it answers with confidence p, a fraction p is right.
The paper claims SideNet confidences are; these functions measure it for the SideNet, the MainNet and
the adaptive model alike, from logits and labels:

- expected calibration error (ECE) over equal-width or equal-mass confidence bins, and the maximum
  calibration error (MCE, the worst bin);
- the Brier score (mean squared error of the probability vector) and the negative log-likelihood.

Temperature scaling (Guo et al., "On Calibration of Modern Neural Networks", 2017) divides the logits
by one scalar T > 0 fitted to minimise the NLL on a calibration split; it changes no prediction.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from sidenet.loaders import length_grouped
from sidenet.plotting import pyplot, save_figure
from sidenet.training import trunk_states

__all__ = [
    "CalibrationMetrics",
    "ReliabilityBins",
    "calibration_metrics",
    "reliability_bins",
    "fit_temperature",
    "reliability_diagram",
    "calibrate",
]

BinScheme = Literal["width", "mass"]


@dataclass
class ReliabilityBins:
    """Per-bin mean confidence, accuracy and count (empty bins are left out)."""

    lower: np.ndarray
    upper: np.ndarray
    confidence: np.ndarray
    accuracy: np.ndarray
    count: np.ndarray

    def calibration_errors(self) -> tuple[float, float]:
        """(ECE, MCE): the count-weighted mean and the largest |accuracy - confidence| over bins."""
        gaps = np.abs(self.accuracy - self.confidence)
        total = self.count.sum()
        return float((gaps * self.count).sum() / total), float(gaps.max())


@dataclass
class CalibrationMetrics:
    """Calibration of one set of predictions (fractions; lower is better except accuracy)."""

    ece: float  # equal-width bins
    ece_mass: float  # equal-mass bins
    mce: float  # equal-width bins
    brier: float
    nll: float
    accuracy: float
    mean_confidence: float
    num_samples: int
    bins: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _as_probabilities(logits: Any, temperature: float = 1.0) -> np.ndarray:
    logits = torch.as_tensor(logits, dtype=torch.float64)
    if logits.ndim != 2 or logits.shape[0] == 0:
        raise ValueError(f"logits must have shape (N, C) with N > 0, got {tuple(logits.shape)}")
    return torch.softmax(logits / temperature, dim=1).numpy()


def _check_labels(labels: Any, n: int, classes: int) -> np.ndarray:
    labels = np.asarray(labels).astype(np.int64).ravel()
    if labels.shape[0] != n:
        raise ValueError(f"{labels.shape[0]} labels for {n} predictions")
    if labels.size and (labels.min() < 0 or labels.max() >= classes):
        raise ValueError(f"labels must lie in [0, {classes}), got [{labels.min()}, {labels.max()}]")
    return labels


def reliability_bins(confidence: Any, correct: Any, bins: int = 15, scheme: BinScheme = "width") -> ReliabilityBins:
    """Bin the samples by confidence: ``width`` cuts [0, 1] into equal intervals, ``mass`` puts the
    same number of samples in each bin (ties kept together)."""
    if bins < 1:
        raise ValueError(f"bins must be at least 1, got {bins}")
    confidence = np.asarray(confidence, dtype=np.float64).ravel()
    correct = np.asarray(correct, dtype=np.float64).ravel()
    if confidence.size == 0 or confidence.size != correct.size:
        raise ValueError("confidence and correct must be non-empty and of equal length")
    if scheme == "width":
        edges = np.linspace(0.0, 1.0, bins + 1)
    elif scheme == "mass":
        edges = np.unique(np.quantile(confidence, np.linspace(0.0, 1.0, bins + 1)))
        edges[0], edges[-1] = min(edges[0], 0.0), max(edges[-1], 1.0)
    else:
        raise ValueError(f"scheme must be 'width' or 'mass', got {scheme!r}")
    # Bin i holds (edges[i], edges[i+1]]; confidence 0 goes to the first bin.
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, len(edges) - 2)
    count = np.bincount(index, minlength=len(edges) - 1).astype(np.float64)
    conf_sum = np.bincount(index, weights=confidence, minlength=len(edges) - 1)
    acc_sum = np.bincount(index, weights=correct, minlength=len(edges) - 1)
    keep = count > 0
    return ReliabilityBins(
        lower=edges[:-1][keep],
        upper=edges[1:][keep],
        confidence=conf_sum[keep] / count[keep],
        accuracy=acc_sum[keep] / count[keep],
        count=count[keep],
    )


def calibration_metrics(logits: Any, labels: Any, bins: int = 15, temperature: float = 1.0) -> CalibrationMetrics:
    """Calibration of softmax(logits / temperature) against integer labels; see the module docstring.

    ``logits`` may also be log-probabilities (a mixture of two models' answers, for instance): only
    their softmax is used.
    """
    probs = _as_probabilities(logits, temperature)
    n, classes = probs.shape
    labels = _check_labels(labels, n, classes)
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    ece, mce = reliability_bins(confidence, correct, bins, "width").calibration_errors()
    ece_mass, _ = reliability_bins(confidence, correct, bins, "mass").calibration_errors()
    onehot = np.eye(classes)[labels]
    brier = float(((probs - onehot) ** 2).sum(axis=1).mean())
    nll = float(-np.log(np.clip(probs[np.arange(n), labels], 1e-300, None)).mean())
    return CalibrationMetrics(
        ece=ece,
        ece_mass=ece_mass,
        mce=mce,
        brier=brier,
        nll=nll,
        accuracy=float(correct.mean()),
        mean_confidence=float(confidence.mean()),
        num_samples=n,
        bins=bins,
    )


def fit_temperature(logits: Any, labels: Any, bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """The temperature T minimising the NLL of softmax(logits / T) on these (calibration) samples.

    A bounded one-dimensional search over log T (the NLL is smooth and, in practice, unimodal in it).
    """
    logits_t = torch.as_tensor(logits, dtype=torch.float64)
    if logits_t.ndim != 2 or logits_t.shape[0] == 0:
        raise ValueError(f"logits must have shape (N, C) with N > 0, got {tuple(logits_t.shape)}")
    if not torch.isfinite(logits_t).all():
        raise ValueError("logits contain NaN or inf")
    labels_t = torch.as_tensor(_check_labels(labels, logits_t.shape[0], logits_t.shape[1]))

    def nll(log_t: float) -> float:
        return float(torch.nn.functional.cross_entropy(logits_t / math.exp(log_t), labels_t))

    from scipy import optimize  # here, not at import: serving and the GPU image's tests need no scipy

    low, high = math.log(bounds[0]), math.log(bounds[1])
    result = optimize.minimize_scalar(nll, bounds=(low, high), method="bounded", options={"xatol": 1e-4})
    return float(math.exp(result.x))


def reliability_diagram(
    path: str | Path,
    panels: dict[str, tuple[Any, Any]],
    bins: int = 15,
    title: str | None = None,
) -> Path:
    """Save a PNG with one reliability diagram per entry of ``panels`` (name -> (logits, labels)),
    side by side: accuracy per equal-width confidence bin against the diagonal, bin counts below."""
    plt = pyplot()

    if not panels:
        raise ValueError("give at least one panel")
    fig, axes = plt.subplots(
        2, len(panels), figsize=(3.4 * len(panels), 4.6), dpi=110, squeeze=False, height_ratios=[3, 1], sharex=True
    )
    for column, (name, (logits, labels)) in enumerate(panels.items()):
        probs = _as_probabilities(logits)
        labels = _check_labels(labels, *probs.shape)
        metrics = calibration_metrics(logits, labels, bins)
        table = reliability_bins(probs.max(axis=1), probs.argmax(axis=1) == labels, bins, "width")
        top, bottom = axes[0, column], axes[1, column]
        width = table.upper - table.lower
        top.bar(
            table.lower,
            table.accuracy,
            width=width,
            align="edge",
            color="#4C72B0",
            alpha=0.8,
            edgecolor="white",
            label="accuracy",
        )
        top.bar(
            table.lower,
            table.confidence - table.accuracy,
            bottom=table.accuracy,
            width=width,
            align="edge",
            color="#DD8452",
            alpha=0.45,
            edgecolor="white",
            label="gap to confidence",
        )
        top.plot([0, 1], [0, 1], color="black", lw=0.8, ls="--")
        top.set_xlim(0, 1)
        top.set_ylim(0, 1)
        top.set_title(f"{name}\nECE {100 * metrics.ece:.2f}%, acc {100 * metrics.accuracy:.1f}%", fontsize=9)
        top.set_ylabel("accuracy" if column == 0 else "")
        bottom.bar(table.lower, table.count / table.count.sum(), width=width, align="edge", color="grey")
        bottom.set_xlabel("confidence (max softmax)")
        bottom.set_ylabel("share" if column == 0 else "")
        if column == 0:
            top.legend(loc="upper left", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def sidenet_logits(model: Any, loader: Any, progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Raw SideNet logits (before any temperature) and labels of ``loader``, from trunk and SideNet only;
    sentences go in length-sorted batches (logits do not depend on the batching, FLOPs would)."""
    logits, _, labels = every_sidenet_logits(model, loader, progress, taps=1)
    return logits[0], labels


@torch.no_grad()
def every_sidenet_logits(
    model: Any, loader: Any, progress: bool = True, taps: int | None = None, mainnet: bool = False
) -> tuple[list[np.ndarray], np.ndarray | None, np.ndarray]:
    """:func:`sidenet_logits` of each of the first ``taps`` SideNets of a cascade (all by default), the
    MainNet's logits where ``mainnet`` asks for them (else None), and the labels, in one pass: the trunk
    runs once, each segment between taps once on every sample (and the rest once, for the MainNet's)."""
    splits, sidenets = model.splits[:taps], model.sidenets[:taps]
    columns: list[list[torch.Tensor]] = [[] for _ in splits]
    main, labels = [], []
    for state, targets in trunk_states(model, length_grouped(loader), progress, "SideNet logits"):
        for k, (split, head) in enumerate(zip(splits, sidenets, strict=True)):
            if k:
                state = splits[k - 1].advance(state, split)
            columns[k].append(head(split.features(state)).float().cpu())
        if mainnet:
            main.append(splits[-1].rest(state).float().cpu())
        labels.append(targets)
    main_logits = torch.cat(main).numpy() if mainnet else None
    return [torch.cat(column).numpy() for column in columns], main_logits, torch.cat(labels).numpy()


def calibrate(model: Any, loader: Any, progress: bool = True) -> float | tuple[float, ...]:
    """Temperature-scale the SideNet of an :class:`sidenet.AdaptiveModel` on ``loader`` (a calibration
    split with labels, not the test set): fits T on its raw logits, sets ``model.temperature`` and
    returns T. The exit policy then reads softmax(logits / T); thresholds must be chosen after this.

    A cascade gets one temperature per SideNet, each fitted on its own logits (over all of ``loader``,
    not only the samples that reach it), set in ``model.policies`` and returned as a tuple."""
    if model.num_taps > 1:
        logits, _, labels = every_sidenet_logits(model, loader, progress)
        fitted = tuple(float(fit_temperature(column, labels)) for column in logits)
        model.policies = tuple(
            dataclasses.replace(rule, temperature=value) for rule, value in zip(model.policies, fitted, strict=True)
        )
        return fitted
    model.temperature = fit_temperature(*sidenet_logits(model, loader, progress=progress))
    return model.temperature
