"""Does the SideNet stack with compression on the ResNet? Fashion-MNIST / ResNet-20 with (a) structured
(channel) magnitude pruning at two sparsity levels, each fine-tuned briefly, and (b) int8 static
quantisation, each alone and with a SideNet, side by side with the MainNet alone and with its own SideNet.

Pruning: in every residual block, ``torch.nn.utils.prune.ln_structured`` (L1 norm over each output
filter) chooses the ``sparsity`` share of the first convolution's filters to drop; those filters, their
batch-norm channels and the matching input channels of the second convolution are then removed, so the
network really gets smaller (a zero mask alone saves nothing on a CPU). Block inputs and outputs keep
their width, so every tap keeps its shape. One epoch of SGD fine-tuning follows (cosine learning rate
from 0.01, the MainNet's augmentation).

Quantisation: FX graph mode static int8 (``prepare_fx``/``convert_fx``, x86 backend, 2,000 validation
images for calibration). FX turns the model into one flat graph with no ``layer1.0`` to cut at, so the
trunk (stem + ``layer1.0``) and the rest are quantised as two graphs and joined with
``sidenet.CallableSplit``; FLOPs are counted on the float twin (FlopCounterMode counts no int8 kernel).

Every SideNet (tap ``layer1.0``, 7x7 pooling) follows the ``sidenet fit`` recipe on its own MainNet;
thresholds: at most 0.5 points below that MainNet on the validation split; everything reported on the
10,000 test images.

Run: ``python benchmarks/resnet_compression.py`` (needs the SideNet of benchmarks/calibration_report.py).
Writes ``benchmarks/results/resnet_compression.json`` and regenerates BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
import warnings
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
from benchmarks.stacking import compare_variants
from sidenet import CallableSplit, attach, load_sidenet, split_mainnet, sweep
from sidenet.calibration import calibrate
from sidenet.data import fashion_mnist_splits, prefix_loader
from sidenet.models.cifar_resnet import CifarResNet
from sidenet.pretrain import _augment, evaluate_accuracy
from sidenet.tasks import get_task

RULE = {"max_accuracy_drop": 0.005}


def l1_kept_outputs(module: nn.Module, amount: float) -> torch.Tensor:
    """Indices of the output units (rows of ``module.weight``) that ``prune.ln_structured`` keeps when it
    drops the ``amount`` share with the smallest L1 norms; the dropped rows of the weight are zeroed."""
    prune.ln_structured(module, "weight", amount=amount, n=1, dim=0)
    keep = module.weight_mask.flatten(1).any(dim=1).nonzero().squeeze(1)
    prune.remove(module, "weight")
    return keep


def prune_channels(model: CifarResNet, sparsity: float) -> CifarResNet:
    """A copy of ``model`` with ``sparsity`` of each block's inner channels removed (see the module doc)."""
    pruned = copy.deepcopy(model).eval()
    for stage in (pruned.layer1, pruned.layer2, pruned.layer3):
        for block in stage:
            keep = l1_kept_outputs(block.conv1, sparsity)
            conv1 = nn.Conv2d(block.conv1.in_channels, len(keep), 3, stride=block.conv1.stride, padding=1, bias=False)
            conv1.weight.data = block.conv1.weight.data[keep].clone()
            bn1 = nn.BatchNorm2d(len(keep), eps=block.bn1.eps, momentum=block.bn1.momentum)
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(bn1, name).data = getattr(block.bn1, name).data[keep].clone()
            conv2 = nn.Conv2d(len(keep), block.conv2.out_channels, 3, padding=1, bias=False)
            conv2.weight.data = block.conv2.weight.data[:, keep].clone()
            block.conv1, block.bn1, block.conv2 = conv1, bn1, conv2
    return pruned.eval()  # the new modules start in training mode


class _Trunk(nn.Module):
    """Stem and ``layer1.0`` of a CIFAR ResNet: the trunk at tap ``layer1.0``."""

    def __init__(self, model: CifarResNet) -> None:
        super().__init__()
        self.conv1, self.bn1, self.block = model.conv1, model.bn1, model.layer1[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(F.relu(self.bn1(self.conv1(x))))


class _Rest(nn.Module):
    """Everything after ``layer1.0``: the rest of the MainNet."""

    def __init__(self, model: CifarResNet) -> None:
        super().__init__()
        self.layer1, self.layer2, self.layer3, self.linear = model.layer1[1:], model.layer2, model.layer3, model.linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def quantise_parts(model: CifarResNet, calibration: torch.Tensor) -> tuple[nn.Module, nn.Module]:
    """Static int8 trunk (up to ``layer1.0``) and rest (FX graph mode), calibrated on ``calibration``."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = "x86"
    mapping = get_default_qconfig_mapping("x86")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated in favour of torchao
        trunk = prepare_fx(_Trunk(copy.deepcopy(model)).eval(), mapping, example_inputs=(calibration[:2],))
        for start in range(0, len(calibration), 250):
            trunk(calibration[start : start + 250])
        trunk = convert_fx(trunk)
        states = torch.cat([trunk(calibration[i : i + 250]) for i in range(0, len(calibration), 250)])
        rest = prepare_fx(_Rest(copy.deepcopy(model)).eval(), mapping, example_inputs=(states[:2],))
        for start in range(0, len(states), 250):
            rest(states[start : start + 250])
        rest = convert_fx(rest)
    return trunk, rest


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
    parser.add_argument("--batch1-samples", type=int, default=300, help="samples timed at batch 1")
    parser.add_argument("--no-int8", dest="int8", action="store_false", help="skip the int8 static variant")
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
        side.fit(prefix_loader(loaders["train"], args.max_train_samples), epochs=args.epochs, progress=False)
        calibrate(side, loaders["val"], progress=False)
        models[name] = side
        variants[name] = (side, "main")
        variants[f"{name} + SideNet"] = (side, "adaptive")
        print(f"{name}: {prune_meta[name]}")
    if args.int8:
        images = fashion_mnist_splits()["val"].tensors[0]
        trunk, rest = quantise_parts(mainnet, images[:2000])
        split = CallableSplit(trunk=trunk, rest=rest, mainnet=nn.ModuleList([trunk, rest]), num_classes=10,
                              tap="layer1.0 (int8)")  # fmt: skip
        int8_side = attach(split, "layer1.0", input_shape=(1, 28, 28), hidden=256, pool_size=7, seed=0)
        int8_side.count_flops_with(split_mainnet(mainnet, "layer1.0"))
        int8_side.fit(prefix_loader(loaders["train"], args.max_train_samples), epochs=args.epochs, progress=False)
        calibrate(int8_side, loaders["val"], progress=False)
        models["int8"] = int8_side
        variants["int8 (static)"] = (int8_side, "main")
        variants["int8 (static) + SideNet"] = (int8_side, "adaptive")
        int8_accuracy = evaluate_accuracy(nn.Sequential(trunk, rest), test_images, test_labels)
        prune_meta["int8 (static)"] = {"test_accuracy": int8_accuracy, "scheme": "FX static, x86"}
    for model in models.values():
        model.threshold = sweep(model, loaders["val"], progress=False).threshold_for(**RULE)
    sizes = ((64, 4096), (1, args.batch1_samples))
    table, timing = compare_variants(variants, loaders["test"].dataset, None, args.repeats, sizes)
    result = {
        "workload": "fmnist_resnet_compressed",
        "command": "python benchmarks/resnet_compression.py",
        "machine": machine(),
        "rule": RULE,
        "mainnet_parameters": sum(p.numel() for p in mainnet.parameters()),
        "compressed": prune_meta,
        "thresholds": {name: m.threshold for name, m in models.items()},
        "variants": table,
        "timing": timing,
    }
    print(f"wrote {write_result('resnet_compression', result)} and {write_benchmarks_md()}")


if __name__ == "__main__":
    main()
