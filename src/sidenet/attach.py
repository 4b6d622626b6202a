"""Attach a SideNet to a MainNet, save only the SideNet, and load it back onto the same MainNet
(the shape of peft's ``get_peft_model`` / ``save_pretrained`` / ``from_pretrained``).

Saved folders are written atomically (a complete folder is swapped in, or the old one stays) and
checked on loading: checksums of the weight files and of the config's structural fields (see
:mod:`sidenet.config`), the MainNet's fingerprint, the split against the MainNet's own forward, and
the feature shape at the tap.
"""

from __future__ import annotations

import json
import operator
import shutil
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file
from torch import nn

from sidenet.config import (
    CONFIG_NAME,
    REFERENCE_NAME,
    WEIGHTS_NAME,
    CheckpointError,
    SideNetConfig,
    file_sha256,
    mainnet_fingerprint,
    replace_folder,
)
from sidenet.head import SideNet
from sidenet.routing import AdaptiveModel
from sidenet.splits import MainNetSplit, split_mainnet

__all__ = ["attach", "save_sidenet", "load_sidenet", "MainNetMismatchError", "CheckpointError", "SplitMismatchError"]


class MainNetMismatchError(ValueError):
    """A saved SideNet is being loaded onto a MainNet other than the one it was trained on."""


class SplitMismatchError(ValueError):
    """The splitter's ``rest(trunk(x))`` does not compute what the MainNet's own ``forward`` computes."""


# -- device, dtype and example inputs ------------------------------------------------------------------
def _placement(split: MainNetSplit) -> tuple[torch.device, torch.dtype]:
    """Device and floating dtype of the MainNet: those of its first floating parameter (or buffer).
    A MainNet without one (dynamically quantised, or a split with no module) takes CPU default floats."""
    module = split.mainnet if split.mainnet is not None else split
    tensors = [*module.parameters(), *module.buffers()]
    reference = next((t for t in tensors if t.is_floating_point()), None)
    if reference is None:
        return (tensors[0].device if tensors else torch.device("cpu")), torch.get_default_dtype()
    return reference.device, reference.dtype


def _to_placement(x: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """``x`` with every tensor on ``device`` and every floating tensor in ``dtype``; integer tensors
    (token ids, masks) keep their dtype. Mappings become dicts (a tokenizer's BatchEncoding too)."""
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=dtype) if x.is_floating_point() else x.to(device)
    if isinstance(x, Mapping):
        return {key: _to_placement(value, device, dtype) for key, value in x.items()}
    if type(x) in (list, tuple):
        return type(x)(_to_placement(value, device, dtype) for value in x)
    return x


def _example_from_shape(shape: Sequence[int], dtype_name: str | None, device: torch.device, dtype: torch.dtype) -> Any:
    """A batch of one sample of ``shape``: uniform noise for float inputs (varied values, so that the
    split check can see a forward that rescales its input, as zeros might not), zeros for integer
    inputs (index 0 is valid for every embedding). Seeded: the global RNG is left alone."""
    kind = getattr(torch, dtype_name) if dtype_name else torch.float32
    if not kind.is_floating_point:
        return torch.zeros(1, *shape, dtype=kind, device=device)
    noise = torch.rand(1, *shape, generator=torch.Generator().manual_seed(0))
    return noise.to(device=device, dtype=dtype)


def _checked_input_shape(input_shape: Any) -> list[int]:
    try:
        # operator.index takes ints and integer types (numpy's, torch.Size entries), not floats.
        shape = None if isinstance(input_shape, str) else [operator.index(d) for d in input_shape]
    except TypeError:
        shape = None
    if shape is None or any(d < 1 for d in shape):
        raise ValueError(
            f"input_shape must be one sample's shape, a sequence of positive integers, got {input_shape!r}"
        )
    return shape


def _feature_shape(split: MainNetSplit, example: Any) -> list[int]:
    with torch.no_grad():
        features = split.features(split.trunk(example))
    return list(features.shape[1:])


def _check_split(split: MainNetSplit, example: Any) -> None:
    """Raise :class:`SplitMismatchError` unless ``rest(trunk(x))`` equals the MainNet's own forward on
    ``example`` (eval mode, no autograd), to a tolerance relative to the logits' scale and dtype."""
    name = type(split.mainnet).__name__
    fix = (
        "Cut it by hand with sidenet.CallableSplit(trunk=..., rest=..., mainnet=model), whose trunk and rest "
        "together do what the forward does, and pass that split instead of the model."
    )
    with torch.no_grad():
        got = split(example)
        try:
            expected = split.mainnet_logits(example)
        except Exception as exc:  # any failure of the model's own call means the split cannot be checked
            raise SplitMismatchError(
                f"{name}'s own forward fails on the input the {type(split).__name__} splitter takes ({exc}); "
                f"the splitter does not reproduce the model's forward. {fix}"
            ) from exc
    if not isinstance(expected, torch.Tensor) or expected.shape != got.shape:
        found = f"shape {tuple(expected.shape)}" if isinstance(expected, torch.Tensor) else type(expected).__name__
        raise SplitMismatchError(
            f"{name}'s own forward returns {found} where the {type(split).__name__} splitter gives logits of shape "
            f"{tuple(got.shape)}: the model's forward does something the splitter does not reproduce. {fix}"
        )
    # Low-precision MainNets may round the two paths differently: a few units of their precision.
    precision = torch.finfo(got.dtype).eps if got.is_floating_point() else 0.0
    tolerance = max(1e-4, 4 * precision)
    got, expected = got.double(), expected.double()
    scale = float(expected.abs().nan_to_num(0.0, 0.0, 0.0).max()) if expected.numel() else 0.0
    if not torch.allclose(got, expected, rtol=tolerance, atol=tolerance * max(1.0, scale), equal_nan=True):
        diff = float((got - expected).abs().nan_to_num(float("inf")).max())
        raise SplitMismatchError(
            f"{name}'s forward does something the {type(split).__name__} splitter does not reproduce: on an "
            f"example input, rest(trunk(x)) differs from model(x) by up to {diff:.3g} (logits up to {scale:.3g}). "
            f"The splitter matches module names, so a forward that adds a step (input scaling, another head) "
            f"is not seen. {fix}"
        )


# -- attach --------------------------------------------------------------------------------------------
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

    The example input is built (or moved) onto the MainNet's device and floating dtype, and the SideNet
    is created there too, so float16, bfloat16 and CUDA MainNets work as they are. Once, on that example,
    ``rest(trunk(x))`` is compared with the model's own forward: a model whose ``forward`` does more
    than its modules (a subclass that rescales its input) raises :class:`SplitMismatchError`; a ready
    :class:`MainNetSplit` (e.g. a :class:`CallableSplit`) is trusted as given. The example's sample
    shape and dtype are kept (``input_shape_``, ``input_dtype_``) so that saving stores them.

    Example::

        model = sidenet.attach(torchvision.models.resnet18(weights="DEFAULT"), "layer1", input_shape=(3, 224, 224))
        model.fit(train_loader)
        curve = sidenet.sweep(model, val_loader)
    """
    split = split_mainnet(mainnet, tap, **dict(split_options or {})).eval()
    device, dtype = _placement(split)
    if example_input is not None:
        example_input = _to_placement(example_input, device, dtype)
    elif input_shape is not None:
        example_input = _example_from_shape(_checked_input_shape(input_shape), None, device, dtype)
    else:
        example_input = split.dummy_input()
        if example_input is None:
            raise ValueError("attach() needs input_shape (one sample's shape) or example_input (a batch)")
    split.validate_input(example_input)
    example = split.example(example_input)
    if not isinstance(mainnet, MainNetSplit) and split.mainnet is not None:
        _check_split(split, example)
    classes = split.num_classes if split.num_classes is not None else num_classes
    if classes is None:
        raise ValueError("the MainNet's class count is unknown: pass num_classes")
    if num_classes is not None and num_classes != classes:
        raise ValueError(f"num_classes={num_classes} but the MainNet predicts {classes} classes")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # Initialised in float32 on the CPU whatever the MainNet: the same seed gives the same SideNet.
        sidenet = SideNet(_feature_shape(split, example), classes, hidden, pool_size)
    sidenet = sidenet.to(device=device, dtype=dtype)
    model = AdaptiveModel(split, sidenet, threshold=threshold, temperature=temperature, policy=policy)
    tensor = isinstance(example, torch.Tensor)
    model.input_shape_ = list(example.shape[1:]) if tensor else None
    model.input_dtype_ = str(example.dtype).removeprefix("torch.") if tensor else None
    return model


# -- save ----------------------------------------------------------------------------------------------
def _checked_metadata(metadata: Any, history: Any) -> dict[str, Any]:
    """The config's metadata, refused before anything is written if JSON cannot store it as it is."""
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, Mapping):
        raise ValueError(f"metadata must be a dict of JSON values, got {type(metadata).__name__}")
    merged = {"history": history, **metadata}
    for key, value in merged.items():
        if not isinstance(key, str):
            raise ValueError(f"metadata keys must be strings (JSON object keys), got {key!r}")
        try:
            json.dumps(value)
        except (TypeError, ValueError) as exc:  # ValueError: a circular reference
            raise ValueError(f"metadata[{key!r}] is not JSON-serialisable: {exc}") from exc
    return merged


def save_sidenet(model: AdaptiveModel, folder: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write only the SideNet (``sidenet.safetensors``) and its config (``sidenet_config.json``), plus
    the reference confidences of the shift check (``reference.safetensors``) when the model has them.

    The save is atomic: everything is written to a temporary folder beside ``folder``, which then
    replaces it; a failing save leaves an earlier save in ``folder`` as it was. Other files in the
    folder are kept. Tensors are written from the CPU whatever the SideNet's device. Raises
    ``ValueError`` before writing anything for metadata that JSON cannot store.
    """
    folder = Path(folder)
    merged = _checked_metadata(metadata, model.history_)
    # The real folder (through a symlink) is the one replaced, and its parent holds the staging folder.
    target = folder.resolve()
    if target.exists() and not target.is_dir():
        raise ValueError(f"cannot save a SideNet to {folder}: it is a file, not a folder")
    if target == Path.cwd() or target in Path.cwd().parents:
        raise ValueError(f"cannot save a SideNet to {folder}: it holds the working directory; give a subfolder")
    sidenet = model.sidenet
    mainnet = model.split.mainnet
    tensors = {name: t.detach().cpu().contiguous() for name, t in sidenet.state_dict().items()}
    target.parent.mkdir(parents=True, exist_ok=True)
    # mkdir, not mkdtemp: the folder gets the usual permissions (mkdtemp's are owner-only).
    staging = target.with_name(f".{target.name}.saving-{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    try:
        save_file(tensors, str(staging / WEIGHTS_NAME))
        reference_sha256 = None
        if model.reference_confidence is not None:
            reference = staging / REFERENCE_NAME
            save_file({"confidence": model.reference_confidence.detach().cpu().contiguous()}, str(reference))
            reference_sha256 = file_sha256(reference.read_bytes())
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
            input_shape=getattr(model, "input_shape_", None),
            input_dtype=getattr(model, "input_dtype_", None),
            weights_sha256=file_sha256((staging / WEIGHTS_NAME).read_bytes()),
            reference_sha256=reference_sha256,
            metadata=merged,
        )
        try:
            config.structure_sha256 = config.structure_digest()
            config.save(staging)
        except TypeError as exc:  # a split option or tap that JSON cannot store
            raise ValueError(f"cannot store the SideNet's config as JSON: {exc}") from exc
        replace_folder(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


# -- load ----------------------------------------------------------------------------------------------
def _read_tensors(path: Path, digest: str | None, folder: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, after checking its bytes against ``digest`` (None: format 1)."""
    if not path.is_file():
        raise CheckpointError(f"no {path.name} in {folder}")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    if digest is not None and file_sha256(data) != digest:
        raise CheckpointError(
            f"{path} is corrupt or not the file saved with its config: its sha256 is {file_sha256(data)[:12]}…, "
            f"{CONFIG_NAME} records {digest[:12]}…"
        )
    try:
        return load_safetensors(data)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is corrupt or not a safetensors file: {exc}") from exc


def _load_example(split: MainNetSplit, config: SideNetConfig, device: torch.device, dtype: torch.dtype) -> Any:
    """An input batch for the load-time checks: from the stored input shape, else the split's dummy;
    None when neither exists (a hand-built model of tensor inputs, or a format 1 folder)."""
    if config.input_shape is not None:
        return _example_from_shape(config.input_shape, config.input_dtype, device, dtype)
    dummy = split.dummy_input()
    return None if dummy is None else _to_placement(dummy, device, dtype)


def load_sidenet(
    mainnet: nn.Module | MainNetSplit, folder: str | Path, *, check_fingerprint: bool = True
) -> AdaptiveModel:
    """Rebuild the adaptive model from a saved SideNet folder and the MainNet it was trained on.

    The SideNet is placed on the MainNet's device and in its floating dtype. Checked before use: the
    config (every key, its types, its structural checksum), the weight files' checksums, the MainNet's
    fingerprint (unless ``check_fingerprint=False``), the split against the MainNet's own forward
    (skipped for a ready :class:`MainNetSplit`), and the feature shape at the tap.

    Raises:
        CheckpointError: the folder, config or weights are missing, corrupt or edited.
        MainNetMismatchError: ``mainnet`` is not the MainNet the SideNet was trained on.
        SplitMismatchError: the MainNet's forward does something its splitter does not reproduce.
    """
    folder = Path(folder)
    try:
        config = SideNetConfig.load(folder)
    except CheckpointError as exc:
        raise CheckpointError(f"cannot load SideNet config from {folder}: {exc}") from exc
    if config.format_version >= 2 and (config.weights_sha256 is None or config.structure_sha256 is None):
        raise CheckpointError(f"{folder / CONFIG_NAME} records no checksum (weights_sha256, structure_sha256)")
    tensors = _read_tensors(folder / WEIGHTS_NAME, config.weights_sha256, folder)
    reference = None
    if config.reference_sha256 is not None or (config.format_version < 2 and (folder / REFERENCE_NAME).is_file()):
        reference = _read_tensors(folder / REFERENCE_NAME, config.reference_sha256, folder)
    elif (folder / REFERENCE_NAME).exists():
        raise CheckpointError(f"{folder / REFERENCE_NAME} is not part of the save recorded in {CONFIG_NAME}")
    split = split_mainnet(mainnet, config.tap, **config.split_options).eval()
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
    device, dtype = _placement(split)
    example = _load_example(split, config, device, dtype)
    if example is not None:
        if not isinstance(mainnet, MainNetSplit) and base is not None:
            _check_split(split, example)
        found_shape = _feature_shape(split, example)
        if found_shape != list(config.feature_shape):
            raise CheckpointError(
                f"the MainNet given has feature shape {tuple(found_shape)} at tap {config.tap!r}, but the SideNet "
                f"in {folder} was built for {config.feature_shape} (its config's feature_shape): a different "
                "MainNet, or a config edited by hand"
            )
    try:
        sidenet = SideNet(config.feature_shape, config.num_classes, config.hidden, config.pool_size)
        sidenet.load_state_dict(tensors)
    except (RuntimeError, ValueError) as exc:
        raise CheckpointError(f"{folder / WEIGHTS_NAME} does not match its config: {exc}") from exc
    sidenet = sidenet.to(device=device, dtype=dtype)
    model = AdaptiveModel(
        split, sidenet, threshold=config.threshold, temperature=config.temperature, policy=config.policy
    )
    model.input_shape_, model.input_dtype_ = config.input_shape, config.input_dtype
    if reference is not None:
        try:
            model.set_reference(reference["confidence"])
        except (KeyError, ValueError) as exc:
            raise CheckpointError(f"{folder / REFERENCE_NAME} is corrupt: {exc}") from exc
    history = config.metadata.get("history", [])
    if not isinstance(history, list):
        raise CheckpointError(f"{folder / CONFIG_NAME}: metadata['history'] must be a list, got {history!r}")
    model.history_ = history
    model.eval()
    return model
