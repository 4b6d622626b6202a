"""``LiveAudit``: watch, on live traffic and without labels, whether the exits still agree with the MainNet.

The threshold's promise (:meth:`sidenet.TradeoffCurve.threshold_for` with ``max_disagreement``) is about
the share of samples that exit with another answer than the MainNet's. Once served, nothing measures
that share: the answers of exited samples are never compared with the MainNet's. The audit does, on a
small random share of the traffic: for each sample drawn it also runs the rest of the MainNet, off the
answer path (the answer stays the routed one), and counts the drawn samples that exited *and* disagree.
That count over the draws is a binomial sample of exactly the risk the threshold was chosen for, so the
same Clopper-Pearson machinery as the guarantees (:func:`sidenet.guarantee.upper_bound`) gives a
one-sided upper confidence bound on the live disagreement rate; the audit is flagged when that bound
exceeds the tolerance.

The draw is made on the host before anything is known about the batch, among all its samples rather
than among those that exit: which samples exit is on the device, and choosing among them would cost a
host wait per batch. Drawn samples that continue cost a rest they would have run anyway (at a 90% exit
rate, one audited rest in ten) and count as agreeing, as they do in the guarantee's risk. The count of
disagreements stays on the device and is read only when asked for.
"""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path
from typing import Any

import torch

from sidenet.guarantee import upper_bound

__all__ = ["LiveAudit", "audit_from_log"]


class LiveAudit:
    """A running audit of the exits against the MainNet on a random share of the traffic.

    Args:
        share: probability with which each routed sample is audited (e.g. 0.01 to 0.02).
        tolerance: the disagreement rate the threshold was chosen for (``max_disagreement``); the audit
            is flagged when its upper bound exceeds it.
        delta: the bound holds with probability at least 1 - delta.
        seed: seeds the draw of audited samples (its own generator; the global RNG is left alone).

    Call :meth:`check` with each batch's front pass (:class:`sidenet.serving.PooledRouter` does, given
    ``audit=``). Reading :attr:`disagreed` (and what depends on it) waits for the device once; nothing
    else does. Until :attr:`min_audits` samples are audited the bound cannot fall below the tolerance
    whatever they show, so the audit reports ``state == "collecting"`` and is not flagged. One audit may
    be fed from several threads.
    """

    def __init__(self, share: float = 0.01, tolerance: float = 0.01, delta: float = 0.05, seed: int = 0) -> None:
        if not 0.0 < share <= 1.0:
            raise ValueError(f"share must lie in (0, 1], got {share!r}")
        if not 0.0 < tolerance < 1.0:
            raise ValueError(f"tolerance must lie in (0, 1), got {tolerance!r}")
        if not 0.0 < delta < 1.0:
            raise ValueError(f"delta must lie in (0, 1), got {delta!r}")
        self.share = float(share)
        self.tolerance = float(tolerance)
        self.delta = float(delta)
        self.seed = int(seed)
        self._generator = torch.Generator().manual_seed(self.seed)
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        """Forget every count (e.g. after a new threshold is installed)."""
        with self._lock:
            self._seen = 0
            self._audited = 0
            # Partial sums per device, added to without reading them (no host wait per batch).
            self._disagreements: dict[torch.device, torch.Tensor] = {}

    # -- feeding ---------------------------------------------------------------------------------
    @torch.no_grad()
    def check(self, model: Any, front: Any) -> None:
        """Audit a random share of the batch whose front pass is ``front`` (a :class:`sidenet.FrontPass`
        of ``model``): run the rest of the MainNet on the drawn samples and count those that exited with
        another answer than the MainNet's (at any SideNet of a cascade). Changes no answer."""
        n = len(front.exited)
        with self._lock:
            drawn = (torch.rand(n, generator=self._generator) < self.share).nonzero().squeeze(1)
        if len(drawn) == 0:
            with self._lock:
                self._seen += n
            return
        device = front.exited.device
        index = drawn.to(device, non_blocking=True)
        # No sizes given: text keeps its padded length (padding is masked out) rather than reading the
        # kept length from the device.
        selected = model.split.select_sized(front.state, index, ())
        main = model.split.rest(selected).argmax(dim=-1)
        answer = front.side_logits.index_select(0, index).argmax(dim=-1)
        exited = front.exited.index_select(0, index)
        if model.num_taps > 1:
            # A cascade's answer for the drawn samples: the first SideNet's where it exited, else that of the
            # later SideNets (the MainNet's where none exits). Run here on the few drawn samples, off the
            # answer path; it reads one value per later tap, on the batches that have a drawn sample only.
            later = model.continue_from(selected, front.profile)
            answer = torch.where(exited, answer, later.logits.argmax(dim=-1))
            exited = exited | later.exited
        wrong = ((main != answer) & exited).sum()
        with self._lock:
            self._seen += n
            self._audited += len(drawn)
            held = self._disagreements.get(device)
            self._disagreements[device] = wrong if held is None else held + wrong

    def add_counts(self, seen: int, audited: int, disagreed: int) -> None:
        """Add counts gathered elsewhere (another replica's audit, logged traffic)."""
        if min(seen, audited, disagreed) < 0 or disagreed > audited or audited > seen:
            raise ValueError(f"need 0 <= disagreed <= audited <= seen, got {disagreed}, {audited}, {seen}")
        with self._lock:
            self._seen += int(seen)
            self._audited += int(audited)
            cpu = torch.device("cpu")
            self._disagreements[cpu] = self._disagreements.get(cpu, torch.zeros((), dtype=torch.long)) + disagreed

    # -- reading ---------------------------------------------------------------------------------
    @property
    def samples_seen(self) -> int:
        """Samples offered to the audit (audited or not)."""
        return self._seen

    @property
    def audited(self) -> int:
        """Samples audited: the rest of the MainNet was run on them too."""
        return self._audited

    @property
    def disagreed(self) -> int:
        """Audited samples that exited with another answer than the MainNet's (reads the device)."""
        with self._lock:
            parts = list(self._disagreements.values())
        return int(sum(int(part) for part in parts))

    @property
    def min_audits(self) -> int:
        """Audits needed before the bound can fall below the tolerance (with no disagreement at all)."""
        return math.ceil(math.log(self.delta) / math.log1p(-self.tolerance))

    def rate(self) -> float:
        """The observed disagreement rate among audited samples (NaN before any audit)."""
        return self.disagreed / self._audited if self._audited else math.nan

    def upper_bound(self) -> float:
        """One-sided Clopper-Pearson upper bound, at confidence 1 - delta, on the rate at which served
        samples exit with another answer than the MainNet's (1.0 before any audit)."""
        return upper_bound(self.disagreed, self._audited, self.delta) if self._audited else 1.0

    @property
    def state(self) -> str:
        """``collecting`` (fewer than :attr:`min_audits` audits), ``ok`` or ``flagged`` (bound above the
        tolerance)."""
        if self._audited < self.min_audits:
            return "collecting"
        return "flagged" if self.upper_bound() > self.tolerance else "ok"

    @property
    def flagged(self) -> bool:
        """True when the upper bound exceeds the tolerance (after :attr:`min_audits` audits)."""
        return self.state == "flagged"

    def to_dict(self) -> dict[str, Any]:
        """Every count and the bound, for metrics and logs (one read of the device)."""
        disagreed, audited = self.disagreed, self._audited
        bound = upper_bound(disagreed, audited, self.delta) if audited else 1.0
        state = "collecting" if audited < self.min_audits else ("flagged" if bound > self.tolerance else "ok")
        return {
            "share": self.share,
            "tolerance": self.tolerance,
            "delta": self.delta,
            "samples_seen": self._seen,
            "audited": audited,
            "disagreed": disagreed,
            "rate": disagreed / audited if audited else math.nan,
            "upper_bound": bound,
            "min_audits": self.min_audits,
            "state": state,
            "flagged": state == "flagged",
        }

    @classmethod
    def from_counts(cls, seen: int, audited: int, disagreed: int, **options: Any) -> LiveAudit:
        """An audit holding the given counts (e.g. summed from logged traffic); ``options`` as the constructor."""
        audit = cls(**options)
        audit.add_counts(seen, audited, disagreed)
        return audit

    def __getstate__(self) -> dict[str, Any]:
        # Locks and generators do not pickle: a copy (a Ray replica's) keeps the counts and settings.
        state = {k: v for k, v in self.__dict__.items() if k not in ("_lock", "_generator")}
        state["_disagreements"] = {torch.device("cpu"): torch.tensor(self.disagreed)}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._generator = torch.Generator().manual_seed(self.seed + self._seen)


def _audit_records(value: Any) -> list[dict[str, Any]]:
    """The audit dicts in a logged value: a deployment's ``/metrics`` answer (its ``audit``), an audit's
    :meth:`LiveAudit.to_dict`, or a list of either."""
    if isinstance(value, list):
        return [record for item in value for record in _audit_records(item)]
    if isinstance(value, dict) and isinstance(value.get("audit"), dict):
        return [value["audit"]]
    if isinstance(value, dict) and {"samples_seen", "audited", "disagreed"} <= set(value):
        return [value]
    return []


def audit_from_log(path: str | Path) -> LiveAudit:
    """The audit of logged traffic: the counts of every record in ``path`` summed into one
    :class:`LiveAudit` (its tolerance, delta and share those of the records, which must agree).

    ``path`` holds JSON: one ``/metrics`` answer of the Ray Serve deployment, one
    :meth:`LiveAudit.to_dict`, a list of those, or one of them per line (JSON lines). Give each
    replica's latest snapshot once: the counts are running totals, so two snapshots of one replica
    would count its audits twice.
    """
    text = Path(path).read_text()
    try:
        values = [json.loads(text)]
    except json.JSONDecodeError:
        try:
            values = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: neither JSON nor JSON lines ({exc})") from exc
    records = _audit_records(values)
    if not records:
        raise ValueError(f"{path}: no audit counts found (expected /metrics answers or LiveAudit.to_dict() records)")
    settings = {(float(r["tolerance"]), float(r["delta"]), float(r["share"])) for r in records}
    if len(settings) > 1:
        raise ValueError(f"{path}: the records were audited under different settings {sorted(settings)}")
    tolerance, delta, share = settings.pop()
    audit = LiveAudit(share=share, tolerance=tolerance, delta=delta)
    for record in records:
        audit.add_counts(int(record["samples_seen"]), int(record["audited"]), int(record["disagreed"]))
    return audit
