"""Attach a SideNet to a MainNet, save only the SideNet, and load it back onto the same MainNet
(the shape of peft's ``get_peft_model`` / ``save_pretrained`` / ``from_pretrained``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from sidenet.config import REFERENCE_NAME, WEIGHTS_NAME, SideNetConfig, mainnet_fingerprint
from sidenet.head import SideNet
from sidenet.routing import AdaptiveModel
from sidenet.splits import MainNetSplit, split_mainnet

__all__ = ["attach", "save_sidenet", "load_sidenet", "MainNetMismatchError", "CheckpointError"]


class MainNetMismatchError(ValueError):
    """A saved SideNet is being loaded onto a MainNet other than the one it was trained on."""


class CheckpointError(ValueError, FileNotFoundError):
    """A saved SideNet folder is missing, incomplete or corrupt."""


def _feature_shape(split: MainNetSplit, example: Any) -> list[int]:
    with torch.no_grad():
        features = split.features(split.trunk(example))
    return list(features.shape[1:])


def attach(
    mainnet: nn.Module | MainNetSplit,
    tap: str | int,
    *,
    input_shape: Sequence[int] | None = None,
    example_input: Any = None,
    num_classes: int | None = None,
    hidden: int = 256,
    pool_size: int = 4,
    threshold: float = 0.9,
    temperature: float = 1.0,
    policy: str = "max_softmax",
    seed: int = 0,
    split_options: Mapping[str, Any] | None = None,
) -> AdaptiveModel:
    """Cut ``mainnet`` at ``tap`` and attach a fresh SideNet there.

    Args:
        mainnet: a pretrained model (or a ready :class:`MainNetSplit`); it is put in eval mode.
        tap: where to attach; an unknown tap raises an error listing the valid ones.
        input_shape: the shape of one input sample, e.g. ``(3, 224, 224)``; or give ``example_input``
            (a batch) instead. Used once to size the SideNet. Text MainNets need neither.
        num_classes: needed only when the MainNet's class count cannot be read from it.
        hidden, pool_size: SideNet size (see :class:`SideNet`).
        threshold, temperature, policy: the exit rule (``policy``: ``max_softmax``, ``entropy`` or ``margin``).
        seed: seeds the SideNet's initialisation.
        split_options: settings of the splitter (text encoders: ``{"features": "mean"}``).

    Example::

        model = sidenet.attach(torchvision.models.resnet18(weights="DEFAULT"), "layer1", input_shape=(3, 224, 224))
        model.fit(train_loader)
        curve = sidenet.sweep(model, val_loader)
    """
    split = split_mainnet(mainnet, tap, **dict(split_options or {})).eval()
    if example_input is None:
        example_input = torch.zeros(1, *input_shape) if input_shape is not None else split.dummy_input()
        if example_input is None:
            raise ValueError("attach() needs input_shape (one sample's shape) or example_input (a batch)")
    split.validate_input(example_input)
    classes = split.num_classes if split.num_classes is not None else num_classes
    if classes is None:
        raise ValueError("the MainNet's class count is unknown: pass num_classes")
    if num_classes is not None and num_classes != classes:
        raise ValueError(f"num_classes={num_classes} but the MainNet predicts {classes} classes")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sidenet = SideNet(_feature_shape(split, split.example(example_input)), classes, hidden, pool_size)
    return AdaptiveModel(split, sidenet, threshold=threshold, temperature=temperature, policy=policy)


def save_sidenet(model: AdaptiveModel, folder: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write only the SideNet (``sidenet.safetensors``) and its config (``sidenet_config.json``), plus
    the reference confidences of the shift check (``reference.safetensors``) when the model has them."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sidenet = model.sidenet
    mainnet = model.split.mainnet
    config = SideNetConfig(
        tap=model.tap,
        split_options=model.split.options(),
        feature_shape=list(sidenet.feature_shape),
        num_classes=sidenet.num_classes,
        hidden=sidenet.hidden,
        pool_size=sidenet.pool_size,
        threshold=model.threshold,
        temperature=model.temperature,
        policy=model.policy_kind,
        mainnet_fingerprint=mainnet_fingerprint(mainnet) if mainnet is not None else "",
        mainnet_class=type(mainnet).__name__ if mainnet is not None else "",
        metadata={"history": model.history_, **(metadata or {})},
    )
    tensors = {name: t.detach().cpu().contiguous() for name, t in sidenet.state_dict().items()}
    save_file(tensors, str(folder / WEIGHTS_NAME))
    reference = folder / REFERENCE_NAME
    if model.reference_confidence is not None:
        save_file({"confidence": model.reference_confidence.contiguous()}, str(reference))
    elif reference.exists():
        reference.unlink()  # a stale reference from an earlier save would describe another SideNet
    config.save(folder)
    return folder


def load_sidenet(
    mainnet: nn.Module | MainNetSplit, folder: str | Path, *, check_fingerprint: bool = True
) -> AdaptiveModel:
    """Rebuild the adaptive model from a saved SideNet folder and the MainNet it was trained on.

    Raises:
        CheckpointError: the folder, config or weights are missing or corrupt.
        MainNetMismatchError: ``mainnet`` is not the MainNet the SideNet was trained on.
    """
    folder = Path(folder)
    try:
        config = SideNetConfig.load(folder)
    except (FileNotFoundError, ValueError, TypeError) as exc:
        raise CheckpointError(f"cannot load SideNet config from {folder}: {exc}") from exc
    split = split_mainnet(mainnet, config.tap, **config.split_options)
    if str(split.tap) != str(config.tap):
        raise CheckpointError(
            f"the SideNet in {folder} was trained at tap {config.tap!r}, the split given is at {split.tap!r}"
        )
    if split.options() != config.split_options:
        raise CheckpointError(
            f"the SideNet in {folder} was saved with split options {config.split_options}, "
            f"the split given has {split.options()}"
        )
    base = split.mainnet
    if check_fingerprint and config.mainnet_fingerprint and base is not None:
        found = mainnet_fingerprint(base)
        if found != config.mainnet_fingerprint:
            raise MainNetMismatchError(
                f"the SideNet in {folder} was trained on a different MainNet "
                f"({config.mainnet_class}, fingerprint {config.mainnet_fingerprint[:12]}…) than the one given "
                f"({type(base).__name__}, fingerprint {found[:12]}…)"
            )
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"no {WEIGHTS_NAME} in {folder}")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{weights} is corrupt or not a safetensors file: {exc}") from exc
    sidenet = SideNet(config.feature_shape, config.num_classes, config.hidden, config.pool_size)
    try:
        sidenet.load_state_dict(tensors)
    except RuntimeError as exc:
        raise CheckpointError(f"{weights} does not match its config: {exc}") from exc
    model = AdaptiveModel(
        split, sidenet, threshold=config.threshold, temperature=config.temperature, policy=config.policy
    )
    reference = folder / REFERENCE_NAME
    if reference.is_file():
        try:
            model.set_reference(load_file(str(reference))["confidence"])
        except (SafetensorError, OSError, KeyError, ValueError) as exc:
            raise CheckpointError(f"{reference} is corrupt: {exc}") from exc
    model.history_ = list(config.metadata.get("history", []))
    model.eval()
    return model
