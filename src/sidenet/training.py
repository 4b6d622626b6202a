"""Training the SideNet only. One pass of the frozen MainNet caches the pooled tap features and the
MainNet's logits; the SideNet then trains on that cache for many epochs in seconds.

:func:`trunk_batches` is the one loop of a loader through the MainNet's trunk, with the labels checked:
the feature cache here, the sweep (:func:`sidenet.record.collect`) and the calibration all run on it.
It moves each batch to the MainNet's device and floating dtype (:func:`to_mainnet`), as training loops
do: a loader of CPU float32 tensors feeds a CUDA or bfloat16 MainNet as it is.

Cascades (``fit(reach=...)``, :func:`fit_sidenet`) train their SideNets in tap order. ``reach="all"``:
each on every sample. A later SideNet only answers what the earlier ones did not exit, so
:func:`reach_weights` may weigh its samples instead: ``"weighted"``, by the chance the sample reaches the
tap, prod_{j<k} (1 - conf_j) (conf_j: earlier SideNets' max softmax on the training cache), mean 1 (the
continuous importance weights of cascade survivors in CalexNet, Aperstein and Apartsin, arXiv:2509.08318);
``"hard"``, weight 1 on the samples left when each earlier SideNet exits its ``exit_share`` most confident
(MSDNet's budgeted rule), as a Viola-Jones cascade trains each stage on what earlier stages pass on.
BoostNet (Yu et al., arXiv:2211.16726) trains later exits on earlier residuals instead: not done here.
Measured (benchmarks/cascade_training.py, 2 seeds, same SideNets; mean FLOPs fraction with the SideNets at
the cascade ``choose_taps`` picks on validation): Fashion-MNIST all 0.130, hard 0.145, weighted 0.152 (test
0.127, 0.142, 0.152); SST-2 all 0.259, hard 0.281, weighted 0.281 (dev cross-fitted 0.451, 0.451, 0.442).
The weights keep 3-50% of the cache for the later SideNets, whose accuracy falls: ``"all"`` stays the default.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from sidenet.head import SideNet
from sidenet.loaders import batch_count, iter_batches, length_grouped
from sidenet.splits import MainNetSplit
from sidenet.splits.probe import to_placement

if TYPE_CHECKING:
    from sidenet.routing import AdaptiveModel

__all__ = [
    "REACH",
    "FeatureCache",
    "TrunkBatch",
    "cache_features",
    "cache_tap_features",
    "train_sidenet",
    "fit_sidenet",
    "reach_weights",
    "validate_labels",
    "trunk_batches",
    "trunk_states",
    "to_mainnet",
]


@dataclass
class FeatureCache:
    """Pooled SideNet inputs, MainNet logits and labels of a dataset, all on the CPU."""

    features: torch.Tensor
    mainnet_logits: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


def validate_labels(labels: Any, batch_size: int, num_classes: int) -> torch.Tensor:
    """``labels`` of a batch of ``batch_size`` samples as a 1-D CPU long tensor, or ``ValueError``.

    They must be one integer class index in ``[0, num_classes)`` per sample. (N, 1) labels are refused,
    not flattened: compared with (N,) predictions they would broadcast to an (N, N) table and give
    wrong accuracies without an error, and guessing which axis is the batch hides the caller's bug.
    """
    try:
        tensor = torch.as_tensor(labels)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"labels must be a 1-D sequence of integer class indices, got {labels!r:.80}") from exc
    if tensor.ndim != 1:
        raise ValueError(
            f"labels must be 1-D, one class index per sample, got shape {tuple(tensor.shape)}"
            + ("; flatten (N, 1) labels with labels.view(-1)" if tensor.ndim == 2 and tensor.shape[1] == 1 else "")
        )
    if len(tensor) != batch_size:
        raise ValueError(f"got {len(tensor)} labels for a batch of {batch_size} inputs")
    if tensor.dtype == torch.bool or tensor.is_floating_point() or tensor.is_complex():
        raise ValueError(f"labels must be integer class indices, got dtype {tensor.dtype}")
    if len(tensor) and (int(tensor.min()) < 0 or int(tensor.max()) >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes - 1}] (the model's {num_classes} classes), got values from "
            f"{int(tensor.min())} to {int(tensor.max())}"
        )
    return tensor.long().cpu()


def to_mainnet(split: MainNetSplit, inputs: Any) -> Any:
    """A loader's input batch on the MainNet's device, its floating tensors in the MainNet's floating
    dtype (integer tensors such as token ids keep theirs), as the routed model wants them.

    The placement is that of the MainNet's first floating parameter, read on every call so that it
    follows the MainNet through ``.to()``; a MainNet without one (a split of plain functions) gets the
    inputs as they are. A no-op for inputs already there.
    """
    module = split.mainnet if isinstance(split.mainnet, nn.Module) else split
    reference = next((p for p in module.parameters() if p.is_floating_point()), None)
    if reference is None:
        return inputs
    return to_placement(inputs, reference.device, reference.dtype)


class TrunkBatch(NamedTuple):
    """One batch of a loader run through the trunk (see :func:`trunk_batches`)."""

    inputs: Any  # on the MainNet's device and dtype (the FLOPs of a batch depend on their size)
    state: Any  # the MainNet's state at the tap
    labels: torch.Tensor  # (N,) class indices, checked, on the CPU


def trunk_batches(model: AdaptiveModel, loader: Iterable, progress: bool, desc: str) -> Iterator[TrunkBatch]:
    """Each batch of ``loader`` through the model's trunk, in eval mode (inputs moved to the MainNet's
    device and dtype by :func:`to_mainnet`, then validated when the model checks them; labels always: see
    :func:`validate_labels`), with a progress bar named ``desc``; raises ``ValueError`` when the loader
    yields nothing. Call under ``torch.no_grad()``."""
    model.eval()
    empty = True
    for loaded, targets in tqdm(
        iter_batches(loader), desc=desc, total=batch_count(loader), disable=not progress, leave=False
    ):
        inputs = to_mainnet(model.split, loaded)
        model.check_input(inputs)  # structure always; values where reading them costs no host wait
        # Checked before the trunk runs, so that bad labels fail at the first batch, not in the loss.
        labels = validate_labels(targets, model.split.batch_size(inputs), model.sidenet.num_classes)
        empty = False
        yield TrunkBatch(inputs, model.split.trunk(inputs), labels)
    if empty:
        raise ValueError("the loader yielded no batches")


def trunk_states(
    model: AdaptiveModel, loader: Iterable, progress: bool, desc: str
) -> Iterator[tuple[Any, torch.Tensor]]:
    """``(state at the tap, labels)`` of each batch: :func:`trunk_batches` without the inputs."""
    for batch in trunk_batches(model, loader, progress, desc):
        yield batch.state, batch.labels


@torch.no_grad()
def cache_features(
    model: AdaptiveModel, loader: Iterable, progress: bool = True, desc: str = "Caching tap features"
) -> FeatureCache:
    """Run the frozen MainNet once over ``loader``; keep the first SideNet's pooled tap features, the
    MainNet's logits and the labels (see :func:`cache_tap_features` for every tap of a cascade)."""
    return cache_tap_features(model, loader, progress, desc)[0]


@torch.no_grad()
def cache_tap_features(
    model: AdaptiveModel, loader: Iterable, progress: bool = True, desc: str = "Caching tap features"
) -> list[FeatureCache]:
    """Run the frozen MainNet once over ``loader`` and keep, for each SideNet in tap order, its pooled
    features (the MainNet's logits and the labels are shared by all): one pass of the MainNet caches
    every tap of a cascade, each segment run once on every sample."""
    splits, sidenets = model.splits, model.sidenets
    features: list[list[torch.Tensor]] = [[] for _ in splits]
    logits, labels = [], []
    for state, targets in trunk_states(model, loader, progress, desc):
        for k, split in enumerate(splits):
            if k:
                state = splits[k - 1].advance(state, split)
            features[k].append(sidenets[k].pooled(split.features(state)).float().cpu())
        logits.append(splits[-1].rest(state).float().cpu())
        labels.append(targets)
    shared_logits, shared_labels = torch.cat(logits), torch.cat(labels)
    return [FeatureCache(torch.cat(columns), shared_logits, shared_labels) for columns in features]


def _loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    teacher: torch.Tensor,
    weight: float,
    temperature: float,
    sample_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    # Per sample, then the (weighted) mean over the batch: weights of ones give exactly the unweighted loss.
    loss = F.cross_entropy(logits, labels, reduction="none")
    if weight > 0:
        # Hinton et al.'s distillation term, scaled by T^2 so its gradient does not shrink with T.
        soft = F.kl_div(
            F.log_softmax(logits / temperature, dim=1),
            F.log_softmax(teacher / temperature, dim=1),
            log_target=True,
            reduction="none",
        ).sum(1)
        loss = (1 - weight) * loss + weight * temperature**2 * soft
    return (loss if sample_weight is None else loss * sample_weight).mean()


@torch.no_grad()
def _accuracy(sidenet: SideNet, cache: FeatureCache) -> float:
    sidenet.eval()
    device = next(sidenet.parameters()).device
    predictions = sidenet.classify(cache.features.to(device)).argmax(1).cpu()
    return float((predictions == cache.labels).float().mean())


def train_sidenet(
    sidenet: SideNet,
    cache: FeatureCache,
    *,
    epochs: int = 30,
    lr: float = 2e-3,
    batch_size: int = 256,
    weight_decay: float = 1e-4,
    distill_weight: float = 0.5,
    distill_temperature: float = 2.0,
    seed: int = 0,
    val_cache: FeatureCache | None = None,
    progress: bool = True,
    sample_weight: torch.Tensor | None = None,
) -> list[dict[str, float]]:
    """Train ``sidenet``'s perceptron on cached features with AdamW and a cosine schedule.

    Loss: cross-entropy on the labels, mixed with ``distill_weight`` (0.5: it won on validation in
    ``benchmarks/sidenet_design.py``) of distillation toward the MainNet's logits softened by
    ``distill_temperature``; with ``sample_weight`` (one finite, non-negative weight per cached sample,
    not all zero) each sample's loss is multiplied by its weight (the batch mean of weighted losses; see
    :func:`reach_weights`). Returns one record per epoch with the mean loss and the SideNet's accuracy on
    the cache (and on ``val_cache`` when given).

    A SideNet in float16 or bfloat16 (that of a half-precision MainNet) trains a float32 copy of its
    weights, as mixed-precision training keeps a float32 master copy: AdamW's steps would underflow in
    float16 (its ``eps`` of 1e-8 is zero there) and be rounded away in bfloat16. The SideNet gets the
    rounded weights after every epoch, and the accuracies are those of the SideNet in its own dtype.
    """
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise ValueError(f"epochs and batch_size must be positive and lr > 0, got {epochs}, {batch_size}, {lr}")
    if not 0.0 <= distill_weight <= 1.0 or distill_temperature <= 0:
        raise ValueError("distill_weight must lie in [0, 1] and distill_temperature be positive")
    if cache.mainnet_logits.shape[1] != sidenet.num_classes:
        raise ValueError(
            f"the SideNet predicts {sidenet.num_classes} classes, the cached MainNet logits have "
            f"{cache.mainnet_logits.shape[1]}"
        )
    n = len(cache.features)
    if cache.labels.ndim != 1 or len(cache.labels) != n or len(cache.mainnet_logits) != n:
        raise ValueError(
            f"the cache holds {n} feature rows, MainNet logits of shape {tuple(cache.mainnet_logits.shape)} and "
            f"labels of shape {tuple(cache.labels.shape)}; labels must be 1-D, one per feature row"
        )
    if n == 0:
        raise ValueError("the feature cache is empty")
    if cache.labels.dtype == torch.bool or cache.labels.is_floating_point():
        raise ValueError(f"labels must be integer class indices, got dtype {cache.labels.dtype}")
    if int(cache.labels.max()) >= sidenet.num_classes or int(cache.labels.min()) < 0:
        raise ValueError(f"labels must lie in [0, {sidenet.num_classes - 1}]")
    weights = None if sample_weight is None else _checked_weights(sample_weight, n)
    weight = next(sidenet.parameters())
    device = weight.device
    # The float32 master copy of a half-precision SideNet (float32 and float64 ones train as they are).
    master = sidenet if weight.dtype == torch.promote_types(weight.dtype, torch.float32) else _float32_copy(sidenet)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(master.mlp.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * -(-len(cache) // batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    history = []
    bar = tqdm(range(epochs), desc="Training SideNet", disable=not progress, leave=False)
    for epoch in bar:
        master.train()
        order = torch.randperm(len(cache), generator=generator)
        total = 0.0
        for start in range(0, len(cache), batch_size):
            index = order[start : start + batch_size]
            logits = master.classify(cache.features[index].to(device))
            loss = _loss(
                logits,
                cache.labels[index].to(device),
                cache.mainnet_logits[index].to(device),
                distill_weight,
                distill_temperature,
                None if weights is None else weights[index].to(device),
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss.detach()) * len(index)
        if master is not sidenet:
            _copy_weights(master, sidenet)
        record = {"epoch": epoch + 1, "loss": total / len(cache), "accuracy": _accuracy(sidenet, cache)}
        if val_cache is not None:
            record["val_accuracy"] = _accuracy(sidenet, val_cache)
        history.append(record)
        bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['accuracy']:.3f}")
    sidenet.eval()
    return history


def _float32_copy(sidenet: SideNet) -> SideNet:
    """A float32 copy of ``sidenet`` on its device, to train in place of a half-precision SideNet."""
    return copy.deepcopy(sidenet).float()


@torch.no_grad()
def _copy_weights(source: nn.Module, target: nn.Module) -> None:
    """Copy ``source``'s parameters into ``target``'s, rounded to their dtype (same architecture)."""
    for into, value in zip(target.parameters(), source.parameters(), strict=True):
        into.copy_(value)


def _checked_weights(sample_weight: Any, n: int) -> torch.Tensor:
    """``sample_weight`` as a (n,) float32 CPU tensor, or ``ValueError``."""
    w = torch.as_tensor(sample_weight).detach()
    if w.shape != (n,) or w.dtype == torch.bool or w.is_complex() or not bool(torch.isfinite(w).all()):
        raise ValueError(
            f"sample_weight must be {n} finite real numbers, one per sample; got {w.dtype} {tuple(w.shape)}"
        )
    if bool((w < 0).any()) or not bool((w > 0).any()):
        raise ValueError("sample_weight must be non-negative and not all zero")
    return w.to("cpu", torch.float32)


REACH = ("all", "weighted", "hard")


@torch.no_grad()
def _log_miss(sidenet: SideNet, cache: FeatureCache) -> torch.Tensor:
    """log(1 - max softmax) of ``sidenet`` per cached sample: the log of the other classes' probabilities
    in float64, no cancellation, so confident samples keep distinct weights."""
    sidenet.eval()
    device = next(sidenet.parameters()).device
    chunks = [sidenet.classify(x.to(device)).double().cpu() for x in cache.features.split(4096)]
    log_p = torch.log_softmax(torch.cat(chunks), dim=1)
    top = log_p.argmax(1, keepdim=True)
    return log_p.scatter(1, top, float("-inf")).logsumexp(1)


def reach_weights(earlier: Sequence[tuple[SideNet, FeatureCache]], reach: str, exit_share: float = 0.5) -> torch.Tensor:
    """Per-sample training weights (mean 1) of the SideNet after the trained ``earlier`` ones (each with
    its cache of the same samples in the same order), for ``reach`` ``"weighted"`` or ``"hard"`` (see
    the module docstring); ``"all"`` gives ones."""
    if reach not in REACH:
        raise ValueError(f"reach must be one of {', '.join(REACH)}, got {reach!r}")
    if not 0.0 < exit_share < 1.0:
        raise ValueError(f"exit_share must lie in (0, 1), got {exit_share}")
    n = len(earlier[0][1]) if earlier else 0
    if reach == "all" or not earlier:
        return torch.ones(n)
    misses = [_log_miss(sidenet, cache) for sidenet, cache in earlier]
    if reach == "weighted":
        log_w = torch.stack(misses).sum(0)
        weights = torch.exp(log_w - log_w.max())  # the largest is 1: never all zero
    else:
        reached = torch.ones(n, dtype=torch.bool)
        for log_miss in misses:
            index = reached.nonzero().squeeze(1)
            # The exit_share most confident of those reaching this tap exit (the least miss first).
            exiting = index[torch.argsort(log_miss[index], stable=True)[: int(exit_share * len(index))]]
            reached[exiting] = False
        weights = reached.double()
    return (weights * (n / weights.sum())).float()


def fit_sidenet(
    model: AdaptiveModel,
    loader: Iterable,
    *,
    val_loader: Iterable | None = None,
    progress: bool = True,
    reach: str = "all",
    exit_share: float = 0.5,
    **options: float | int,
) -> list[dict[str, float]]:
    """Cache features of ``loader`` (and ``val_loader``) through the frozen MainNet, then train the
    SideNets of ``model`` in tap order, each later one weighted by ``reach`` (:func:`reach_weights`; one
    SideNet ignores it); options are those of :func:`train_sidenet`. A cascade's records name the tap
    index (``"tap"``); a weighted SideNet's also give ``effective_share``, (sum w)^2 / (n sum w^2)."""
    reach_weights([], reach, exit_share)  # a bad option fails before the MainNet runs
    # The cache's order does not matter (training shuffles it), so sentences go in length-sorted batches.
    caches = cache_tap_features(model, length_grouped(loader), progress=progress)
    val_caches: Sequence[FeatureCache | None] = [None] * len(caches)
    if val_loader is not None:
        val_caches = cache_tap_features(model, length_grouped(val_loader), progress, "Caching validation features")
    history: list[dict[str, float]] = []
    for k, (sidenet, cache, val_cache) in enumerate(zip(model.sidenets, caches, val_caches, strict=True)):
        earlier = list(zip(model.sidenets[:k], caches[:k], strict=True))
        weights = reach_weights(earlier, reach, exit_share) if k and reach != "all" else None
        records = train_sidenet(
            sidenet, cache, val_cache=val_cache, progress=progress, sample_weight=weights, **options
        )
        extra: dict[str, float] = {"tap": k}
        if weights is not None:  # the share of the cache that the weights keep
            extra["effective_share"] = float(weights.mean() ** 2 / weights.square().mean())
        # A cascade's records name the tap of the SideNet they trained; one SideNet's stay as they were.
        history += records if len(caches) == 1 else [{**extra, **record} for record in records]
    model.eval()
    return history
