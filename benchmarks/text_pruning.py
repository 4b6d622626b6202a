"""Does the SideNet stack with pruning? SST-2 / all-MiniLM-L6-v2 with structured magnitude pruning of
the feed-forward layers at two sparsity levels, each fine-tuned briefly, alone and with a SideNet after
layer 3, side by side with the MainNet alone and with its own SideNet.

Pruning: in every layer, ``torch.nn.utils.prune.ln_structured`` (L1 norm over each neuron's input
weights) chooses the ``sparsity`` share of the feed-forward network's 1,536 intermediate neurons to
drop; those neurons (rows of ``intermediate.dense``, columns of ``output.dense``) are then removed, so
the matrices really shrink: an unstructured mask leaves dense kernels doing the same work on a CPU.
The feed-forward network holds about two thirds of a MiniLM layer's multiply-adds on SST-2's short
sentences. Fine-tuning: 0.15 epoch of SST-2 train by default (300 steps), half cross-entropy and half
distillation to the unpruned MainNet (the distillation step's loop, ``model_edits.train_with_teacher``),
learning rate 5e-5.

SideNets follow the ``sidenet fit`` recipe on each pruned MainNet; thresholds and reporting as in
benchmarks/stacking.py (at most 1% of sentences exiting with another answer than their own MainNet's,
chosen on one half of SST-2 dev, reported on the other).

Run: ``python -m benchmarks.text_pruning [--quick]`` after the calibration step, whose SST-2 SideNet is
the MainNet's here (or every step: ``python -m benchmarks run``). Pruned MainNets are cached as
``pruned-ffn-<percent>`` beside the fitted SideNets (``sidenet-output/benchmarks`` for the full run).
Writes ``text_pruning.json`` into the results folder.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
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
    sidenet_dir,
)
from benchmarks.model_edits import prune_feed_forward, train_with_teacher
from sidenet import attach, sweep
from sidenet.calibration import calibrate
from sidenet.data import make_loader, prefix_loader, split_loader, sst2_datasets
from sidenet.tasks import get_task
from sidenet.text_pretrain import evaluate_text_accuracy

RULE = RULES["sst2"]
NAME = "text_pruning"
# --quick: 50% sparsity only, 0.02 epoch of fine-tuning, SideNets on 2,000 phrases for 3 epochs, the
# first 300 dev sentences, one repeat.
QUICK = {
    "sparsities": [0.5],
    "finetune_epochs": 0.02,
    "max_train_samples": 2000,
    "dev_limit": 300,
    "epochs": 3,
    "repeats": 1,
    "batch1_samples": 32,
}


def pruned_mainnet(
    mainnet: nn.Module, sparsity: float, collate: Any, data: Path, epochs: float, retrain: bool, cache: Path
) -> tuple[nn.Module, dict[str, Any]]:
    """The pruned, fine-tuned MainNet at ``sparsity`` (cached in ``cache``), and what was done to make it."""
    folder = cache / f"pruned-ffn-{round(100 * sparsity)}"
    if (folder / "pruned_meta.json").is_file() and not retrain:
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
        return model, json.loads((folder / "pruned_meta.json").read_text())
    splits = sst2_datasets(data)
    dev = make_loader(splits["test"], 64, collate_fn=collate)
    model = prune_feed_forward(mainnet, sparsity)
    meta: dict[str, Any] = {"sparsity": sparsity, "dev_accuracy_before_finetuning": evaluate_text_accuracy(model, dev)}
    desc = f"Fine-tuning at {sparsity:.0%}"
    meta |= train_with_teacher(model, mainnet, splits["train"], collate, epochs, 5e-5, 0, desc)
    meta["dev_accuracy"] = evaluate_text_accuracy(model, dev)
    meta["parameters"] = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder)
    (folder / "pruned_meta.json").write_text(json.dumps(meta, indent=2))
    return model, meta


def options(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """This step's options from ``argv`` (the command line when None)."""
    parser = benchmark_parser(__doc__)
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.25, 0.5])
    parser.add_argument("--finetune-epochs", type=float, default=0.15)
    parser.add_argument("--epochs", type=int, default=30, help="SideNet epochs on cached features")
    parser.add_argument("--max-train-samples", type=int, default=None, help="SideNets on a prefix of train")
    parser.add_argument("--dev-limit", type=int, default=None, help="the first dev sentences only")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch1-samples", type=int, default=200, help="samples timed at batch 1")
    parser.add_argument("--retrain", action="store_true", help="prune and fine-tune again even if cached")
    return parse_options(parser, argv, QUICK)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The MainNet and its pruned versions, alone and with their SideNets, side by side; the result."""
    torch.manual_seed(0)
    task = get_task("sst2")
    mainnet = task.mainnet(args.sst2_data).eval()
    loaders = task.loaders(args.sst2_data)
    collate = loaders["test"].collate_fn
    choose, report = split_loader(prefix_loader(loaders["test"], args.dev_limit))

    main_side = fitted_sidenet(mainnet, args.results_dir, "sst2")
    models, pruned_meta = {"MainNet": main_side}, {}
    variants: dict[str, Any] = {"MainNet": (main_side, "main"), "MainNet + SideNet": (main_side, "adaptive")}
    for sparsity in args.sparsities:
        pruned, meta = pruned_mainnet(
            mainnet,
            sparsity,
            collate,
            args.sst2_data,
            args.finetune_epochs,
            args.retrain,
            sidenet_dir(args.results_dir),
        )
        side = attach(pruned, 3, split_options=main_side.split.options(), hidden=main_side.sidenet.hidden, seed=0)
        started = time.perf_counter()
        side.fit(prefix_loader(loaders["train"], args.max_train_samples), epochs=args.epochs, progress=False)
        calibrate(side, loaders["val"], progress=False)
        meta["sidenet_fit_seconds"] = time.perf_counter() - started
        name = f"FFN pruned {sparsity:.0%}"
        models[name], pruned_meta[name] = side, meta
        variants[name] = (side, "main")
        variants[f"{name} + SideNet"] = (side, "adaptive")
        print(f"{name}: {meta}")
    for model in models.values():
        model.threshold = sweep(model, choose, progress=False).threshold_for(**RULE)
    table, timing = compare_variants(
        variants, report.dataset, collate, args.repeats, ((32, None), (1, args.batch1_samples))
    )
    names = list(table)
    multiply = {}
    for alone, both in zip(names[2::2], names[3::2], strict=True):
        multiply[alone] = {
            "pruned_alone": table[alone]["speedup"]["batch32"],
            "sidenet_alone": table[names[1]]["speedup"]["batch32"],
            "both": table[both]["speedup"]["batch32"],
            "sidenet_on_pruned": table[both]["speedup"]["batch32"] / table[alone]["speedup"]["batch32"],
            "drop_vs_pruned": table[alone]["accuracy"] - table[both]["accuracy"],
        }
    result = {
        "workload": "sst2_minilm_pruned",
        "command": command(NAME, args),
        "machine": machine(),
        "rule": RULE,
        "tap": 3,
        "mainnet_parameters": sum(p.numel() for p in mainnet.parameters()),
        "compressed": pruned_meta,
        "thresholds": {name: m.threshold for name, m in models.items()},
        "temperatures": {name: m.temperature for name, m in models.items()},
        "report_size": len(report.dataset),
        "variants": table,
        "multiply": multiply,
        "timing": timing,
    }
    return result


def main(argv: Sequence[str] | None = None) -> None:
    run_and_write(NAME, run, options(argv))


if __name__ == "__main__":
    main()
