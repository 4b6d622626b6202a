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

Run: ``python -m benchmarks.resnet_compression [--quick]`` after the calibration step, whose
Fashion-MNIST SideNet is the MainNet's here (or every step: ``python -m benchmarks run``). Writes
``resnet_compression.json`` into the results folder.
"""

from __future__ import annotations

import argparse
import copy
import math
import time
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
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
from benchmarks.model_edits import prune_channels
from sidenet import CallableSplit, MainNetSplit, attach, split_mainnet, sweep
from sidenet.calibration import calibrate
from sidenet.data import fashion_mnist_datasets, prefix_loader
from sidenet.models.cifar_resnet import CifarResNet
from sidenet.pretrain import augment, evaluate_accuracy
from sidenet.tasks import get_task

RULE = RULES["fmnist"]
NAME = "resnet_compression"
# --quick: 50% sparsity only, 0.05 epoch of fine-tuning, SideNets on 2,000 images for 3 epochs, one repeat.
QUICK = {
    "sparsities": [0.5],
    "finetune_epochs": 0.05,
    "max_train_samples": 2000,
    "epochs": 3,
    "repeats": 1,
    "batch1_samples": 50,
}


class _Trunk(nn.Module):
    """The trunk at tap ``layer1.0`` as a module of its own, for FX to trace: the MainNet's own stem
    (``CifarResNet.forward_stem``), then ``layer1.0``.

    Not ``split_mainnet(model, "layer1.0").trunk``: its stem calls ``torch.relu``, which FX graph-mode
    quantisation does not fuse with the convolution and batch norm before it (only ``F.relu`` and
    ``nn.ReLU``), so the int8 trunk would requantise after the ReLU: another, slower int8 model than
    the one measured so far."""

    def __init__(self, model: CifarResNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.layer1[0](self.model.forward_stem(x))


class _Rest(nn.Module):
    """The rest of a split (everything after its tap) as a module of its own, for FX to trace."""

    def __init__(self, split: MainNetSplit) -> None:
        super().__init__()
        self.split = split

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        return self.split.rest(state)


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
        split = split_mainnet(copy.deepcopy(model), "layer1.0")
        rest = prepare_fx(_Rest(split).eval(), mapping, example_inputs=(states[:2],))
        for start in range(0, len(states), 250):
            rest(states[start : start + 250])
        rest = convert_fx(rest)
    return trunk, rest


def fine_tune(model: nn.Module, epochs: float, seed: int = 0) -> tuple[nn.Module, float]:
    """SGD with momentum, cosine learning rate from 0.01, the MainNet's augmentation; returns seconds.

    Not :func:`sidenet.pretrain.pretrain_fmnist_resnet`, which trains a new MainNet from scratch with a
    one-cycle schedule; this continues from a pruned one."""
    images, labels = fashion_mnist_datasets()["train"].tensors
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
        loss = F.cross_entropy(model(augment(images[index], generator)), labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval(), time.perf_counter() - started


def options(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """This step's options from ``argv`` (the command line when None)."""
    parser = benchmark_parser(__doc__)
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.25, 0.5])
    parser.add_argument("--finetune-epochs", type=float, default=1.0)
    parser.add_argument("--epochs", type=int, default=30, help="SideNet epochs on cached features")
    parser.add_argument("--max-train-samples", type=int, default=None, help="SideNets on a prefix of train")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch1-samples", type=int, default=300, help="samples timed at batch 1")
    parser.add_argument("--no-int8", dest="int8", action="store_false", help="skip the int8 static variant")
    return parse_options(parser, argv, QUICK)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The MainNet, its pruned and int8 versions, alone and with their SideNets, side by side; the result."""
    torch.manual_seed(0)
    task = get_task("fmnist")
    mainnet = task.mainnet().eval()
    loaders = task.loaders()
    test_images, test_labels = fashion_mnist_datasets()["test"].tensors
    main_side = fitted_sidenet(mainnet, args.results_dir, "fmnist")
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
        images = fashion_mnist_datasets()["val"].tensors[0]
        trunk, rest = quantise_parts(mainnet, images[:2000])
        split = CallableSplit(
            trunk=trunk, rest=rest, mainnet=nn.ModuleList([trunk, rest]), num_classes=10, tap="layer1.0 (int8)"
        )
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
        "command": command(NAME, args),
        "machine": machine(),
        "rule": RULE,
        "mainnet_parameters": sum(p.numel() for p in mainnet.parameters()),
        "compressed": prune_meta,
        "thresholds": {name: m.threshold for name, m in models.items()},
        "variants": table,
        "timing": timing,
    }
    return result


def main(argv: Sequence[str] | None = None) -> None:
    run_and_write(NAME, run, options(argv))


if __name__ == "__main__":
    main()
