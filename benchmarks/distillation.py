"""Does the SideNet stack with distillation? SST-2: a 3-layer student distilled from the 6-layer
fine-tuned all-MiniLM-L6-v2 MainNet, alone and with a SideNet after its first layer, side by side
with the MainNet alone and with its own SideNet (after layer 3).

The student starts from the MainNet's layers 1, 3 and 5 (DistilBERT's every-other-layer start), its
embeddings and head, and is trained for half an epoch on SST-2 train with half cross-entropy, half
Kullback-Leibler divergence to the MainNet's softened logits (temperature 2). Its SideNet follows the
``sidenet fit`` recipe (30 epochs on cached features, temperature fitted on the validation split).
Thresholds and reporting as in benchmarks/stacking.py: chosen on one half of SST-2 dev, reported on
the other.

Run: ``python benchmarks/distillation.py`` (needs the MainNet SideNet of benchmarks/calibration_report.py;
the student is cached under ``sidenet-output/benchmarks/student-3l``). Writes
``benchmarks/results/distillation.json`` and regenerates BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import SIDENETS, machine, write_result
from benchmarks.report import main as write_benchmarks_md
from benchmarks.stacking import RULE, compare_variants
from sidenet import attach, load_sidenet, sweep
from sidenet.calibration import calibrate
from sidenet.data import TextCollator, make_loader, prefix_loader, split_loader, sst2_splits
from sidenet.tasks import get_task
from sidenet.text_pretrain import _length_grouped_batches, evaluate_text_accuracy

KEEP_LAYERS = (0, 2, 4)


def make_student(teacher: nn.Module, keep: tuple[int, ...] = KEEP_LAYERS) -> nn.Module:
    """A copy of the BERT-family ``teacher`` with only the encoder layers ``keep`` (0-based)."""
    student = copy.deepcopy(teacher)
    encoder = student.base_model.encoder
    encoder.layer = nn.ModuleList([encoder.layer[i] for i in keep])
    student.config.num_hidden_layers = len(keep)
    return student


def train_with_teacher(
    student: nn.Module,
    teacher: nn.Module,
    collate: TextCollator,
    data_dir: Path | None,
    epochs: float,
    lr: float,
    seed: int,
    desc: str,
) -> dict[str, Any]:
    """Train ``student`` on SST-2 train, half cross-entropy on the labels, half Kullback-Leibler
    divergence to the ``teacher``'s logits softened by temperature 2; returns what was done."""
    torch.manual_seed(seed)
    student.train()
    teacher.eval()
    train = sst2_splits(data_dir)["train"]
    steps = max(1, math.ceil(epochs * len(train) / 32))
    batches = _length_grouped_batches(train, 32, steps, seed)
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warmup if s < warmup else max(0.0, (steps - s) / max(1, steps - warmup))
    )
    temperature, weight = 2.0, 0.5
    started, total = time.perf_counter(), 0.0
    bar = tqdm(batches, desc=desc, mininterval=10)
    for step, index in enumerate(bar):
        batch = collate([train[i] for i in index])
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with torch.no_grad():
            soft = F.softmax(teacher(**inputs).logits / temperature, dim=-1)
        logits = student(**inputs).logits
        kd = F.kl_div(F.log_softmax(logits / temperature, dim=-1), soft, reduction="batchmean") * temperature**2
        loss = weight * kd + (1 - weight) * F.cross_entropy(logits, batch["labels"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        total += float(loss.detach())
        bar.set_postfix(loss=f"{total / (step + 1):.3f}", refresh=False)
    student.eval()
    return {"steps": steps, "epochs": epochs, "lr": lr, "temperature": temperature, "kd_weight": weight,
            "train_seconds": time.perf_counter() - started, "train_loss": total / steps}  # fmt: skip


def distil(
    teacher: nn.Module, collate: TextCollator, data_dir: Path | None, epochs: float, lr: float, seed: int
) -> tuple[nn.Module, dict[str, Any]]:
    """A 3-layer student of ``teacher`` (layers 1, 3, 5), trained against it on SST-2 train."""
    student = make_student(teacher)
    meta = train_with_teacher(student, teacher, collate, data_dir, epochs, lr, seed, "Distilling a 3-layer student")
    return student, {"keep_layers": list(KEEP_LAYERS), **meta}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None, help="folder of SST-2's train.tsv and dev.tsv")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch1-samples", type=int, default=200, help="samples timed at batch 1")
    # Half an epoch keeps `make bench` within its hour. SST-2 dev accuracy of the student: 88.76% after
    # one epoch (commit 9033e06), 87.61% after half an epoch (commit aaef5ed, 4.9 min of training).
    parser.add_argument("--distil-epochs", type=float, default=0.5)
    parser.add_argument("--epochs", type=int, default=30, help="SideNet epochs on cached features")
    parser.add_argument("--tap", type=int, default=1, help="the student's SideNet tap (1 or 2)")
    parser.add_argument("--max-train-samples", type=int, default=None, help="quick runs: SideNet on a prefix")
    parser.add_argument("--dev-limit", type=int, default=None, help="quick runs: the first dev sentences only")
    parser.add_argument("--retrain", action="store_true", help="distil again even if a student is cached")
    args = parser.parse_args()
    task = get_task("sst2")
    mainnet = task.mainnet(args.data).eval()
    loaders = task.loaders(args.data)
    collate = loaders["test"].collate_fn
    choose, report = split_loader(prefix_loader(loaders["test"], args.dev_limit))

    folder = SIDENETS / "student-3l"
    if (folder / "student_meta.json").is_file() and not args.retrain:
        from transformers import AutoModelForSequenceClassification

        student = AutoModelForSequenceClassification.from_pretrained(folder).eval()
        meta = json.loads((folder / "student_meta.json").read_text())
    else:
        student, meta = distil(mainnet, collate, args.data, args.distil_epochs, 1e-4, seed=0)
        meta["dev_accuracy"] = evaluate_text_accuracy(student, make_loader(sst2_splits(args.data)["test"], 64,
                                                                           collate_fn=collate))  # fmt: skip
        student.save_pretrained(folder)
        (folder / "student_meta.json").write_text(json.dumps(meta, indent=2))
    print(f"student: {meta}")

    main_side = load_sidenet(mainnet, SIDENETS / "sst2-3")
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
        "command": "python benchmarks/distillation.py",
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
    print(f"wrote {write_result('distillation', result)} and {write_benchmarks_md()}")


if __name__ == "__main__":
    main()
