"""Does the SideNet stack with distillation? SST-2: a 3-layer student distilled from the 6-layer
fine-tuned all-MiniLM-L6-v2 MainNet, alone and with a SideNet after its first layer, side by side
with the MainNet alone and with its own SideNet (after layer 3).

The student starts from the MainNet's layers 1, 3 and 5 (DistilBERT's every-other-layer start), its
embeddings and head, and is trained for half an epoch on SST-2 train with half cross-entropy, half
Kullback-Leibler divergence to the MainNet's softened logits (temperature 2). Its SideNet follows the
``sidenet fit`` recipe (30 epochs on cached features, temperature fitted on the validation split).
Thresholds and reporting as in benchmarks/stacking.py: chosen on one half of SST-2 dev, reported on
the other.

Run: ``python -m benchmarks.distillation [--quick]`` after the calibration step, whose SST-2 SideNet is
the MainNet's here (or every step: ``python -m benchmarks run``). The student is cached as
``student-3l`` beside the fitted SideNets (``sidenet-output/benchmarks`` for the full run). Writes
``distillation.json`` into the results folder.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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
    sidenet_dir,
)
from benchmarks.model_edits import KEEP_LAYERS, make_student, train_with_teacher
from sidenet import attach, sweep
from sidenet.calibration import calibrate
from sidenet.data import TextCollator, make_loader, prefix_loader, split_loader, sst2_datasets
from sidenet.tasks import get_task
from sidenet.text_pretrain import evaluate_text_accuracy

RULE = RULES["sst2"]
NAME = "distillation"
# --quick: 0.02 epoch of distillation, the student's SideNet on 2,000 phrases for 3 epochs, the first 300
# dev sentences, one repeat.
QUICK = {
    "distil_epochs": 0.02,
    "max_train_samples": 2000,
    "dev_limit": 300,
    "epochs": 3,
    "repeats": 1,
    "batch1_samples": 32,
}


def distil(
    teacher: nn.Module, collate: TextCollator, data_dir: Path, epochs: float, lr: float, seed: int
) -> tuple[nn.Module, dict[str, Any]]:
    """A 3-layer student of ``teacher`` (layers 1, 3, 5), trained against it on SST-2 train."""
    student = make_student(teacher)
    train = sst2_datasets(data_dir)["train"]
    meta = train_with_teacher(student, teacher, train, collate, epochs, lr, seed, "Distilling a 3-layer student")
    return student, {"keep_layers": list(KEEP_LAYERS), **meta}


def options(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """This step's options from ``argv`` (the command line when None)."""
    parser = benchmark_parser(__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch1-samples", type=int, default=200, help="samples timed at batch 1")
    # Half an epoch keeps `make bench` within its hour. SST-2 dev accuracy of the student: 88.76% after
    # one epoch (commit 9033e06), 87.61% after half an epoch (commit aaef5ed, 4.9 min of training).
    parser.add_argument("--distil-epochs", type=float, default=0.5)
    parser.add_argument("--epochs", type=int, default=30, help="SideNet epochs on cached features")
    parser.add_argument("--tap", type=int, default=1, help="the student's SideNet tap (1 or 2)")
    parser.add_argument("--max-train-samples", type=int, default=None, help="the SideNet on a prefix of train")
    parser.add_argument("--dev-limit", type=int, default=None, help="the first dev sentences only")
    parser.add_argument("--retrain", action="store_true", help="distil again even if a student is cached")
    return parse_options(parser, argv, QUICK)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The MainNet and its 3-layer student, alone and with their SideNets, side by side; the result."""
    task = get_task("sst2")
    mainnet = task.mainnet(args.sst2_data).eval()
    loaders = task.loaders(args.sst2_data)
    collate = loaders["test"].collate_fn
    choose, report = split_loader(prefix_loader(loaders["test"], args.dev_limit))

    folder = sidenet_dir(args.results_dir) / "student-3l"
    if (folder / "student_meta.json").is_file() and not args.retrain:
        from transformers import AutoModelForSequenceClassification

        student = AutoModelForSequenceClassification.from_pretrained(folder).eval()
        meta = json.loads((folder / "student_meta.json").read_text())
    else:
        student, meta = distil(mainnet, collate, args.sst2_data, args.distil_epochs, 1e-4, seed=0)
        dev = make_loader(sst2_datasets(args.sst2_data)["test"], 64, collate_fn=collate)
        meta["dev_accuracy"] = evaluate_text_accuracy(student, dev)
        student.save_pretrained(folder)
        (folder / "student_meta.json").write_text(json.dumps(meta, indent=2))
    print(f"student: {meta}")

    main_side = fitted_sidenet(mainnet, args.results_dir, "sst2")
    student_side = attach(student, args.tap, split_options=main_side.split.options(), hidden=256, seed=0)
    started = time.perf_counter()
    student_side.fit(prefix_loader(loaders["train"], args.max_train_samples), epochs=args.epochs, progress=False)
    calibrate(student_side, loaders["val"], progress=False)
    fit_seconds = time.perf_counter() - started
    for model in (main_side, student_side):
        model.threshold = sweep(model, choose, progress=False).threshold_for(**RULE)
    variants, timing = compare_variants(
        {
            "MainNet (6 layers)": (main_side, "main"),
            "MainNet + SideNet (tap 3)": (main_side, "adaptive"),
            "student (3 layers)": (student_side, "main"),
            f"student + SideNet (tap {args.tap})": (student_side, "adaptive"),
        },
        report.dataset,
        collate,
        args.repeats,
        ((32, None), (1, args.batch1_samples)),
    )
    names = list(variants)
    student_acc = variants[names[2]]["accuracy"]
    result = {
        "workload": "sst2_minilm_distilled",
        "command": command(NAME, args),
        "machine": machine(),
        "rule": RULE,
        "student": meta,
        "student_tap": args.tap,
        "thresholds": {"mainnet": main_side.threshold, "student": student_side.threshold},
        "temperatures": {"mainnet": main_side.temperature, "student": student_side.temperature},
        "student_sidenet_fit_seconds": fit_seconds,
        "report_size": len(report.dataset),
        "variants": variants,
        "multiply": {
            "student_alone": variants[names[2]]["speedup"]["batch32"],
            "sidenet_alone": variants[names[1]]["speedup"]["batch32"],
            "both": variants[names[3]]["speedup"]["batch32"],
            "sidenet_on_student": variants[names[3]]["speedup"]["batch32"] / variants[names[2]]["speedup"]["batch32"],
            "drop_vs_student": student_acc - variants[names[3]]["accuracy"],
        },
        "timing": timing,
    }
    return result


def main(argv: Sequence[str] | None = None) -> None:
    run_and_write(NAME, run, options(argv))


if __name__ == "__main__":
    main()
