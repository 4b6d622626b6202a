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

Run: ``python -m benchmarks.stacking [--quick]`` after the calibration step, whose SST-2 SideNet is the
float one here (or every step: ``python -m benchmarks run``). Writes ``stacking.json`` into the results
folder (BENCHMARKS.md's compression figure shows these variants).
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from benchmarks.harness import (
    RULES,
    benchmark_parser,
    command,
    compare_variants,
    fitted_sidenet,
    machine,
    parse_options,
    run_and_write,
)
from sidenet import attach, sweep
from sidenet.calibration import calibrate
from sidenet.data import prefix_loader, split_loader
from sidenet.tasks import get_task

RULE = RULES["sst2"]
NAME = "stacking"
# --quick: the int8 SideNet on 2,000 phrases for 3 epochs, the first 300 dev sentences, one repeat.
QUICK = {"max_train_samples": 2000, "dev_limit": 300, "epochs": 3, "repeats": 1, "batch1_samples": 32}


def quantise(mainnet: nn.Module) -> nn.Module:
    """int8 dynamic quantisation of the Linear layers (weights int8, activations quantised on the fly)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated in favour of torchao
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(mainnet), {nn.Linear}, dtype=torch.qint8).eval()


def options(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """This step's options from ``argv`` (the command line when None)."""
    parser = benchmark_parser(__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch1-samples", type=int, default=200, help="samples timed at batch 1")
    parser.add_argument("--epochs", type=int, default=30, help="SideNet epochs on cached features")
    parser.add_argument("--max-train-samples", type=int, default=None, help="train the SideNet on a prefix")
    parser.add_argument("--dev-limit", type=int, default=None, help="the first dev sentences only")
    return parse_options(parser, argv, QUICK)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """float and int8 MainNets, alone and with their SideNets, side by side; the result."""
    torch.manual_seed(0)
    task = get_task("sst2")
    mainnet = task.mainnet(args.sst2_data).eval()
    loaders = task.loaders(args.sst2_data)
    choose, report = split_loader(prefix_loader(loaders["test"], args.dev_limit))
    collate = loaders["test"].collate_fn

    float_side = fitted_sidenet(mainnet, args.results_dir, "sst2")
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
        "command": command(NAME, args),
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
            ),
        },
        "timing": timing,
    }
    return result


def main(argv: Sequence[str] | None = None) -> None:
    run_and_write(NAME, run, options(argv))


if __name__ == "__main__":
    main()
