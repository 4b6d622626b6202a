"""Does the SideNet stack with pruning? Fashion-MNIST / ResNet-20 with structured (channel) magnitude
pruning at two sparsity levels, each fine-tuned briefly, alone and with a SideNet, side by side with
the MainNet alone and with its own SideNet.

Pruning: in every residual block, ``torch.nn.utils.prune.ln_structured`` (L1 norm over each output
filter) chooses the ``sparsity`` share of the first convolution's filters to drop; those filters, their
batch-norm channels and the matching input channels of the second convolution are then removed, so the
network really gets smaller (a zero mask alone saves nothing on a CPU). Block inputs and outputs keep
their width, so every tap keeps its shape. One epoch of SGD fine-tuning follows (cosine learning rate
from 0.01, the MainNet's augmentation). The SideNet (tap ``layer1.0``, 7x7 pooling) follows the
``sidenet fit`` recipe on each pruned MainNet; thresholds: at most 0.5 points below that MainNet on the
validation split; everything reported on the 10,000 test images.

Run: ``python benchmarks/pruning.py`` (needs the SideNet of benchmarks/calibration_report.py). Writes
``benchmarks/results/pruning.json`` and regenerates BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import SIDENETS, machine, write_result
from benchmarks.report import main as write_benchmarks_md
from benchmarks.stacking import compare_variants, train_prefix
from sidenet import attach, load_sidenet, sweep
from sidenet.calibration import calibrate
from sidenet.data import fashion_mnist_splits
from sidenet.models.cifar_resnet import CifarResNet
from sidenet.pretrain import _augment, evaluate_accuracy
from sidenet.tasks import get_task

RULE = {"max_accuracy_drop": 0.005}


def prune_channels(model: CifarResNet, sparsity: float) -> CifarResNet:
    """A copy of ``model`` with ``sparsity`` of each block's inner channels removed (see the module doc)."""
    pruned = copy.deepcopy(model).eval()
    for stage in (pruned.layer1, pruned.layer2, pruned.layer3):
        for block in stage:
            prune.ln_structured(block.conv1, "weight", amount=sparsity, n=1, dim=0)
            keep = block.conv1.weight_mask.flatten(1).any(dim=1).nonzero().squeeze(1)
            prune.remove(block.conv1, "weight")
            conv1 = nn.Conv2d(block.conv1.in_channels, len(keep), 3, stride=block.conv1.stride, padding=1, bias=False)
            conv1.weight.data = block.conv1.weight.data[keep].clone()
            bn1 = nn.BatchNorm2d(len(keep), eps=block.bn1.eps, momentum=block.bn1.momentum)
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(bn1, name).data = getattr(block.bn1, name).data[keep].clone()
            conv2 = nn.Conv2d(len(keep), block.conv2.out_channels, 3, padding=1, bias=False)
            conv2.weight.data = block.conv2.weight.data[:, keep].clone()
            block.conv1, block.bn1, block.conv2 = conv1, bn1, conv2
    return pruned.eval()  # the new modules start in training mode


def fine_tune(model: nn.Module, epochs: float, seed: int = 0) -> tuple[nn.Module, float]:
    """SGD with momentum, cosine learning rate from 0.01, the MainNet's augmentation; returns seconds."""
    images, labels = fashion_mnist_splits()["train"].tensors
    steps = max(1, math.ceil(epochs * len(images) / 128))
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    model.train()
    started = time.perf_counter()
    order = torch.randperm(len(images), generator=generator)
    for step in range(steps):
        if (step * 128) % len(images) + 128 > len(images):
            order = torch.randperm(len(images), generator=generator)
        start = (step * 128) % len(images)
        index = order[start : start + 128]
        loss = F.cross_entropy(model(_augment(images[index], generator)), labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval(), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.25, 0.5])
    parser.add_argument("--finetune-epochs", type=float, default=1.0)
    parser.add_argument("--epochs", type=int, default=30, help="SideNet epochs on cached features")
    parser.add_argument("--max-train-samples", type=int, default=None, help="quick runs: SideNet on a prefix")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    task = get_task("fmnist")
    mainnet = task.mainnet().eval()
    loaders = task.loaders()
    test_images, test_labels = fashion_mnist_splits()["test"].tensors
    main_side = load_sidenet(mainnet, SIDENETS / "fmnist-layer1.0")
    variants: dict[str, Any] = {"MainNet": (main_side, "main"), "MainNet + SideNet": (main_side, "adaptive")}
    models, prune_meta = {"MainNet": main_side}, {}
    for sparsity in args.sparsities:
        pruned, seconds = fine_tune(prune_channels(mainnet, sparsity), args.finetune_epochs)
        name = f"pruned {sparsity:.0%}"
        prune_meta[name] = {
            "sparsity": sparsity,
            "finetune_seconds": seconds,
            "parameters": sum(p.numel() for p in pruned.parameters()),
            "test_accuracy": evaluate_accuracy(pruned, test_images, test_labels),
        }
        side = attach(pruned, "layer1.0", input_shape=(1, 28, 28), hidden=256, pool_size=7, seed=0)
        side.fit(train_prefix(loaders["train"], args.max_train_samples), epochs=args.epochs, progress=False)
        calibrate(side, loaders["val"], progress=False)
        models[name] = side
        variants[name] = (side, "main")
        variants[f"{name} + SideNet"] = (side, "adaptive")
        print(f"{name}: {prune_meta[name]}")
    for model in models.values():
        model.threshold = sweep(model, loaders["val"], progress=False).threshold_for(**RULE)
    table, timing = compare_variants(variants, loaders["test"].dataset, None, args.repeats, ((64, 4096), (1, 300)))
    result = {
        "workload": "fmnist_resnet_pruned",
        "command": "python benchmarks/pruning.py",
        "machine": machine(),
        "rule": RULE,
        "mainnet_parameters": sum(p.numel() for p in mainnet.parameters()),
        "pruned": prune_meta,
        "thresholds": {name: m.threshold for name, m in models.items()},
        "variants": table,
        "timing": timing,
    }
    print(f"wrote {write_result('pruning', result)} and {write_benchmarks_md()}")


if __name__ == "__main__":
    main()
