"""Splitters: cut a MainNet at a tap. ``split_mainnet`` picks the splitter registered for a model.

New families register with :func:`register_splitter`, as peft maps model types to target modules:
per-architecture knowledge lives in this one registry.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

# The errors live in sidenet.errors; importable from here too, where they were defined before.
from sidenet.errors import TapError as TapError
from sidenet.errors import UnsupportedMainNetError
from sidenet.splits.base import (
    CallableSplit,
    MainNetSplit,
    StagedSplit,
    State,
    concat_samples,
    select_samples,
)
from sidenet.splits.transformers import TextEncoderSplit, is_text_encoder_classifier
from sidenet.splits.vision import (
    SequentialSplit,
    is_cifar_resnet,
    is_torchvision_resnet,
    split_cifar_resnet,
    split_torchvision_resnet,
)

__all__ = [
    "MainNetSplit",
    "CallableSplit",
    "StagedSplit",
    "SequentialSplit",
    "TextEncoderSplit",
    "State",
    "concat_samples",
    "select_samples",
    "register_splitter",
    "split_mainnet",
    "candidate_taps",
    "SPLITTERS",
]
# name -> (does this splitter handle the model?, build the split at a tap)
SPLITTERS: dict[str, tuple[Callable[[nn.Module], bool], Callable[..., MainNetSplit]]] = {}


def register_splitter(name: str, matches: Callable[[nn.Module], bool], build: Callable[..., MainNetSplit]) -> None:
    """Register a splitter; later registrations are tried first, so users can override built-ins.

    ``build(model, tap, **options)`` makes the split; ``options`` are the split's own settings (such as
    the text splitter's ``features``), saved beside a SideNet by ``MainNetSplit.options()``.
    """
    SPLITTERS[name] = (matches, build)


register_splitter("sequential", lambda m: isinstance(m, nn.Sequential), SequentialSplit)
register_splitter("torchvision_resnet", is_torchvision_resnet, split_torchvision_resnet)
register_splitter("cifar_resnet", is_cifar_resnet, split_cifar_resnet)
register_splitter("transformers_encoder", is_text_encoder_classifier, TextEncoderSplit)


def split_mainnet(mainnet: nn.Module | MainNetSplit, tap: str | int, **options: Any) -> MainNetSplit:
    """Cut ``mainnet`` at ``tap`` with the splitter registered for its type.

    ``options`` go to the splitter (e.g. ``features="mean"`` for text encoders). A ``MainNetSplit``
    passes through unchanged. Raises :class:`UnsupportedMainNetError` for a model no splitter knows
    (build a :class:`CallableSplit` for those) and :class:`TapError` for an unknown tap.
    """
    if isinstance(mainnet, MainNetSplit):
        return mainnet
    if not isinstance(mainnet, nn.Module):
        raise UnsupportedMainNetError(
            f"the MainNet must be a torch.nn.Module (or a sidenet.MainNetSplit), got {type(mainnet).__name__}; "
            f"registered splitters: {', '.join(SPLITTERS)}"
        )
    for matches, build in reversed(SPLITTERS.values()):
        if matches(mainnet):
            return build(mainnet, tap, **options)
    raise UnsupportedMainNetError(
        f"no splitter knows {type(mainnet).__name__}; registered: {', '.join(SPLITTERS)}. "
        "Wrap it with sidenet.CallableSplit(trunk=..., rest=..., mainnet=model) instead."
    )


def candidate_taps(split: MainNetSplit) -> list[str | int]:
    """The taps a cascade can use on ``split``'s MainNet, one per depth, shallowest first: the taps its
    splitter lists (``valid_taps``), less aliases of the same depth (``layer1`` is ``layer1.2`` of a
    ResNet-20; the first name listed is kept). Raises :class:`TapError` for a split that cannot hold a
    cascade (see :meth:`MainNetSplit.check_follows`) or lists no taps."""
    listed = getattr(split, "valid_taps", None)
    if split.tap_depth() is None or not listed:
        raise TapError(f"{type(split).__name__} lists no taps a cascade can use; give the taps yourself")
    options = split.options()
    by_depth: dict[int, str | int] = {}
    for tap in listed:
        depth = split_mainnet(split.mainnet, tap, **options).tap_depth()
        if depth is not None:
            by_depth.setdefault(depth, tap)
    return [by_depth[depth] for depth in sorted(by_depth)]
