"""The compressed MainNets of the stacking benchmarks: pruned ResNets and BERTs, 3-layer students, and
their fine-tuning against the original MainNet (through :func:`sidenet.text_pretrain.train_text_classifier`).

Shared by benchmarks/resnet_compression.py, benchmarks/text_pruning.py and benchmarks/distillation.py,
and tested by tests/test_benchmark_helpers.py: each edit must leave a valid network.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

from sidenet.data import TextCollator, TextDataset
from sidenet.models.cifar_resnet import CifarResNet
from sidenet.text_pretrain import TextRecipe, train_text_classifier

KEEP_LAYERS = (0, 2, 4)  # the student's layers: 1, 3 and 5 of the MainNet (DistilBERT's every other layer)


def l1_kept_outputs(module: nn.Module, amount: float) -> torch.Tensor:
    """Indices of the output units (rows of ``module.weight``) that ``prune.ln_structured`` keeps when it
    drops the ``amount`` share with the smallest L1 norms; the dropped rows of the weight are zeroed."""
    prune.ln_structured(module, "weight", amount=amount, n=1, dim=0)
    keep = module.weight_mask.flatten(1).any(dim=1).nonzero().squeeze(1)
    prune.remove(module, "weight")
    return keep


def prune_channels(model: CifarResNet, sparsity: float) -> CifarResNet:
    """A copy of ``model`` with ``sparsity`` of each residual block's inner channels removed: the first
    convolution's filters with the smallest L1 norms, their batch-norm channels and the matching input
    channels of the second convolution. Block inputs and outputs keep their width (every tap keeps its
    shape); the network really shrinks (a zero mask alone saves nothing on a CPU)."""
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


def prune_feed_forward(model: nn.Module, sparsity: float) -> nn.Module:
    """A copy of the BERT-family ``model`` with ``sparsity`` of every layer's feed-forward neurons removed
    (those whose input weights have the smallest L1 norms: rows of ``intermediate.dense``, columns of
    ``output.dense``)."""
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


def make_student(teacher: nn.Module, keep: tuple[int, ...] = KEEP_LAYERS) -> nn.Module:
    """A copy of the BERT-family ``teacher`` with only the encoder layers ``keep`` (0-based)."""
    student = copy.deepcopy(teacher)
    encoder = student.base_model.encoder
    encoder.layer = nn.ModuleList([encoder.layer[i] for i in keep])
    student.config.num_hidden_layers = len(keep)
    return student


def distillation_loss(
    teacher: nn.Module, temperature: float, weight: float
) -> Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]:
    """``(student, batch) -> loss``: ``weight`` of the Kullback-Leibler divergence to ``teacher``'s
    logits softened by ``temperature`` (scaled by its square), the rest cross-entropy on the labels."""
    teacher.eval()

    def loss(student: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with torch.no_grad():
            soft = F.softmax(teacher(**inputs).logits / temperature, dim=-1)
        logits = student(**inputs).logits
        kd = F.kl_div(F.log_softmax(logits / temperature, dim=-1), soft, reduction="batchmean") * temperature**2
        return weight * kd + (1 - weight) * F.cross_entropy(logits, batch["labels"])

    return loss


def train_with_teacher(
    student: nn.Module,
    teacher: nn.Module,
    train: TextDataset,
    collate: TextCollator,
    epochs: float,
    lr: float,
    seed: int,
    desc: str,
) -> dict[str, Any]:
    """Train ``student`` on ``train`` (SST-2 train), half cross-entropy on the labels, half distillation
    to ``teacher`` at temperature 2: the library's SST-2 loop with batches of 32, 10% warm-up and weight
    decay 0.01 on every parameter. Returns what was done."""
    temperature, weight = 2.0, 0.5
    torch.manual_seed(seed)  # dropout; the batches have their own seeded generator
    recipe = TextRecipe(epochs=epochs, batch_size=32, lr=lr, warmup=0.1, weight_decay=0.01, seed=seed)
    loss = distillation_loss(teacher, temperature, weight)
    done = train_text_classifier(student, train, collate, recipe, loss_fn=loss, decay_every_parameter=True, desc=desc)
    return {
        "steps": done["steps"],
        "epochs": epochs,
        "lr": lr,
        "temperature": temperature,
        "kd_weight": weight,
        "train_seconds": done["train_seconds"],
        "train_loss": done["train_loss"],
    }
