"""Training a cascade's later SideNets on the samples that reach them (issue 14, item 3): ``fit(reach=...)``
with ``"all"`` (every SideNet on every training sample), ``"weighted"`` (each sample weighted by the
chance that it reaches the tap under the earlier SideNets) and ``"hard"`` (only the samples the earlier
SideNets would not exit, each exiting ``--exit-share`` of what reaches it); see ``sidenet.training``. One
more variant, ``"ztw"`` (Zero Time Waste, Wołczyk et al. 2021, cascade connections without their ensemble;
issue 14, item 1), is no ``reach`` of ``fit``: SideNet k >= 1 reads its tap's pooled features followed by
the detached logits of SideNets 0..k-1 (its own variant's, in tap order), trained as ``"all"``; its first
linear layer's k*C extra inputs cost 2*k*C*hidden FLOPs per sample, added to its ``side_flops``. A chosen
cascade that skips an earlier SideNet still runs it for the samples that reach a later one (its logits are
read there), so the ztw figures charge each kept SideNet with the skipped ones before it.

Fashion-MNIST (the shipped ResNet-20; candidate taps stem, layer1.0, layer1 with pooling 7x7 and
layer2.0 with 4x4, as the fmnist step's cascade; chosen on the 5,000 validation images, reported on the
test images) and SST-2 (all-MiniLM-L6-v2 fine-tuned; candidate taps 1 to 5, mean features, hidden 256;
chosen on the validation split held out of train; dev reported by two-fold cross-fitting, as
benchmarks/cascade.py). Per task, one pass of the MainNet caches every tap's SideNet inputs for a training
subset (``sidenet.cache_tap_features``), and for each scoring part one more caches them beside the part's
``sidenet.collect_cascade`` record (its per-sample segment and SideNet FLOPs, the MainNet's answers): a
trained cascade's record is that record with its SideNets' scores on the cached features, so no variant
runs the MainNet again (the first variant's record is checked against a real ``collect_cascade`` pass).

Per seed, the candidate SideNets start from the same initialisation in every variant; the first is
trained once and shared (``reach`` leaves it alone), the later ones are trained in tap order with
``sidenet.training.reach_weights`` as ``fit`` does. Every variant's cascade is then chosen by
``sidenet.choose_taps`` under the steps' rule (Fashion-MNIST at most 0.5 points below the MainNet,
SST-2 at most 1% disagreement with it). Reported per variant: the chosen taps and thresholds, the
validation point the choice is made at, a two-fold cross-fitted figure on validation (choice on one half,
reported on the other), the held-out figures (FLOPs fraction including the SideNets, drop, exit rate)
and the cascade's oracle; each SideNet's FLOPs share (equal across the ``reach`` variants: same SideNets;
ztw's later ones pay for their extra inputs). No timing.

Run: ``python -m benchmarks.cascade_training [--quick]``; writes ``cascade_training.json``. Long because
it holds the whole comparison in one step module, as the other steps hold theirs: caching, records from
the cache and their check, training the variants (ztw's inputs and costs included), the choices and
their summary (BENCHMARKS.md's section: benchmarks/sections_cascade_training.py).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

import sidenet
from benchmarks.harness import RULES, benchmark_parser, command, machine, parse_options, run_and_write, torch_threads
from sidenet import AdaptiveModel, CascadeRecord, FeatureCache, SideNet
from sidenet.data import TextCollator, fashion_mnist_datasets, make_loader, sst2_datasets
from sidenet.loaders import length_grouped
from sidenet.pretrain import PretrainRecipe, pretrain_fmnist_resnet
from sidenet.text_pretrain import TextRecipe, finetune_text_mainnet
from sidenet.training import REACH, cache_tap_features, reach_weights

VARIANTS = (*REACH, "ztw")  # the reaches of ``fit`` and the Zero-Time-Waste cascade connections

NAME = "cascade_training"
FMNIST_TAPS = {"stem": 7, "layer1.0": 7, "layer1": 7, "layer2.0": 4}  # tap -> pooling grid
SST2_TAPS = (1, 2, 3, 4, 5)
QUICK = {
    "fmnist_taps": ["stem", "layer1.0"],
    "sst2_taps": [1, 3],
    "fmnist_train": 1000,
    "sst2_train": 1000,
    "eval_limit": 400,
    "fmnist_epochs": 3,
    "sst2_epochs": 3,
    "seeds": 1,
}
SETTINGS = (
    "tasks",
    "reaches",
    "exit_share",
    "fmnist_taps",
    "sst2_taps",
    "fmnist_train",
    "sst2_train",
    "eval_limit",
    "fmnist_epochs",
    "sst2_epochs",
    "seeds",
    "threads",
)


@dataclass
class Part:
    """A scoring part: its ``collect_cascade`` record (untrained SideNets) and its cached tap features."""

    record: CascadeRecord
    features: list[FeatureCache]
    loader: Any


@dataclass
class Workload:
    """A task's candidate cascade (fresh SideNets per seed), its caches and its rule."""

    name: str
    cascade: AdaptiveModel  # the candidate splits with untrained SideNets (seed 0)
    fresh: Any  # seed -> list of fresh SideNets, one per candidate tap
    train: list[FeatureCache]
    parts: dict[str, Part]  # "val" and the held-out parts ("test", or "dev0" and "dev1")
    rule: dict[str, float]
    held_out: str  # "test" (at the validation choice) or "dev" (two-fold cross-fitted)
    epochs: int
    meta: dict[str, Any]


def cascade_of(models: Sequence[AdaptiveModel]) -> AdaptiveModel:
    """One cascade of single-SideNet models on one MainNet (taps in order), sharing their parts."""
    return AdaptiveModel([m.split for m in models], [m.sidenet for m in models], config=[m.config for m in models])


def make_part(cascade: AdaptiveModel, loader: Any) -> Part:
    """The record and the tap features of ``loader`` (same batches, same order)."""
    record = sidenet.collect_cascade(cascade, loader, progress=False)
    return Part(record, cache_tap_features(cascade, loader, progress=False), loader)


@torch.no_grad()
def scored(part: Part, heads: Sequence[SideNet], cascade: AdaptiveModel) -> CascadeRecord:
    """``part``'s record with ``heads`` in place of the SideNets it was collected with (their scores under
    the cascade's exit rules, read from the cached features)."""
    confidence, predictions = [], []
    for head, cache, rule in zip(heads, part.features, cascade.policies, strict=True):
        head.eval()
        logits = head.classify(cache.features).float()
        confidence.append(rule.confidence(logits).numpy().astype(np.float64))
        predictions.append(logits.argmax(1).numpy())
    return dataclasses.replace(
        part.record, confidence=np.stack(confidence, 1), side_predictions=np.stack(predictions, 1)
    )


def check_scored(work: Workload, heads: Sequence[SideNet]) -> dict[str, float]:
    """The validation record built from the cache against a real ``collect_cascade`` pass of the
    cascade with ``heads``: they must agree (else the comparison would be of the wrong thing)."""
    model = AdaptiveModel(work.cascade.splits, list(heads), config=list(work.cascade.configs)).eval()
    real = sidenet.collect_cascade(model, work.parts["val"].loader, progress=False)
    cached = scored(work.parts["val"], heads, work.cascade)
    difference = float(np.abs(real.confidence - cached.confidence).max())
    mismatch = float((real.side_predictions != cached.side_predictions).mean())
    if difference > 1e-4 or mismatch > 1e-3:
        raise RuntimeError(f"the cached record differs from collect_cascade: {difference:.2e} / {mismatch:.4f}")
    return {"max_confidence_difference": difference, "prediction_mismatch": mismatch}


def with_skipped(record: CascadeRecord, columns: Sequence[int]) -> CascadeRecord:
    """``record`` restricted to ``columns``, each kept SideNet also paying for the skipped SideNets since
    the previous kept one: a ztw SideNet reads all the earlier SideNets' logits, so a sample that reaches
    it needs them all, and the ones before the previous kept SideNet were paid for there."""
    starts = [0, *(c + 1 for c in columns[:-1])]
    side = np.stack([record.side_flops[:, s : c + 1].sum(1) for s, c in zip(starts, columns, strict=True)], 1)
    return dataclasses.replace(record.restrict(columns), side_flops=side)


def outcome(record: CascadeRecord, choice: sidenet.CascadeChoice, charge: bool = False) -> dict[str, float]:
    """What ``choice`` (taps and thresholds) gives on ``record``, with the totals for pooling; with
    ``charge``, the skipped SideNets that kept ones read are paid for (``with_skipped``)."""
    n = len(record)
    main = float(record.main_correct.mean())
    if not choice.columns:  # the MainNet alone
        point = {"accuracy": main, "exit_rate": 0.0, "mean_flops": float(record.mainnet_flops.mean())}
    else:
        restrict = with_skipped if charge else CascadeRecord.restrict
        point = sidenet.CascadeCurve(restrict(record, choice.columns), [choice.thresholds]).at(choice.thresholds)
    return {
        "samples": n,
        "correct": point["accuracy"] * n,
        "mainnet_correct": main * n,
        "exits": point["exit_rate"] * n,
        "flops": point["mean_flops"] * n,
        "mainnet_flops": float(record.mainnet_flops.sum()),
    }


def pooled(
    folds: Sequence[tuple[CascadeRecord, CascadeRecord]], rule: dict[str, float], charge: bool = False
) -> dict[str, Any]:
    """Each fold's cascade chosen on its first record and reported on its second, pooled by sample count
    (``charge``: as ``outcome``)."""
    choices = [sidenet.choose_taps(choose, **rule) for choose, _ in folds]
    parts = [outcome(report, c, charge) for (_, report), c in zip(folds, choices, strict=True)]
    total = {key: sum(p[key] for p in parts) for key in parts[0]}
    accuracy = total["correct"] / total["samples"]
    return {
        "taps": [[str(t) for t in c.taps] for c in choices],
        "accuracy": accuracy,
        "accuracy_drop": total["mainnet_correct"] / total["samples"] - accuracy,
        "exit_rate": total["exits"] / total["samples"],
        "flops_fraction": total["flops"] / total["mainnet_flops"],
    }


def halves(record: CascadeRecord, seed: int = 0) -> list[CascadeRecord]:
    """Two random halves of ``record`` (``randperm`` seeded ``seed``), as the SST-2 step cuts dev."""
    order = torch.randperm(len(record), generator=torch.Generator().manual_seed(seed)).chunk(2)
    return [record.subset(np.sort(h.numpy())) for h in order]


def evaluate(work: Workload, heads: Sequence[SideNet], charge: bool = False) -> dict[str, Any]:
    """The cascade of ``heads``: chosen on validation; the validation and held-out figures (``charge``:
    the skipped SideNets that kept ones read are paid for, as ``outcome``)."""
    val = scored(work.parts["val"], heads, work.cascade)
    choice = sidenet.choose_taps(val, **work.rule)
    point = dict(choice.point)
    chosen_fraction = point["relative_compute"]
    if charge:  # the choice is made on the record's costs; the figure is what the chosen cascade costs
        paid = outcome(val, choice, charge=True)
        point["relative_compute"] = paid["flops"] / paid["mainnet_flops"]
    a, b = halves(val)
    if work.held_out == "test":
        reporting = [scored(work.parts["test"], heads, work.cascade)]
        held = pooled([(val, reporting[0])], work.rule, charge)
    else:
        dev = [scored(work.parts[f"dev{i}"], heads, work.cascade) for i in range(2)]
        held = pooled([(dev[0], dev[1]), (dev[1], dev[0])], work.rule, charge)
        reporting = dev
    oracle = [sidenet.CascadeCurve(r, [(sidenet.NEVER_EXIT,) * r.num_taps]).oracle() for r in reporting]
    n = np.array([len(r) for r in reporting], dtype=float)
    return {
        "per_tap": [
            {
                "tap": str(tap),
                "val_sidenet_accuracy": float(val.side_correct[:, k].mean()),
                "val_agreement": float(val.agree[:, k].mean()),
            }
            for k, tap in enumerate(work.cascade.taps)
        ],
        "val": {
            "taps": [str(t) for t in choice.taps],
            "thresholds": list(choice.thresholds),
            "family": choice.family,
            "flops_fraction": point["relative_compute"],
            "flops_fraction_without_skipped": chosen_fraction,
            "accuracy_drop": point["accuracy_drop"],
            "disagreement": point["disagreement"],
            "exit_rate": point["exit_rate"],
        },
        "val_crossfit": pooled([(a, b), (b, a)], work.rule, charge),
        "held_out": {
            **held,
            "oracle_flops_fraction": float(np.dot(n, [o["relative_compute"] for o in oracle]) / n.sum()),
        },
    }


@torch.no_grad()
def logits_of(head: SideNet, features: torch.Tensor) -> torch.Tensor:
    """``head``'s float32 logits on pooled ``features``, detached (evaluation mode)."""
    head.eval()
    return head.classify(features).float()


def with_logits(cache: FeatureCache, logits: Sequence[torch.Tensor]) -> FeatureCache:
    """``cache`` whose features are followed by ``logits`` (the earlier SideNets', in tap order)."""
    return dataclasses.replace(cache, features=torch.cat([cache.features.float(), *logits], 1))


def train_ztw(work: Workload, fresh: Sequence[SideNet], seed: int, options: dict[str, Any]) -> list[SideNet]:
    """The ztw variant's SideNets: the trained first one (shared), then each later SideNet k a new
    perceptron of the same hidden width over the pooled features and the k earlier SideNets' logits,
    trained in tap order as ``"all"`` (seeded as ``attach`` seeds SideNet k)."""
    heads = [fresh[0]]
    logits = [logits_of(fresh[0], work.train[0].features)]
    for k in range(1, len(fresh)):
        cache = with_logits(work.train[k], logits)
        torch.manual_seed(1000 * seed + k)
        head = SideNet((cache.features.shape[1],), fresh[k].num_classes, hidden=fresh[k].hidden)
        sidenet.train_sidenet(head, cache, **options)
        heads.append(head)
        logits.append(logits_of(head, cache.features))
    return heads


def ztw_part(part: Part, heads: Sequence[SideNet]) -> Part:
    """``part`` as the ztw SideNets read it (each tap's features followed by the earlier SideNets' logits)
    and pay for it (SideNet k's first layer has k*C more inputs: 2*k*C*hidden more FLOPs per sample)."""
    features: list[FeatureCache] = []
    logits: list[torch.Tensor] = []
    for head, cache in zip(heads, part.features, strict=True):
        features.append(with_logits(cache, logits) if logits else cache)
        logits.append(logits_of(head, features[-1].features))
    side = part.record.side_flops.copy()
    for k, head in enumerate(heads):
        side[:, k] += 2 * k * head.num_classes * head.hidden
    return Part(dataclasses.replace(part.record, side_flops=side), features, part.loader)


def train_variants(work: Workload, seed: int, reaches: Sequence[str], exit_share: float) -> list[dict[str, Any]]:
    """Every ``reach`` variant at ``seed``: the same initialisation, the first SideNet trained once."""
    fresh = work.fresh(seed)
    options = {"epochs": work.epochs, "seed": seed, "progress": False}
    started = time.perf_counter()
    sidenet.train_sidenet(fresh[0], work.train[0], **options)
    first_seconds = time.perf_counter() - started
    rows = []
    for reach in reaches:
        started = time.perf_counter()
        shares: list[float | None] = [None] * len(fresh)
        scoring = work
        if reach == "ztw":
            heads = train_ztw(work, fresh, seed, options)
            scoring = dataclasses.replace(work, parts={k: ztw_part(p, heads) for k, p in work.parts.items()})
        else:
            heads = [fresh[0]] + [copy.deepcopy(h) for h in fresh[1:]]
            for k in range(1, len(heads)):
                weights = None
                if reach != "all":
                    weights = reach_weights(list(zip(heads[:k], work.train[:k], strict=True)), reach, exit_share)
                    shares[k] = float(weights.mean() ** 2 / weights.square().mean())
                sidenet.train_sidenet(heads[k], work.train[k], sample_weight=weights, **options)
        seconds = first_seconds + time.perf_counter() - started
        row = {"seed": seed, "reach": reach, "train_seconds": seconds, "effective_share": shares}
        if seed == 0 and reach == reaches[0] and reach != "ztw":  # collect_cascade cannot run ztw's SideNets
            row["cache_check"] = check_scored(work, heads)
        row.update(evaluate(scoring, heads, charge=reach == "ztw"))
        v, h = row["val"], row["held_out"]
        print(
            f"{work.name} seed {seed} {reach:>8}: val taps {v['taps']} FLOPs {v['flops_fraction']:.4f} "
            f"(cross-fit {row['val_crossfit']['flops_fraction']:.4f}, drop "
            f"{100 * row['val_crossfit']['accuracy_drop']:+.2f} pt) | {work.held_out} FLOPs {h['flops_fraction']:.4f} "
            f"drop {100 * h['accuracy_drop']:+.2f} pt exit {h['exit_rate']:.3f} ({seconds:.0f} s)",
            flush=True,
        )
        rows.append(row)
    return rows


def summarise(rows: list[dict[str, Any]], reaches: Sequence[str]) -> dict[str, Any]:
    """Per variant, the figures averaged over seeds; the ``reach`` with the least mean validation FLOPs
    (ztw is no ``reach``: it is compared with ``"all"``, the default, on its own)."""
    by_reach = {}
    for reach in reaches:
        runs = [r for r in rows if r["reach"] == reach]

        def mean(part: str, key: str, runs: list[dict[str, Any]] = runs) -> float:
            return float(np.mean([r[part][key] for r in runs]))

        by_reach[reach] = {
            "seeds": len(runs),
            "val_flops_fraction": mean("val", "flops_fraction"),
            "val_flops_fraction_spread": float(np.ptp([r["val"]["flops_fraction"] for r in runs])),
            "val_crossfit_flops_fraction": mean("val_crossfit", "flops_fraction"),
            "val_crossfit_accuracy_drop": mean("val_crossfit", "accuracy_drop"),
            "held_out_flops_fraction": mean("held_out", "flops_fraction"),
            "held_out_accuracy_drop": mean("held_out", "accuracy_drop"),
            "held_out_exit_rate": mean("held_out", "exit_rate"),
            "held_out_oracle_flops_fraction": mean("held_out", "oracle_flops_fraction"),
            "held_out_flops_fraction_spread": float(np.ptp([r["held_out"]["flops_fraction"] for r in runs])),
        }
    reaches_run = [r for r in by_reach if r in REACH]
    winner = min(reaches_run, key=lambda r: by_reach[r]["val_flops_fraction"]) if reaches_run else None
    summary: dict[str, Any] = {"by_reach": by_reach, "winner_on_val": winner}
    if "ztw" in by_reach and "all" in by_reach:
        ztw, all_ = by_reach["ztw"], by_reach["all"]
        summary["ztw_minus_all"] = {
            key: ztw[key] - all_[key]
            for key in ("val_flops_fraction", "val_crossfit_flops_fraction", "held_out_flops_fraction")
        }
    return summary


def image_workload(
    name: str,
    mainnet: torch.nn.Module,
    taps: dict[str, int],
    datasets: dict[str, TensorDataset],
    rule: dict[str, float],
    epochs: int,
) -> Workload:
    """An image MainNet with SideNets at ``taps`` (tap -> pooling grid): ``datasets`` "train" cached,
    "val" and "test" scored."""
    shape = tuple(datasets["val"].tensors[0].shape[1:])

    def fresh(seed: int) -> list[AdaptiveModel]:
        return [
            sidenet.attach(mainnet, tap, input_shape=shape, pool_size=pool, seed=1000 * seed + k)
            for k, (tap, pool) in enumerate(taps.items())
        ]

    cascade = cascade_of(fresh(0)).eval()
    train = cache_tap_features(cascade, make_loader(datasets["train"], 256), progress=False)
    parts = {part: make_part(cascade, make_loader(datasets[part], 256)) for part in ("val", "test")}
    sizes = {"train": len(train[0]), **{k: len(p.record) for k, p in parts.items()}}
    meta = {"taps": list(taps), "pools": dict(taps), "sizes": sizes}
    return Workload(
        name, cascade, lambda seed: [m.sidenet for m in fresh(seed)], train, parts, rule, "test", epochs, meta
    )


def fmnist_workload(args: argparse.Namespace) -> Workload:
    """The shipped ResNet-20 with SideNets at the candidate taps; a training subset, val and test."""
    mainnet, _ = pretrain_fmnist_resnet(PretrainRecipe(), data_dir=args.fmnist_data)
    data = fashion_mnist_datasets(args.fmnist_data)
    limits = {"train": args.fmnist_train, "val": args.eval_limit, "test": args.eval_limit}
    datasets = {part: TensorDataset(*(t[:n] for t in data[part].tensors)) for part, n in limits.items()}
    taps = {tap: FMNIST_TAPS[tap] for tap in args.fmnist_taps}
    return image_workload("fmnist", mainnet, taps, datasets, RULES["fmnist"], args.fmnist_epochs)


def sst2_workload(args: argparse.Namespace) -> Workload:
    """all-MiniLM-L6-v2 with SideNets (mean features, hidden 256) at the candidate layers; a training
    subset cached in length-sorted batches, val and the two dev halves in batches of 32 as the step."""
    recipe = TextRecipe()
    mainnet, tokenizer, _ = finetune_text_mainnet(recipe, data_dir=args.sst2_data)
    mainnet.eval()
    collate = TextCollator(tokenizer, recipe.max_length)
    data = sst2_datasets(args.sst2_data)

    def fresh(seed: int) -> list[AdaptiveModel]:
        return [
            sidenet.attach(mainnet, tap, split_options={"features": "mean"}, hidden=256, seed=1000 * seed + k)
            for k, tap in enumerate(args.sst2_taps)
        ]

    cascade = cascade_of(fresh(0)).eval()
    train_set = data["train"].subset(range(min(args.sst2_train or len(data["train"]), len(data["train"]))))
    loader = length_grouped(make_loader(train_set, 64, collate_fn=collate))
    train = cache_tap_features(cascade, loader, progress=False)
    val = data["val"].subset(range(min(args.eval_limit or len(data["val"]), len(data["val"]))))
    dev = data["test"].subset(range(min(args.eval_limit or len(data["test"]), len(data["test"]))))
    cut = torch.randperm(len(dev), generator=torch.Generator().manual_seed(0)).chunk(2)
    loaders = {"val": make_loader(val, 32, collate_fn=collate)}
    for i, half in enumerate(cut):
        loaders[f"dev{i}"] = make_loader(dev.subset(sorted(half.tolist())), 32, collate_fn=collate)
    parts = {name: make_part(cascade, loader) for name, loader in loaders.items()}
    sizes = {"train": len(train[0]), "val": len(val), "dev": len(dev)}
    meta = {"taps": list(args.sst2_taps), "features": "mean", "hidden": 256, "sizes": sizes}
    return Workload(
        "sst2",
        cascade,
        lambda seed: [m.sidenet for m in fresh(seed)],
        train,
        parts,
        RULES["sst2"],
        "dev",
        args.sst2_epochs,
        meta,
    )


WORKLOADS = {"fmnist": fmnist_workload, "sst2": sst2_workload}


def options(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """This step's options from ``argv`` (the command line when None)."""
    parser = benchmark_parser(__doc__)
    parser.add_argument("--tasks", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument("--reaches", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--exit-share", type=float, default=0.5, help="the hard variant's exit share per SideNet")
    parser.add_argument("--fmnist-data", default=None, help="folder of the Fashion-MNIST files")
    parser.add_argument("--fmnist-taps", nargs="+", choices=list(FMNIST_TAPS), default=list(FMNIST_TAPS))
    parser.add_argument("--sst2-taps", nargs="+", type=int, default=list(SST2_TAPS))
    parser.add_argument("--fmnist-train", type=int, default=20_000, help="training images the SideNets learn from")
    parser.add_argument("--sst2-train", type=int, default=20_000, help="training phrases the SideNets learn from")
    parser.add_argument("--eval-limit", type=int, default=None, help="the first samples of val and held-out only")
    parser.add_argument("--fmnist-epochs", type=int, default=30, help="as the fmnist step")
    parser.add_argument("--sst2-epochs", type=int, default=20, help="as the SST-2 step")
    parser.add_argument("--seeds", type=int, default=2, help="initialisation and shuffling seeds per variant")
    parser.add_argument("--threads", type=int, default=2, help="torch threads during the study (no timing here)")
    return parse_options(parser, argv, QUICK)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every task's variants at every seed; the result."""
    started = time.perf_counter()
    tasks = {}
    with torch_threads(args.threads):
        for name in args.tasks:
            begun = time.perf_counter()
            torch.manual_seed(0)
            work = WORKLOADS[name](args)
            cached = time.perf_counter() - begun
            print(f"{name}: cached the tap features in {cached:.0f} s", flush=True)
            rows = [
                row for seed in range(args.seeds) for row in train_variants(work, seed, args.reaches, args.exit_share)
            ]
            record = work.parts["val"].record
            shares = record.side_flops.mean(0) / record.mainnet_flops.mean()
            tasks[name] = {
                **work.meta,
                "rule": work.rule,
                "held_out": work.held_out,
                "epochs": work.epochs,
                "mainnet_flops": float(record.mainnet_flops.mean()),
                "sidenet_flops_share": {str(t): float(s) for t, s in zip(work.cascade.taps, shares, strict=True)},
                "ztw_extra_flops_share": {
                    str(t): 2 * k * h.num_classes * h.hidden / float(record.mainnet_flops.mean())
                    for k, (t, h) in enumerate(zip(work.cascade.taps, work.cascade.sidenets, strict=True))
                },
                "cache_seconds": cached,
                "seconds": time.perf_counter() - begun,
                "rows": rows,
                "summary": summarise(rows, args.reaches),
            }
            del work
    winners = {name: t["summary"]["winner_on_val"] for name, t in tasks.items()}
    return {
        "workload": NAME,
        "command": command(NAME, args),
        "machine": machine(),
        "quick": bool(args.quick),
        "settings": {k: getattr(args, k) for k in SETTINGS},
        "tasks": tasks,
        # The library default changes only if one variant has the least validation FLOPs on every task.
        "winner_on_val": next(iter(winners.values())) if len(set(winners.values())) == 1 else None,
        "winners_by_task": winners,
        "seconds": time.perf_counter() - started,
    }


def main(argv: Sequence[str] | None = None) -> None:
    run_and_write(NAME, run, options(argv))


if __name__ == "__main__":
    main()
