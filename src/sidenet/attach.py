"""Attach a SideNet to a MainNet (the shape of peft's ``get_peft_model``): the settings go in as a
:class:`~sidenet.SideNetConfig` or as its fields as keywords, and the model keeps that config
(``model.config``), completed with what attaching measured. Saving and loading live in
:mod:`sidenet.checkpoint` (``save_sidenet`` and ``load_sidenet`` stay importable from here).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

# Saving, loading and the errors moved to sidenet.checkpoint and sidenet.errors; still importable from
# here, where they lived (the CLI imports them here).
from sidenet.checkpoint import load_sidenet as load_sidenet
from sidenet.checkpoint import mainnet_placement
from sidenet.checkpoint import save_sidenet as save_sidenet
from sidenet.config import SETTINGS, SideNetConfig
from sidenet.errors import CheckpointError as CheckpointError
from sidenet.errors import MainNetMismatchError as MainNetMismatchError
from sidenet.errors import SplitMismatchError as SplitMismatchError
from sidenet.errors import TapError
from sidenet.head import SideNet
from sidenet.routing import AdaptiveModel
from sidenet.splits import MainNetSplit, split_mainnet
from sidenet.splits.probe import (
    check_split,
    checked_input_shape,
    example_from_shape,
    feature_shape,
    to_placement,
)

__all__ = ["attach"]


def _attach_config(tap: str | int | None, config: SideNetConfig | None, settings: Mapping[str, Any]) -> SideNetConfig:
    """The config to attach with: ``config`` (or the defaults) with ``tap`` and the keyword settings over it."""
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        named = ", ".join(map(repr, unknown))
        raise ValueError(f"attach() takes no setting {named}; the settings are {', '.join(SETTINGS)}")
    if config is None:
        return SideNetConfig(tap=tap, **settings)
    if not isinstance(config, SideNetConfig):
        raise ValueError(f"config must be a sidenet.SideNetConfig, got {type(config).__name__}")
    return replace(config, **settings, **({} if tap is None else {"tap": tap}))


def attach(
    mainnet: nn.Module | MainNetSplit,
    tap: str | int | Sequence[str | int] | None = None,
    *,
    config: SideNetConfig | None = None,
    input_shape: Any = None,
    example_input: Any = None,
    seed: int = 0,
    **settings: Any,
) -> AdaptiveModel:
    """Cut ``mainnet`` at ``tap`` and attach a fresh SideNet there; or, given a list of taps, attach a
    cascade: one SideNet at each tap, tried in turn (see :meth:`AdaptiveModel.forward`).

    Args:
        mainnet: a pretrained model (or a ready :class:`MainNetSplit`); it is put in eval mode.
        tap: where to attach; an unknown tap raises an error listing the valid ones. May be left out
            when ``config`` names it. A list of taps, each deeper than the one before, makes a cascade
            (the settings apply to each of its SideNets; set their thresholds with ``model.thresholds``).
        config: the settings as a :class:`SideNetConfig` (e.g. another model's ``model.config``);
            ``tap`` and keyword settings given beside it replace its own. Its measured and saved
            fields (feature shape, checksums, ...) are measured again here.
        input_shape: the shape of one input sample, e.g. ``(3, 224, 224)``; or give ``example_input``
            (a batch) instead, or a config that records one. Used once to size the SideNet. Text
            MainNets need none.
        seed: seeds the SideNet's initialisation (SideNet ``k`` of a cascade: ``seed + k``).
        **settings: any of :data:`sidenet.config.SETTINGS`, the fields of :class:`SideNetConfig` a
            user chooses: ``num_classes`` (needed only when the MainNet's class count cannot be read
            from it), ``hidden`` and ``pool_size`` (SideNet size, see :class:`SideNet`), ``threshold``,
            ``temperature`` and ``policy`` (the exit rule: ``max_softmax``, ``entropy`` or
            ``margin``), ``split_options`` (text encoders: ``{"features": "mean"}``), ``metadata``.

    The example input is built (or moved) onto the MainNet's device and floating dtype, and the SideNet
    is created there too, so float16, bfloat16 and CUDA MainNets work as they are (a MainNet on the 'meta'
    device, without weights, is refused with :class:`~sidenet.errors.SidenetError`). Once, on that example,
    ``rest(trunk(x))`` is compared with the model's own forward: a model whose ``forward`` does more
    than its modules (a subclass that rescales its input) raises :class:`SplitMismatchError`; a ready
    :class:`MainNetSplit` (e.g. a :class:`CallableSplit`) is trusted as given. The example's sample
    shape and dtype go into ``model.config`` (``input_shape``, ``input_dtype``) so that saving stores them.

    Example::

        model = sidenet.attach(torchvision.models.resnet18(weights="DEFAULT"), "layer1", input_shape=(3, 224, 224))
        model.fit(train_loader)
        curve = sidenet.sweep(model, val_loader)

        cascade = sidenet.attach(resnet, ["layer1", "layer2"], input_shape=(3, 224, 224))
    """
    taps = list(tap) if isinstance(tap, (list, tuple)) else [tap]
    if not taps:
        raise ValueError("attach() needs at least one tap")
    if any(isinstance(one, MainNetSplit) for one in taps):
        raise TapError(
            "a MainNetSplit (e.g. a CallableSplit) is cut already: pass it in place of the MainNet, "
            "sidenet.attach(split, input_shape=...), not as the tap"
        )
    if len(taps) > 1 and isinstance(mainnet, MainNetSplit):
        raise ValueError("a cascade is attached to a MainNet, not to a ready MainNetSplit (which has one tap)")
    parts = []
    example_input_given = example_input
    for k, one in enumerate(taps):
        split, sidenet, settings_k, example = _attach_one(
            mainnet, one, config, input_shape, example_input_given, seed + k, settings
        )
        if parts:  # the segment between the previous tap and this one must reproduce this trunk
            previous, _, _, previous_example = parts[-1]
            with torch.no_grad():
                reached = previous.advance(previous.trunk(previous_example), split)
                expected = split.trunk(example)
            _check_same_state(reached, expected, previous.tap, split.tap)
        parts.append((split, sidenet, settings_k, example))
    splits, sidenets, configs = ([part[i] for part in parts] for i in range(3))
    if len(parts) == 1:
        return AdaptiveModel(splits[0], sidenets[0], config=configs[0])
    return AdaptiveModel(splits, sidenets, config=configs)


def _check_same_state(reached: Any, expected: Any, before: Any, tap: Any) -> None:
    """``SplitMismatchError`` unless running the segment from tap ``before`` to ``tap`` gave the trunk's state."""
    for got, want in zip(tree_leaves(reached), tree_leaves(expected), strict=True):
        if isinstance(want, torch.Tensor) and not torch.allclose(got.float(), want.float(), rtol=1e-3, atol=1e-4):
            raise SplitMismatchError(
                f"the MainNet's segment from tap {before!r} to tap {tap!r} does not reproduce its state at {tap!r}"
            )


def _attach_one(
    mainnet: nn.Module | MainNetSplit,
    tap: str | int | None,
    config: SideNetConfig | None,
    input_shape: Any,
    example_input: Any,
    seed: int,
    settings: Mapping[str, Any],
) -> tuple[MainNetSplit, SideNet, SideNetConfig, Any]:
    """The split at ``tap``, a fresh SideNet there, its config and the one-sample example it was sized on."""
    config = _attach_config(tap, config, settings)
    split = split_mainnet(mainnet, config.tap, **config.split_options).eval()
    device, dtype = mainnet_placement(split, "attach")
    if example_input is not None:
        example_input = to_placement(example_input, device, dtype)
    elif input_shape is not None:
        example_input = example_from_shape(checked_input_shape(input_shape), None, device, dtype)
    elif config.input_shape is not None:
        example_input = example_from_shape(checked_input_shape(config.input_shape), config.input_dtype, device, dtype)
    else:
        example_input = split.dummy_input()
        if example_input is None:
            raise ValueError("attach() needs input_shape (one sample's shape) or example_input (a batch)")
    split.validate_input(example_input)
    example = split.example(example_input)
    if not isinstance(mainnet, MainNetSplit) and split.mainnet is not None:
        check_split(split, example)
    classes = split.num_classes if split.num_classes is not None else config.num_classes
    if classes is None:
        raise ValueError("the MainNet's class count is unknown: pass num_classes")
    if config.num_classes is not None and config.num_classes != classes:
        raise ValueError(f"num_classes={config.num_classes} but the MainNet predicts {classes} classes")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # Initialised in float32 on the CPU whatever the MainNet: the same seed gives the same SideNet.
        sidenet = SideNet(feature_shape(split, example), classes, config.hidden, config.pool_size)
    sidenet = sidenet.to(device=device, dtype=dtype)
    tensor = isinstance(example, torch.Tensor)
    config = replace(
        config,
        tap=split.tap,  # the split's own spelling; a ready split keeps its tap whatever tap was given
        feature_shape=list(sidenet.feature_shape),
        num_classes=classes,
        input_shape=list(example.shape[1:]) if tensor else None,
        input_dtype=str(example.dtype).removeprefix("torch.") if tensor else None,
    )
    return split, sidenet, config, example
