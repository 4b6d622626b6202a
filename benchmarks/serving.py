"""Serving side by side, per workload: the MainNet alone, the SideNet with per-sample routing (gather
the samples that continue), the same with the rest of the MainNet run on continuing samples pooled
across batches (``sidenet.serving.PooledRouter``), the batch-level exit of other toolkits (the batch
skips the rest of the MainNet only when every sample in it is confident; same SideNet, same threshold),
and the ideal speed-up the FLOPs predict. Throughput at batch 1 and batch 64 (32 for text), median of
interleaved repeats after a warm-up, with the spread; p50/p95 latency at batch 1.

Uses the SideNets that the calibration step (benchmarks/calibration_report.py) fitted with ``sidenet fit``.
Thresholds: Fashion-MNIST, at most 0.5 points lost on the validation split, reported on the test set;
SST-2, at most 1% of the sentences exiting with another answer than the MainNet's on one half of dev,
reported on the other half (train phrases are not distributed like dev sentences).

Run: ``python -m benchmarks.serving [--quick]`` after the calibration step (or every step: ``python -m
benchmarks run``). Writes ``serving.json`` into the results folder.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Subset

from benchmarks.harness import (
    RULES,
    benchmark_parser,
    command,
    fitted_sidenet,
    input_batches,
    machine,
    parse_options,
    routed_outcome,
    run_and_write,
    summarise,
)
from sidenet import sweep
from sidenet.data import iter_batches, make_loader, prefix_loader, split_loader
from sidenet.serving import PooledRouter
from sidenet.tasks import get_task
from sidenet.timing import latency_percentiles, measure_throughput

WORKLOADS = {"fmnist": {"batch": 64, "rule": RULES["fmnist"]}, "sst2": {"batch": 32, "rule": RULES["sst2"]}}
NAME = "serving"
# --quick: the first 2,000 samples of each split, 256 samples timed (32 at batch 1), one repeat.
QUICK = {"limit": 2000, "samples": 256, "samples_batch1": 32, "repeats": 1}


def loaders_for(name: str, data: Path | None) -> tuple[Any, Any, Any]:
    """(threshold-choosing loader, evaluation dataset, collate function)."""
    task = get_task(name)
    loaders = task.loaders(data)
    if name == "sst2":
        choose, evaluate = split_loader(loaders["test"])
        return choose, evaluate.dataset, loaders["test"].collate_fn
    return loaders["val"], loaders["test"].dataset, None


@torch.no_grad()
def pooled_outcome(router: PooledRouter, dataset: Any, collate: Any, batch: int) -> dict[str, float]:
    """As :func:`routed_outcome` for pooled routing, with how long batches waited for their last answer."""
    batches = list(iter_batches(make_loader(dataset, batch, collate_fn=collate)))
    answered = router.run([inputs for inputs, _ in batches])
    waited = [routed.waited for routed in answered if not bool(routed.output.exited.all())]
    return {
        **summarise([routed.output for routed in answered], torch.cat([target for _, target in batches])),
        "batches_waiting": len(waited) / len(answered),
        "mean_wait": sum(waited) / len(waited) if waited else 0.0,
        "max_wait": max(waited, default=0),
    }


def run_workload(name: str, spec: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The serving comparison of one workload."""
    task = get_task(name)
    data = args.sst2_data if name == "sst2" else None
    model = fitted_sidenet(task.mainnet(data), args.results_dir, name).eval()
    choose, dataset, collate = loaders_for(name, data)
    if args.limit:  # quick runs: the first samples of each split
        choose, dataset = prefix_loader(choose, args.limit), Subset(dataset, range(min(args.limit, len(dataset))))
    model.threshold = sweep(model, choose, progress=False).threshold_for(**spec["rule"])
    big = spec["batch"]
    rows: dict[str, dict[str, Any]] = {}
    for label, mode in {"mainnet": "main", "per_sample": "adaptive", "batch_level": "batch"}.items():
        rows[label] = {f"batch{big}": routed_outcome(model, dataset, collate, big, mode)}
    router = PooledRouter(model, rest_batch=big, max_wait=args.max_wait)
    rows["per_sample_pooled"] = {f"batch{big}": pooled_outcome(router, dataset, collate, big)}
    mainnet_flops = rows["mainnet"][f"batch{big}"]["mean_flops"]
    for row in rows.values():
        row["flops_fraction"] = row[f"batch{big}"]["mean_flops"] / mainnet_flops

    modes = {"mainnet": "main", "per_sample": "adaptive", "batch_level": "batch"}
    runners = {label: (lambda x, m=mode: model(x, mode=m).logits) for label, mode in modes.items()}
    size = model.split.batch_size
    timing: dict[str, Any] = {}
    for batch, samples, repeats in ((big, args.samples, args.repeats), (1, args.samples_batch1, args.repeats)):
        batches = input_batches(model, dataset, collate, batch, samples)
        chosen = runners if batch > 1 else {k: v for k, v in runners.items() if k != "batch_level"}
        # Pooling is timed at the large batch only: with single requests it would make each continuing
        # sample wait for rest_batch others, a latency no batch-1 user would choose.
        pooled = {"per_sample_pooled": router.submit} if batch > 1 else {}
        result = measure_throughput(
            {**chosen, **pooled},
            batches,
            repeats=repeats,
            batch_size=size,
            finish={"per_sample_pooled": router.flush} if pooled else None,
        )
        timing[f"batch{batch}"] = {k: v.to_dict() for k, v in result.items()}
        print(f"{name} batch {batch}: " + ", ".join(f"{k} {v.throughput:,.1f}/s" for k, v in result.items()))
    # At batch 1 the batch is one sample: batch-level exit is per-sample routing.
    timing["batch1"]["batch_level"] = timing["batch1"]["per_sample"]
    singles = input_batches(model, dataset, collate, 1, args.samples_batch1)
    latency = {label: latency_percentiles(run, singles) for label, run in runners.items() if label != "batch_level"}
    latency["batch_level"] = latency["per_sample"]
    ideal = 1.0 / rows["per_sample"]["flops_fraction"]
    for label, row in rows.items():
        measured = [b for b in timing if label in timing[b]]
        row["throughput"] = {b: timing[b][label]["throughput"] for b in measured}
        row["speedup"] = {b: timing[b][label]["throughput"] / timing[b]["mainnet"]["throughput"] for b in measured}
        row["latency_batch1"] = latency.get(label)
    per_sample, batch_level, pooled_row = rows["per_sample"], rows["batch_level"], rows["per_sample_pooled"]
    over_batch_level = per_sample["throughput"][f"batch{big}"] / batch_level["throughput"][f"batch{big}"]
    of_ideal = per_sample["speedup"][f"batch{big}"] / ideal
    return {
        "tap": str(model.tap),
        "threshold": model.threshold,
        "temperature": model.temperature,
        "policy": model.policy_kind,
        "rule": spec["rule"],
        "batch": big,
        "evaluation_size": len(dataset),
        "rows": rows,
        "ideal_speedup": ideal,
        "fraction_of_ideal": {b: per_sample["speedup"][b] / ideal for b in timing},
        "pooled": {
            "rest_batch": big,
            "max_wait": args.max_wait,
            "fraction_of_ideal": pooled_row["speedup"][f"batch{big}"] / ideal,
            "over_per_sample": pooled_row["throughput"][f"batch{big}"] / per_sample["throughput"][f"batch{big}"],
        },
        "per_sample_over_batch_level": over_batch_level,
        # The targets at the large batch, for per-sample routing within each batch.
        "targets": {
            "per_sample_over_batch_level": {
                "target": ">= 1.3",
                "value": over_batch_level,
                "met": over_batch_level >= 1.3,
            },
            "fraction_of_ideal": {"target": ">= 0.8", "value": of_ideal, "met": of_ideal >= 0.8},
        },
        "timing": timing,
    }


def options(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """This step's options from ``argv`` (the command line when None)."""
    parser = benchmark_parser(__doc__)
    parser.add_argument("--only", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument("--limit", type=int, default=None, help="the first samples of each split only")
    parser.add_argument("--samples", type=int, default=4096, help="samples timed at the large batch")
    parser.add_argument("--samples-batch1", type=int, default=400, help="samples timed at batch 1")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timing repeats")
    parser.add_argument(
        "--max-wait", type=int, default=16, help="pooled routing: most later batches a continuing sample waits"
    )
    return parse_options(parser, argv, QUICK)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The serving comparison of every workload in ``args.only``; the result."""
    torch.manual_seed(0)
    results: dict[str, Any] = {"command": command(NAME, args), "machine": machine(), "workloads": {}}
    for name in args.only:
        results["workloads"][name] = run_workload(name, WORKLOADS[name], args)
    results["quick"] = bool(args.quick)
    return results


def main(argv: Sequence[str] | None = None) -> None:
    run_and_write(NAME, run, options(argv))


if __name__ == "__main__":
    main()
