"""Splitters for vision MainNets: torchvision ResNets, CIFAR ResNets and ``nn.Sequential``."""

from __future__ import annotations

import operator
from functools import partial

import torch
from torch import nn

from sidenet.errors import TapError
from sidenet.models.cifar_resnet import CifarResNet
from sidenet.splits.base import MainNetSplit, StagedSplit

__all__ = [
    "split_torchvision_resnet",
    "split_cifar_resnet",
    "SequentialSplit",
    "is_torchvision_resnet",
    "is_cifar_resnet",
]


def is_torchvision_resnet(model: nn.Module) -> bool:
    """True for torchvision's ``ResNet`` and anything laid out like it."""
    names = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool", "fc")
    return all(hasattr(model, name) for name in names)


def is_cifar_resnet(model: nn.Module) -> bool:
    """True for :class:`CifarResNet` and models with its module names (``conv1`` ... ``linear``)."""
    if isinstance(model, CifarResNet):
        return True
    names = ("conv1", "bn1", "layer1", "layer2", "layer3", "linear")
    return all(hasattr(model, name) for name in names) and not hasattr(model, "layer4")


def _block_stages(model: nn.Module, layers: list[str]) -> tuple[list, dict[str, str]]:
    stages, aliases = [], {}
    for layer in layers:
        blocks = list(getattr(model, layer).named_children())
        for index, block in blocks:
            stages.append((f"{layer}.{index}", block))
        aliases[layer] = f"{layer}.{blocks[-1][0]}"
    return stages, aliases


def _classifier_classes(classifier: nn.Module) -> int | None:
    """The number of classes a classifier head predicts: its ``out_features`` for an ``nn.Linear``,
    that of the last ``nn.Linear`` inside it otherwise (``nn.Sequential(nn.Dropout(), nn.Linear(...))``),
    ``None`` when it holds none (the caller's ``num_classes`` is used then)."""
    if isinstance(classifier, nn.Linear):
        return classifier.out_features
    linears = [m for m in classifier.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else None


# Stem and head as module-level functions bound to the model with functools.partial, not closures:
# deepcopy copies a partial's arguments through its memo (so a copied split runs the copied model)
# and pickle can store them by name (closures it cannot store at all). Neither is a submodule, so
# the state dict holds the model's parameters once, under ``mainnet``.
def _torchvision_stem(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.maxpool(model.relu(model.bn1(model.conv1(x))))


def _torchvision_head(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.fc(torch.flatten(model.avgpool(x), 1))


def _cifar_stem(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.relu(model.bn1(model.conv1(x)))


def _cifar_head(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.linear(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def split_torchvision_resnet(model: nn.Module, tap: str) -> StagedSplit:
    """Split a torchvision ResNet (18, 34, 50, 101, 152, or a ResNeXt/Wide ResNet) at ``tap``:
    ``stem`` (conv1, bn1, relu, maxpool), ``layer1`` ... ``layer4``, or a block such as ``layer2.1``."""
    stages, aliases = _block_stages(model, ["layer1", "layer2", "layer3", "layer4"])
    return StagedSplit(
        model,
        [("stem", partial(_torchvision_stem, model)), *stages],
        partial(_torchvision_head, model),
        tap,
        aliases,
        num_classes=_classifier_classes(model.fc),
        in_channels=model.conv1.in_channels,
    )


def split_cifar_resnet(model: nn.Module, tap: str) -> StagedSplit:
    """Split a CIFAR ResNet at ``stem`` (conv1, bn1, relu), ``layer1`` ... ``layer3`` or a block."""
    stages, aliases = _block_stages(model, ["layer1", "layer2", "layer3"])
    return StagedSplit(
        model,
        [("stem", partial(_cifar_stem, model)), *stages],
        partial(_cifar_head, model),
        tap,
        aliases,
        num_classes=_classifier_classes(model.linear),
        in_channels=model.conv1.in_channels,
    )


def _sequential_cut(tap: object) -> int | None:
    """``tap`` as a count of modules: an int (or an integer type such as numpy's) or a string of
    digits (the CLI passes taps as text); ``None`` for anything else. Floats and booleans are refused
    rather than truncated: ``int(2.7)`` is 2 and ``int(True)`` is 1, silently another tap."""
    if isinstance(tap, bool) or (isinstance(tap, torch.Tensor) and tap.dtype == torch.bool):
        return None
    if isinstance(tap, str):
        text = tap.strip()
        return int(text) if text.isdecimal() else None
    try:
        return operator.index(tap)  # ints and integer types only: no float, no truncation
    except TypeError:
        return None


class SequentialSplit(MainNetSplit):
    """Split an ``nn.Sequential`` after its first ``tap`` modules (1 <= tap < len(model))."""

    def __init__(self, model: nn.Sequential, tap: int | str) -> None:
        cut = _sequential_cut(tap)
        if cut is None or not 1 <= cut < len(model):
            raise TapError(
                f"unknown tap {tap!r} for nn.Sequential of {len(model)} modules; valid taps: "
                f"integers 1..{len(model) - 1} (the trunk is the first `tap` modules; no floats or booleans)"
            )
        super().__init__(model, cut, _classifier_classes(model))
        self.valid_taps = list(range(1, len(model)))
        # A tuple, not attributes: the halves share modules already registered under ``mainnet``.
        self._halves = (model[:cut], model[cut:])
        # A reshaping module ahead of the first layer (nn.Flatten) hides the input shape: no check then.
        shaping = (nn.Conv2d, nn.Linear, nn.Flatten, nn.Unflatten)
        first = next((m for m in model.modules() if isinstance(m, shaping)), None)
        self.in_channels = first.in_channels if isinstance(first, nn.Conv2d) else None
        self.in_features = first.in_features if isinstance(first, nn.Linear) else None

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        return self._halves[0](x)

    def rest(self, state: torch.Tensor) -> torch.Tensor:
        return self._halves[1](state)

    def advance(self, state: torch.Tensor, later: MainNetSplit) -> torch.Tensor:
        """The modules after this tap up to ``later``'s (see :meth:`MainNetSplit.advance`)."""
        self.check_follows(later)
        return self.mainnet[int(self.tap) : int(later.tap)](state)

    def tap_depth(self) -> int:
        """Modules in the trunk."""
        return int(self.tap)

    def check_structure(self, x: torch.Tensor) -> None:
        super().check_structure(x)
        if self.in_channels is not None and (x.ndim != 4 or x.shape[1] != self.in_channels):
            raise ValueError(f"expected an image batch of shape (N, {self.in_channels}, H, W), got {tuple(x.shape)}")
        if self.in_features is not None and x.shape[-1] != self.in_features:
            raise ValueError(f"expected inputs with {self.in_features} features, got shape {tuple(x.shape)}")
