"""Does the SideNet stack with pruning? SST-2 / all-MiniLM-L6-v2 with structured magnitude pruning of
the feed-forward layers at two sparsity levels, each fine-tuned briefly, alone and with a SideNet after
layer 3, side by side with the MainNet alone and with its own SideNet.

Pruning: in every layer, ``torch.nn.utils.prune.ln_structured`` (L1 norm over each neuron's input
weights) chooses the ``sparsity`` share of the feed-forward network's 1,536 intermediate neurons to
drop; those neurons (rows of ``intermediate.dense``, columns of ``output.dense``) are then removed, so
the matrices really shrink: an unstructured mask leaves dense kernels doing the same work on a CPU.
The feed-forward network holds about two thirds of a MiniLM layer's multiply-adds on SST-2's short
sentences. Fine-tuning: 0.15 epoch of SST-2 train by default (300 steps), half cross-entropy and half
distillation to the unpruned MainNet (``benchmarks/distillation.py``'s loop), learning rate 5e-5.

SideNets follow the ``sidenet fit`` recipe on each pruned MainNet; thresholds and reporting as in
benchmarks/stacking.py (at most 1% of sentences exiting with another answer than their own MainNet's,
chosen on one half of SST-2 dev, reported on the other).

Run: ``python benchmarks/text_pruning.py`` (needs the MainNet SideNet of benchmarks/calibration_report.py;
pruned MainNets are cached under ``sidenet-output/benchmarks/pruned-ffn-<percent>``). Writes
``benchmarks/results/text_pruning.json`` and regenerates BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import SIDENETS, machine, write_result
from benchmarks.distillation import train_with_teacher
from benchmarks.report import main as write_benchmarks_md
from benchmarks.resnet_compression import l1_kept_outputs
from benchmarks.stacking import RULE, compare_variants
from sidenet import attach, load_sidenet, sweep
from sidenet.calibration import calibrate
from sidenet.data import make_loader, prefix_loader, split_loader, sst2_splits
from sidenet.tasks import get_task
from sidenet.text_pretrain import evaluate_text_accuracy


def prune_feed_forward(model: nn.Module, sparsity: float) -> nn.Module:
    """A copy of the BERT-family ``model`` with ``sparsity`` of every layer's feed-forward neurons removed."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must lie in [0, 1), got {sparsity}")
    pruned = copy.deepcopy(model).eval()
    kept = set()
    for layer in pruned.base_model.encoder.layer:
        inner, outer = layer.intermediate.dense, layer.output.dense
        keep = l1_kept_outputs(inner, sparsity)
        new_inner = nn.Linear(inner.in_features, len(keep))
        new_inner.weight.data = inner.weight.data[keep].clone()
        new_inner.bias.data = inner.bias.data[keep].clone()
        new_outer = nn.Linear(len(keep), outer.out_features)
        new_outer.weight.data = outer.weight.data[:, keep].clone()
        new_outer.bias.data = outer.bias.data.clone()
        layer.intermediate.dense, layer.output.dense = new_inner, new_outer
        kept.add(len(keep))
    # ln_structured prunes the same count in every layer, so the config can say it and
    # save_pretrained / from_pretrained round-trip the pruned model.
    (pruned.config.intermediate_size,) = kept
    return pruned.eval()


def pruned_mainnet(
    mainnet: nn.Module, sparsity: float, collate: Any, data: Path | None, epochs: float, retrain: bool
) -> tuple[nn.Module, dict[str, Any]]:
    """The pruned, fine-tuned MainNet at ``sparsity`` (cached), and what was done to make it."""
    folder = SIDENETS / f"pruned-ffn-{round(100 * sparsity)}"
    if (folder / "pruned_meta.json").is_file() and not retrain:
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
        return model, json.loads((folder / "pruned_meta.json").read_text())
    dev = make_loader(sst2_splits(data)["test"], 64, collate_fn=collate)
    model = prune_feed_forward(mainnet, sparsity)
    meta: dict[str, Any] = {"sparsity": sparsity, "dev_accuracy_before_finetuning": evaluate_text_accuracy(model, dev)}
    meta |= train_with_teacher(model, mainnet, collate, data, epochs, 5e-5, 0, f"Fine-tuning at {sparsity:.0%}")
    meta["dev_accuracy"] = evaluate_text_accuracy(model, dev)
    meta["parameters"] = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder)
    (folder / "pruned_meta.json").write_text(json.dumps(meta, indent=2))
    return model, meta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None, help="folder of SST-2's train.tsv and dev.tsv")
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.25, 0.5])
    parser.add_argument("--finetune-epochs", type=float, default=0.15)
    parser.add_argument("--epochs", type=int, default=30, help="SideNet epochs on cached features")
    parser.add_argument("--max-train-samples", type=int, default=None, help="quick runs: SideNet on a prefix")
    parser.add_argument("--dev-limit", type=int, default=None, help="quick runs: the first dev sentences only")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch1-samples", type=int, default=200, help="samples timed at batch 1")
    parser.add_argument("--retrain", action="store_true", help="prune and fine-tune again even if cached")
    args = parser.parse_args()
    torch.manual_seed(0)
    task = get_task("sst2")
    mainnet = task.mainnet(args.data).eval()
    loaders = task.loaders(args.data)
    collate = loaders["test"].collate_fn
    choose, report = split_loader(prefix_loader(loaders["test"], args.dev_limit))

    main_side = load_sidenet(mainnet, SIDENETS / "sst2-3")
    models, pruned_meta = {"MainNet": main_side}, {}
    variants: dict[str, Any] = {"MainNet": (main_side, "main"), "MainNet + SideNet": (main_side, "adaptive")}
    for sparsity in args.sparsities:
        pruned, meta = pruned_mainnet(mainnet, sparsity, collate, args.data, args.finetune_epochs, args.retrain)
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
        "command": "python benchmarks/text_pruning.py",
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
    print(f"wrote {write_result('text_pruning', result)} and {write_benchmarks_md()}")


if __name__ == "__main__":
    main()
