"""Does the SideNet stack with compression? SST-2 / all-MiniLM-L6-v2 with int8 dynamic quantisation of
every Linear layer (``torch.ao.quantization.quantize_dynamic``), measured side by side with the float
MainNet, each alone and with a SideNet after layer 3.

The int8 SideNet is trained on the int8 MainNet's own features (the same recipe as ``sidenet fit``:
features of SST-2 train, 30 epochs, temperature fitted on the validation split). Thresholds: at most
1% of the sentences exiting with another answer than their own MainNet's, chosen on one random half of
SST-2 dev, everything reported on the other half (train phrases are not distributed like dev
sentences). FLOPs of the int8 model are the FLOP-equivalents of its float twin (FlopCounterMode counts
no int8 kernel), so the int8 saving shows in time, not in FLOPs. Throughput at batch 32 and batch 1,
median of interleaved repeats.

Run: ``python benchmarks/stacking.py`` (needs the float SideNet of ``benchmarks/calibration_report.py``).
Writes ``benchmarks/results/stacking.json`` and regenerates BENCHMARKS.md (whose compression figure
shows these variants).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import SIDENETS, machine, write_result
from benchmarks.report import main as write_benchmarks_md
from benchmarks.serving import input_batches, routed_outcome
from sidenet import AdaptiveModel, attach, load_sidenet, sweep
from sidenet.calibration import calibrate
from sidenet.data import prefix_loader, split_loader
from sidenet.tasks import get_task
from sidenet.timing import measure_throughput

RULE = {"max_disagreement": 0.01}


def quantise(mainnet: nn.Module) -> nn.Module:
    """int8 dynamic quantisation of the Linear layers (weights int8, activations quantised on the fly)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated in favour of torchao
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(mainnet), {nn.Linear}, dtype=torch.qint8).eval()


def compare_variants(
    variants: dict[str, tuple[AdaptiveModel, str]],
    dataset: Any,
    collate: Any,
    repeats: int,
    sizes: tuple[tuple[int, int | None], ...],
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Accuracy, exit rate and FLOPs (at the first batch size) of each (model, mode), and throughput at
    each (batch size, samples timed; None = all), interleaved; speed-ups against the first variant."""
    big = sizes[0][0]
    outcome = {name: routed_outcome(model, dataset, collate, big, mode) for name, (model, mode) in variants.items()}
    runners = {name: (lambda x, m=model, mode=mode: m(x, mode=mode).logits) for name, (model, mode) in variants.items()}
    first = next(iter(variants))
    size = variants[first][0].split.batch_size
    timing: dict[str, Any] = {}
    for batch, samples in sizes:
        batches = input_batches(variants[first][0], dataset, collate, batch, samples or len(dataset))
        result = measure_throughput(runners, batches, repeats=repeats, batch_size=size)
        timing[f"batch{batch}"] = {k: v.to_dict() for k, v in result.items()}
        print(f"batch {batch}: " + ", ".join(f"{k} {v.throughput:,.1f}/s" for k, v in result.items()))
    base_flops = outcome[first]["mean_flops"]
    table = {}
    for name, o in outcome.items():
        table[name] = {
            **o,
            "flops_fraction": o["mean_flops"] / base_flops,
            "throughput": {b: timing[b][name]["throughput"] for b in timing},
            "speedup": {b: timing[b][name]["throughput"] / timing[b][first]["throughput"] for b in timing},
        }
    return table, timing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None, help="folder of SST-2's train.tsv and dev.tsv")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch1-samples", type=int, default=200, help="samples timed at batch 1")
    parser.add_argument("--epochs", type=int, default=30, help="SideNet epochs on cached features")
    parser.add_argument("--max-train-samples", type=int, default=None, help="quick runs: train on a prefix")
    parser.add_argument("--dev-limit", type=int, default=None, help="quick runs: the first dev sentences only")
    args = parser.parse_args()
    torch.manual_seed(0)
    task = get_task("sst2")
    mainnet = task.mainnet(args.data).eval()
    loaders = task.loaders(args.data)
    choose, report = split_loader(prefix_loader(loaders["test"], args.dev_limit))
    collate = loaders["test"].collate_fn

    float_side = load_sidenet(mainnet, SIDENETS / "sst2-3")
    int8 = quantise(mainnet)
    int8_side = attach(int8, 3, split_options=float_side.split.options(), hidden=float_side.sidenet.hidden, seed=0)
    int8_side.count_flops_with(mainnet)
    started = time.perf_counter()
    int8_side.fit(prefix_loader(loaders["train"], args.max_train_samples), epochs=args.epochs, progress=False)
    calibrate(int8_side, loaders["val"], progress=False)
    fit_seconds = time.perf_counter() - started
    print(f"int8 SideNet fitted in {fit_seconds:.0f} s (temperature {int8_side.temperature:.3f})")

    models = {"float": float_side, "int8": int8_side}
    for model in models.values():
        model.threshold = sweep(model, choose, progress=False).threshold_for(**RULE)
    variants, timing = compare_variants(
        {
            "float MainNet": (float_side, "main"),
            "float + SideNet": (float_side, "adaptive"),
            "int8 MainNet": (int8_side, "main"),
            "int8 + SideNet": (int8_side, "adaptive"),
        },
        report.dataset,
        collate,
        args.repeats,
        ((32, None), (1, args.batch1_samples)),
    )
    dataset = report.dataset
    sp = {name: v["speedup"]["batch32"] for name, v in variants.items()}
    int8_main_acc = variants["int8 MainNet"]["accuracy"]
    result = {
        "workload": "sst2_minilm_int8",
        "command": "python benchmarks/stacking.py",
        "machine": machine(),
        "rule": RULE,
        "tap": 3,
        "thresholds": {name: model.threshold for name, model in models.items()},
        "temperatures": {name: model.temperature for name, model in models.items()},
        "report_size": len(dataset),
        "int8_sidenet_fit_seconds": fit_seconds,
        "variants": variants,
        "multiply": {
            "int8_alone": sp["int8 MainNet"],
            "sidenet_alone": sp["float + SideNet"],
            "both": sp["int8 + SideNet"],
            "product_of_alone": sp["int8 MainNet"] * sp["float + SideNet"],
            "sidenet_on_int8": sp["int8 + SideNet"] / sp["int8 MainNet"],
        },
        "target": {
            "target": "int8 + SideNet >= 1.3x int8 alone (batch 32) at <= 1.0 pt below the int8 MainNet",
            "speedup_over_int8": sp["int8 + SideNet"] / sp["int8 MainNet"],
            "accuracy_drop_vs_int8": int8_main_acc - variants["int8 + SideNet"]["accuracy"],
            "met": bool(
                sp["int8 + SideNet"] / sp["int8 MainNet"] >= 1.3
                and int8_main_acc - variants["int8 + SideNet"]["accuracy"] <= 0.01
            ),  # fmt: skip
        },
        "timing": timing,
    }
    print(f"wrote {write_result('stacking', result)} and {write_benchmarks_md()}")


if __name__ == "__main__":
    main()
