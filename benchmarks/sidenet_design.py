"""Better single SideNets (issue 14, item 3): hidden width, pooling grid and distillation weight of one
SideNet at the benchmarks' taps, compared on validation at (roughly) equal SideNet cost. A study: it
changes no library default, it gives the evidence for choosing them.

Fashion-MNIST (the shipped ResNet-20, tap ``layer1.0``) and SST-2 (all-MiniLM-L6-v2, tap 3, the default
``both`` features): one pass of the MainNet (``sidenet.cache_features``) caches the tap features, the
MainNet's logits and the labels of a training subset, of the validation split (held out of train) and of
the held-out split (Fashion-MNIST test, SST-2 dev). Fashion-MNIST caches the whole 16x28x28 map and pools
it to each grid afterwards with the SideNet's own pooling. Each configuration's SideNet then trains on the
cache (``sidenet.train_sidenet``) and is put in an ``AdaptiveModel``; its trade-off curve is a
``TradeoffCurve`` of a ``SweepRecord`` built from the cache: confidences under the model's exit rule, and
the per-sample FLOPs ``sidenet.sweep`` counts (vision: the same for every image; text: each sentence at its
own length, as at batch 1, where the benchmarks' batch-32 sweeps add padding). No configuration runs the
MainNet again (tests/test_benchmark_design.py checks the curve against ``sidenet.sweep``).

Thresholds follow the benchmarks (``harness.RULES``): Fashion-MNIST at most 0.5 points below the MainNet on
validation, SST-2 at most 1% of the sentences exiting with another answer than the MainNet's. Configurations
are chosen on validation only; Fashion-MNIST test at the validation threshold and SST-2 dev cross-fitted on
two halves (as the SST-2 benchmark) are reported beside them as held-out checks.

Stages per task: (1) a grid at seed 0 (vision: pool x hidden without distillation; text: hidden x
distillation weight); (2) vision: the other distillation weights at the default and at stage 1's best;
(3) more seeds for the default and the best few. The winner has the least mean validation FLOPs fraction
among the configurations run with every seed.

Run: ``python -m benchmarks.sidenet_design [--quick]``. Needs no other step (the SST-2 MainNet is
fine-tuned first if not cached). Writes ``sidenet_design.json``; no timing is measured. Long because it
holds the whole study in one step module, as the other benchmark steps hold theirs: caching, curves
from the cache, the stages and their summary (BENCHMARKS.md's section: benchmarks/sections_design.py).
"""

from __future__ import annotations

import argparse
import inspect
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

import sidenet
from benchmarks.harness import RULES, benchmark_parser, command, machine, parse_options, run_and_write, torch_threads
from sidenet import AdaptiveModel, FeatureCache, SideNet, SweepRecord, TradeoffCurve
from sidenet.data import TextCollator, TextDataset, fashion_mnist_datasets, make_loader, sst2_datasets
from sidenet.loaders import length_grouped
from sidenet.pretrain import PretrainRecipe, pretrain_fmnist_resnet
from sidenet.text_pretrain import TextRecipe, finetune_text_mainnet

NAME = "sidenet_design"
TAPS = {"fmnist": "layer1.0", "sst2": 3}
# Today's defaults, read from the library so that the JSON records what was compared against.
DEFAULTS = {
    "hidden": inspect.signature(SideNet).parameters["hidden"].default,
    "pool_size": inspect.signature(SideNet).parameters["pool_size"].default,
    "distill_weight": inspect.signature(sidenet.train_sidenet).parameters["distill_weight"].default,
    "epochs": inspect.signature(sidenet.train_sidenet).parameters["epochs"].default,
}
QUICK = {
    "fmnist_train": 1000,
    "sst2_train": 1000,
    "eval_limit": 400,
    "fmnist_epochs": 3,
    "sst2_epochs": 3,
    "hidden": [64, 256],
    "pools": [1, 7],
    "distill": [0.0, 1.0],
    "seeds": 1,
    "top": 1,
}

# The options recorded in the result.
SETTINGS = (
    "fmnist_train",
    "sst2_train",
    "eval_limit",
    "fmnist_epochs",
    "sst2_epochs",
    "hidden",
    "pools",
    "distill",
    "max_share",
    "seeds",
    "top",
    "threads",
)
Key = tuple[int | None, int, float]  # (pool, hidden, distillation weight); pool None for vector taps


@dataclass
class SampleFlops:
    """The FLOPs ``sidenet.sweep`` charges each sample of a part for the MainNet's trunk and rest."""

    trunk: np.ndarray
    rest: np.ndarray


@dataclass
class Workload:
    """A task's MainNet split, its feature caches per pooling grid, its per-sample FLOPs and rules."""

    name: str
    split: sidenet.MainNetSplit
    example: Any  # one input sample, for the SideNet's FLOP profile
    feature_shape: tuple[int, ...]
    num_classes: int
    caches: dict[int | None, dict[str, FeatureCache]]  # grid (None: vector features) -> part -> cache
    flops: dict[str, SampleFlops]  # "val" and the held-out part
    rule: dict[str, float]
    held_out: str  # "test" (at the validation threshold) or "dev" (two-fold cross-fitted)
    epochs: int
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def conv(self) -> bool:
        return len(self.feature_shape) == 3

    @property
    def mainnet_flops(self) -> float:
        """The MainNet's mean FLOPs per validation sample."""
        return float((self.flops["val"].trunk + self.flops["val"].rest).mean())


def pool_features(
    cache: FeatureCache, feature_shape: Sequence[int], num_classes: int, pool: int | None
) -> FeatureCache:
    """``cache`` (whole maps, flattened) pooled to a ``pool`` x ``pool`` grid by a SideNet's own pooling;
    vector features come back as they are."""
    if pool is None or len(feature_shape) != 3:
        return cache
    pooler = SideNet(feature_shape, num_classes, hidden=1, pool_size=pool)
    with torch.no_grad():
        chunks = [pooler.pooled(x.view(-1, *feature_shape)) for x in cache.features.split(2048)]
    return FeatureCache(torch.cat(chunks), cache.mainnet_logits, cache.labels)


def join(caches: Sequence[FeatureCache]) -> FeatureCache:
    """Consecutive caches as one."""
    return FeatureCache(*(torch.cat([getattr(c, f) for c in caches]) for f in ("features", "mainnet_logits", "labels")))


def design_curve(model: AdaptiveModel, cache: FeatureCache, part: SampleFlops, side_flops: float) -> TradeoffCurve:
    """The trade-off curve ``sidenet.sweep`` would give for ``model`` on this part, from its cache;
    ``side_flops``: the SideNet's FLOPs per sample (``model.flop_profile(one_sample).side``)."""
    with torch.no_grad():
        logits = model.sidenet.classify(cache.features).float()
    rule = model.policy
    side, main = logits.argmax(1).numpy(), cache.mainnet_logits.argmax(1).numpy()
    labels = cache.labels.numpy()
    record = SweepRecord(
        confidence=rule.confidence(logits).numpy().astype(np.float64),
        side_correct=side == labels,
        main_correct=main == labels,
        agree=side == main,
        trunk_side_flops=part.trunk + side_flops,
        rest_flops=part.rest,
        mainnet_flops=part.trunk + part.rest,
        side_logits=logits.numpy(),
        main_logits=cache.mainnet_logits.numpy(),
        labels=labels.astype(np.int64),
        exit_rule=rule,
    )
    return TradeoffCurve(record)


def point(curve: TradeoffCurve, threshold: float) -> dict[str, float]:
    """The operating point at ``threshold`` with the FLOPs fraction named as in the benchmarks."""
    p = curve.at(threshold)
    return {
        "threshold": p["threshold"] if math.isfinite(p["threshold"]) else None,
        "accuracy": p["accuracy"],
        "accuracy_drop": p["accuracy_drop"],
        "exit_rate": p["exit_rate"],
        "disagreement": p["disagreement"],
        "flops_fraction": p["relative_compute"],
    }


def crossfit(curve: TradeoffCurve, rule: dict[str, float], seed: int = 0) -> dict[str, float]:
    """Two-fold cross-fitting as the SST-2 benchmark: the threshold chosen by ``rule`` on one random half
    (``randperm`` seeded ``seed``), reported on the other; the two reports pooled by sample count."""
    halves = torch.randperm(curve.num_samples, generator=torch.Generator().manual_seed(seed)).chunk(2)
    curves = [TradeoffCurve(curve.record.subset(np.sort(h.numpy()))) for h in halves]
    reports = [(curves[1 - i], curves[i].threshold_for(**rule)) for i in range(2)]
    n = np.array([c.num_samples for c, _ in reports], dtype=float)
    acc = float(np.dot(n, [c.at(t)["accuracy"] for c, t in reports]) / n.sum())
    main = float(np.dot(n, [c.mainnet_accuracy for c, _ in reports]) / n.sum())
    flops = float(np.dot(n, [c.at(t)["mean_flops"] for c, t in reports]))
    return {
        "accuracy": acc,
        "accuracy_drop": main - acc,
        "exit_rate": float(np.dot(n, [c.at(t)["exit_rate"] for c, t in reports]) / n.sum()),
        "flops_fraction": flops / float(np.dot(n, [c.mainnet_flops for c, _ in reports])),
    }


def make_model(work: Workload, key: Key, seed: int) -> AdaptiveModel:
    """A fresh SideNet of ``key`` (initialised from ``seed``) on the task's split, in an ``AdaptiveModel``."""
    pool, hidden, _ = key
    torch.manual_seed(seed)
    head = SideNet(work.feature_shape, work.num_classes, hidden=hidden, pool_size=pool or DEFAULTS["pool_size"])
    return AdaptiveModel(work.split, head)


def evaluate(work: Workload, key: Key, seed: int) -> dict[str, Any]:
    """Train the SideNet of ``key`` with ``seed`` on the training cache; its validation and held-out figures."""
    pool, hidden, distill = key
    caches = work.caches[pool]
    model = make_model(work, key, seed)
    started = time.perf_counter()
    history = sidenet.train_sidenet(
        model.sidenet, caches["train"], epochs=work.epochs, distill_weight=distill, seed=seed, progress=False
    )
    seconds = time.perf_counter() - started
    side_flops = float(model.flop_profile(work.example).side)
    val = design_curve(model, caches["val"], work.flops["val"], side_flops)
    threshold = val.threshold_for(**work.rule)
    held = design_curve(model, caches[work.held_out], work.flops[work.held_out], side_flops)
    row: dict[str, Any] = {
        "pool": pool,
        "hidden": hidden,
        "distill_weight": distill,
        "seed": seed,
        "sidenet_flops": side_flops,
        "sidenet_flops_share": side_flops / val.mainnet_flops,
        "train_seconds": seconds,
        "train_accuracy": history[-1]["accuracy"],
        "val": {
            "sidenet_accuracy": val.sidenet_accuracy,
            "agreement": float(val.record.agree.mean()),
            "oracle_flops_fraction": val.oracle()["relative_compute"],
            **point(val, threshold),
        },
        work.held_out: {
            "sidenet_accuracy": held.sidenet_accuracy,
            "agreement": float(held.record.agree.mean()),
            **(point(held, threshold) if work.held_out == "test" else crossfit(held, work.rule)),
        },
    }
    v = row["val"]
    print(
        f"{work.name} pool {pool} hidden {hidden:>4} distill {distill:.1f} seed {seed}: SideNet "
        f"{100 * row['sidenet_flops_share']:.2f}% | val acc {v['sidenet_accuracy']:.4f} agree {v['agreement']:.4f} "
        f"FLOPs {v['flops_fraction']:.4f} | {work.held_out} FLOPs {row[work.held_out]['flops_fraction']:.4f} "
        f"({seconds:.0f} s)",
        flush=True,
    )
    return row


def key_of(row: dict[str, Any]) -> Key:
    return (row["pool"], row["hidden"], row["distill_weight"])


def aggregate(rows: list[dict[str, Any]], held_out: str) -> list[dict[str, Any]]:
    """One entry per configuration, its figures averaged over seeds; least validation FLOPs first."""
    groups: dict[Key, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(key_of(row), []).append(row)
    configs = []
    for (pool, hidden, distill), runs in groups.items():
        val = [r["val"]["flops_fraction"] for r in runs]

        def mean(part: str, name: str, runs: list[dict[str, Any]] = runs) -> float:
            return float(np.mean([r[part][name] for r in runs]))

        configs.append(
            {
                "pool": pool,
                "hidden": hidden,
                "distill_weight": distill,
                "seeds": len(runs),
                "sidenet_flops_share": runs[0]["sidenet_flops_share"],
                "val_flops_fraction": float(np.mean(val)),
                "val_flops_fraction_spread": float(max(val) - min(val)),
                "val_sidenet_accuracy": mean("val", "sidenet_accuracy"),
                "val_agreement": mean("val", "agreement"),
                "val_accuracy_drop": mean("val", "accuracy_drop"),
                "val_oracle_flops_fraction": mean("val", "oracle_flops_fraction"),
                "held_out_sidenet_accuracy": mean(held_out, "sidenet_accuracy"),
                "held_out_flops_fraction": mean(held_out, "flops_fraction"),
                "held_out_accuracy_drop": mean(held_out, "accuracy_drop"),
            }
        )
    return sorted(configs, key=lambda c: c["val_flops_fraction"])


def summarise(configs: list[dict[str, Any]], default: Key) -> dict[str, Any]:
    """The default, the winner (least mean validation FLOPs among configurations run with the most seeds),
    the best configuration per SideNet-cost band (powers of two of the default's cost) and the effect of
    distillation where several weights were run."""
    by_key = {key_of(c): c for c in configs}
    base = by_key[default]
    most = max(c["seeds"] for c in configs)
    winner = min((c for c in configs if c["seeds"] == most), key=lambda c: c["val_flops_fraction"])
    spreads = [c["val_flops_fraction_spread"] for c in configs if c["seeds"] > 1]
    bands: dict[int, list[dict[str, Any]]] = {}
    for c in configs:
        bands.setdefault(round(math.log2(c["sidenet_flops_share"] / base["sidenet_flops_share"])), []).append(c)
    weights: dict[tuple, dict[str, float]] = {}
    for c in configs:
        weights.setdefault((c["pool"], c["hidden"]), {})[f"{c['distill_weight']:g}"] = c["val_flops_fraction"]
    return {
        "default": base,
        "winner": winner,
        "gain_points_val": 100 * (base["val_flops_fraction"] - winner["val_flops_fraction"]),
        "gain_points_held_out": 100 * (base["held_out_flops_fraction"] - winner["held_out_flops_fraction"]),
        "seed_spread_points": 100 * max(spreads) if spreads else None,
        "equal_cost": [
            {"band": k, "cost_vs_default": 2.0**k, "configs": len(cs), "best": cs[0]}  # cs sorted as configs
            for k, cs in sorted(bands.items())
        ],
        "distillation": [
            {"pool": p, "hidden": h, "val_flops_fraction": w} for (p, h), w in weights.items() if len(w) > 1
        ],
    }


def study(work: Workload, args: argparse.Namespace) -> dict[str, Any]:
    """The three stages (module docstring) on one task: every run, the configurations and the summary.
    Stage 1 leaves out SideNets dearer than ``args.max_share`` of the MainNet's FLOPs (the default never)."""
    default: Key = (DEFAULTS["pool_size"] if work.conv else None, DEFAULTS["hidden"], DEFAULTS["distill_weight"])
    rows: list[dict[str, Any]] = []

    def run_key(key: Key, seed: int, stage: int) -> None:
        if not any(key_of(r) == key and r["seed"] == seed for r in rows):
            rows.append({**evaluate(work, key, seed), "stage": stage})

    def share(key: Key) -> float:
        model = make_model(work, key, 0)
        return model.flop_profile(work.example).side / work.mainnet_flops

    weights = [DEFAULTS["distill_weight"]] if work.conv else args.distill
    grid = [(p, h, d) for p in sorted(work.caches, key=lambda p: p or 0) for h in args.hidden for d in weights]
    for key in [k for k in grid if share(k) <= args.max_share] + [default]:
        run_key(key, 0, 1)
    if work.conv:  # stage 2: distillation at the default and at stage 1's best
        best = key_of(aggregate(rows, work.held_out)[0])
        for pool, hidden, _ in dict.fromkeys([default, best]):
            for weight in args.distill:
                run_key((pool, hidden, weight), 0, 2)
    ranked = [key_of(c) for c in aggregate(rows, work.held_out) if key_of(c) != default]
    for seed in range(1, args.seeds):
        for key in [default, *ranked[: args.top]]:
            run_key(key, seed, 3)
    configs = aggregate(rows, work.held_out)
    return {"default_config": list(default), "rows": rows, "configs": configs, "summary": summarise(configs, default)}


def image_workload(
    name: str,
    mainnet: torch.nn.Module,
    tap: str,
    datasets: dict[str, TensorDataset],
    rule: dict[str, float],
    pools: Sequence[int],
    epochs: int,
    chunk: int = 5000,
) -> Workload:
    """An image MainNet cut at ``tap`` (a convolutional map): ``datasets`` ("train", "val", "test") cached
    ``chunk`` images at a time, each chunk's whole maps pooled to every grid of ``pools`` and dropped."""
    images = datasets["val"].tensors[0]
    # A grid larger than any map: this SideNet reads the whole map, pooled to each grid below.
    model = sidenet.attach(mainnet, tap, input_shape=tuple(images.shape[1:]), pool_size=10_000, hidden=1)
    shape, classes = model.sidenet.feature_shape, model.sidenet.num_classes
    example = images[:1]
    profile = model.flop_profile(example)
    caches: dict[int | None, dict[str, FeatureCache]] = {p: {} for p in pools}
    for part, dataset in datasets.items():
        pieces: dict[int, list[FeatureCache]] = {p: [] for p in pools}
        x, y = dataset.tensors
        for start in range(0, len(y), chunk):
            loader = make_loader(TensorDataset(x[start : start + chunk], y[start : start + chunk]), 256)
            whole = sidenet.cache_features(model, loader, progress=False)
            for p in pools:
                pieces[p].append(pool_features(whole, shape, classes, p))
        for p in pools:
            caches[p][part] = join(pieces[p])
    flops = {
        part: SampleFlops(np.full(len(d), float(profile.trunk)), np.full(len(d), float(profile.rest)))
        for part, d in datasets.items()
        if part != "train"
    }
    meta = {"tap": tap, "sizes": {k: len(v) for k, v in datasets.items()}}
    return Workload(name, model.split, example, shape, classes, caches, flops, rule, "test", epochs, meta)


def fmnist_workload(args: argparse.Namespace) -> Workload:
    """The shipped ResNet-20 cut at ``layer1.0``; a training subset, val and test cached."""
    mainnet, _ = pretrain_fmnist_resnet(PretrainRecipe(), data_dir=args.fmnist_data)
    data = fashion_mnist_datasets(args.fmnist_data)

    def first(dataset: TensorDataset, n: int | None) -> TensorDataset:
        images, labels = dataset.tensors
        return TensorDataset(images[:n], labels[:n])

    datasets = {
        "train": first(data["train"], args.fmnist_train),
        "val": first(data["val"], args.eval_limit),
        "test": first(data["test"], args.eval_limit),
    }
    return image_workload("fmnist", mainnet, TAPS["fmnist"], datasets, RULES["fmnist"], args.pools, args.fmnist_epochs)


def sst2_workload(args: argparse.Namespace) -> Workload:
    """all-MiniLM-L6-v2 cut after layer 3 (``both`` features); a training subset, val and dev cached, and
    each val and dev sentence's trunk and rest FLOPs at its own length."""
    recipe = TextRecipe()
    mainnet, tokenizer, _ = finetune_text_mainnet(recipe, data_dir=args.sst2_data)
    mainnet.eval()
    collate = TextCollator(tokenizer, recipe.max_length)
    data = sst2_datasets(args.sst2_data)

    def first(dataset: TextDataset, n: int | None) -> TextDataset:
        return dataset.subset(range(min(n or len(dataset), len(dataset))))

    datasets = {
        "train": first(data["train"], args.sst2_train),
        "val": first(data["val"], args.eval_limit),
        "dev": first(data["test"], args.eval_limit),
    }
    model = sidenet.attach(mainnet, TAPS["sst2"])
    example = collate.encode([datasets["val"].sentences[0]])
    caches, flops = {}, {}
    for part, dataset in datasets.items():
        loader = make_loader(dataset, 64, collate_fn=collate)
        # Training order does not matter (length-sorted batches: little padding); val and dev keep theirs.
        caches[part] = sidenet.cache_features(
            model, length_grouped(loader) if part == "train" else loader, progress=False
        )
        if part != "train":
            profiles = [model.flop_profile(collate.encode([s])) for s in dataset.sentences]
            flops[part] = SampleFlops(
                np.array([p.trunk for p in profiles], dtype=np.float64),
                np.array([p.rest for p in profiles], dtype=np.float64),
            )
    meta = {
        "tap": TAPS["sst2"],
        "features": model.split.options()["features"],
        "sizes": {k: len(v) for k, v in datasets.items()},
    }
    shape = model.sidenet.feature_shape
    return Workload(
        "sst2", model.split, example, shape, 2, {None: caches}, flops, RULES["sst2"], "dev", args.sst2_epochs, meta
    )


WORKLOADS = {"fmnist": fmnist_workload, "sst2": sst2_workload}


def options(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """This step's options from ``argv`` (the command line when None)."""
    parser = benchmark_parser(__doc__)
    parser.add_argument("--tasks", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument("--fmnist-data", default=None, help="folder of the Fashion-MNIST files")
    parser.add_argument("--fmnist-train", type=int, default=None, help="training images the SideNets learn from")
    parser.add_argument("--sst2-train", type=int, default=20_000, help="training phrases the SideNets learn from")
    parser.add_argument("--eval-limit", type=int, default=None, help="the first samples of val and held-out only")
    parser.add_argument("--fmnist-epochs", type=int, default=DEFAULTS["epochs"], help="as the fmnist benchmark")
    parser.add_argument("--sst2-epochs", type=int, default=20, help="SideNet epochs, as the SST-2 benchmark")
    parser.add_argument("--hidden", nargs="+", type=int, default=[64, 128, 256, 512])
    parser.add_argument("--pools", nargs="+", type=int, default=[1, 2, 4, 7, 14], help="pooling grids (conv tap)")
    parser.add_argument(
        "--max-share", type=float, default=0.015, help="grid SideNets up to this share of the MainNet's FLOPs"
    )
    parser.add_argument("--distill", nargs="+", type=float, default=[0.0, 0.5, 1.0], help="distillation weights")
    parser.add_argument("--seeds", type=int, default=2, help="seeds of the default and the best configurations")
    parser.add_argument("--top", type=int, default=3, help="configurations besides the default run with every seed")
    # Tiny perceptrons on a shared 2-core machine: one thread avoids oversubscription (no timing here).
    parser.add_argument("--threads", type=int, default=1, help="torch threads during the study")
    return parse_options(parser, argv, QUICK)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every task's study; the result."""
    started = time.perf_counter()
    tasks = {}
    with torch_threads(args.threads):
        for name in args.tasks:
            begun = time.perf_counter()
            work = WORKLOADS[name](args)
            cached = time.perf_counter() - begun
            print(f"{name}: cached the tap features in {cached:.0f} s", flush=True)
            result = study(work, args)
            tasks[name] = {
                **work.meta,
                "rule": work.rule,
                "held_out": work.held_out,
                "epochs": work.epochs,
                "mainnet_flops": work.mainnet_flops,
                "cache_seconds": cached,
                "seconds": time.perf_counter() - begun,
                **result,
            }
            del work
    return {
        "workload": NAME,
        "command": command(NAME, args),
        "machine": machine(),
        "quick": bool(args.quick),
        "defaults": DEFAULTS,
        "settings": {k: getattr(args, k) for k in SETTINGS},
        "tasks": tasks,
        "seconds": time.perf_counter() - started,
    }


def main(argv: Sequence[str] | None = None) -> None:
    run_and_write(NAME, run, options(argv))


if __name__ == "__main__":
    main()
