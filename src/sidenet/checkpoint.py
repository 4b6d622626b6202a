"""Save only the SideNet and load it back onto the same MainNet (the shape of peft's
``save_pretrained`` / ``from_pretrained``): the folder holds the SideNet's weights, ``model.config``
as JSON and, when set, the reference confidences of the shift check.

Saved folders are written atomically (a complete folder is swapped in with renames, or the old one
stays) and checked on loading: checksums of the weight files and of the config's structural fields
(see :mod:`sidenet.config`), the MainNet's fingerprint, the split against the MainNet's own forward,
and the feature shape at the tap.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file
from torch import nn

from sidenet.config import (
    CASCADE_FOLDER,
    CASCADE_NAME,
    CONFIG_NAME,
    REFERENCE_NAME,
    WEIGHTS_NAME,
    SideNetConfig,
    file_sha256,
    mainnet_fingerprint,
)
from sidenet.errors import CheckpointError, MainNetMismatchError, SidenetError
from sidenet.head import SideNet
from sidenet.routing import AdaptiveModel
from sidenet.saved_folder import replace_folder
from sidenet.splits import MainNetSplit, split_mainnet
from sidenet.splits.probe import check_split, example_from_shape, feature_shape, placement, to_placement

__all__ = ["save_sidenet", "load_sidenet", "replace_folder", "mainnet_placement"]


# -- where the MainNet lives ---------------------------------------------------------------------------
def mainnet_placement(split: MainNetSplit, action: str) -> tuple[torch.device, torch.dtype]:
    """Device and floating dtype of the MainNet (see :func:`sidenet.splits.probe.placement`), where
    example inputs and the SideNet go; :class:`~sidenet.errors.SidenetError` for a MainNet on the 'meta'
    device, named by ``action`` (``"attach"``, ``"load_sidenet"``). Such a MainNet has shapes but no
    weights (``torch.device("meta")``, ``init_empty_weights``): nothing can be checked, measured or
    trained on it, and a SideNet built there would hold no weights either."""
    module = split.mainnet if split.mainnet is not None else split
    if any(t.is_meta for t in (*module.parameters(), *module.buffers())):
        raise SidenetError(
            f"{action}() needs a MainNet with real weights, but {type(module).__name__} has tensors on the "
            "'meta' device (shapes without values). Materialise it first, e.g. mainnet.to_empty(device='cpu') "
            "and then mainnet.load_state_dict(weights), or load it with its weights."
        )
    return placement(split)


# -- save ----------------------------------------------------------------------------------------------
def _checked_metadata(kept: Mapping[str, Any], metadata: Any, history: Any) -> dict[str, Any]:
    """The metadata to save: the model's own (``kept``), its training history, and the caller's
    ``metadata`` over both; refused before anything is written if JSON cannot store it as it is."""
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, Mapping):
        raise ValueError(f"metadata must be a dict of JSON values, got {type(metadata).__name__}")
    merged = {**kept, "history": history, **metadata}
    for key, value in merged.items():
        if not isinstance(key, str):
            raise ValueError(f"metadata keys must be strings (JSON object keys), got {key!r}")
        try:
            json.dumps(value)
        except (TypeError, ValueError) as exc:  # ValueError: a circular reference
            raise ValueError(f"metadata[{key!r}] is not JSON-serialisable: {exc}") from exc
    return merged


def save_sidenet(model: AdaptiveModel, folder: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write only the SideNet (``sidenet.safetensors``) and ``model.config`` (``sidenet_config.json``,
    with the live exit rule, the MainNet's fingerprint and the checksums), plus the reference
    confidences of the shift check (``reference.safetensors``) when the model has them.

    ``metadata`` is saved over the model's own (``model.config.metadata``, which a loaded model keeps)
    and its training history (``model.history_``). The save is atomic: everything is written to a
    temporary folder beside ``folder``, which then replaces it; a failing save leaves an earlier save
    in ``folder`` as it was. Other files in the folder are kept. Tensors are written from the CPU
    whatever the SideNet's device. Raises ``ValueError`` before writing anything for metadata that
    JSON cannot store.
    """
    folder = Path(folder)
    config = model.config
    merged = _checked_metadata(config.metadata, metadata, model.history_)
    # The real folder (through a symlink) is the one replaced, and its parent holds the staging folder.
    target = folder.resolve()
    if target.exists() and not target.is_dir():
        raise ValueError(f"cannot save a SideNet to {folder}: it is a file, not a folder")
    if target == Path.cwd() or target in Path.cwd().parents:
        raise ValueError(f"cannot save a SideNet to {folder}: it holds the working directory; give a subfolder")
    mainnet = model.split.mainnet
    target.parent.mkdir(parents=True, exist_ok=True)
    # mkdir, not mkdtemp: the folder gets the usual permissions (mkdtemp's are owner-only).
    staging = target.with_name(f".{target.name}.saving-{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    try:
        reference = model.reference_confidence
        first = _write_part(staging, config, model.sidenet, reference, mainnet, merged)
        if model.num_taps > 1:
            _write_cascade(staging, model, first, mainnet)
        replace_folder(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def _write_part(
    folder: Path,
    config: SideNetConfig,
    sidenet: SideNet,
    reference: torch.Tensor | None,
    mainnet: nn.Module | None,
    metadata: dict[str, Any],
) -> SideNetConfig:
    """Write one SideNet's weights, reference confidences (when given) and config into ``folder``;
    returns the config as written (with its checksums)."""
    tensors = {name: t.detach().cpu().contiguous() for name, t in sidenet.state_dict().items()}
    save_file(tensors, str(folder / WEIGHTS_NAME))
    reference_sha256 = None
    if reference is not None:
        path = folder / REFERENCE_NAME
        save_file({"confidence": reference.detach().cpu().contiguous()}, str(path))
        reference_sha256 = file_sha256(path.read_bytes())
    config = replace(
        config,
        mainnet_fingerprint=mainnet_fingerprint(mainnet) if mainnet is not None else "",
        weights_sha256=file_sha256((folder / WEIGHTS_NAME).read_bytes()),
        reference_sha256=reference_sha256,
        metadata=metadata,
    )
    config = replace(config, structure_sha256=None)
    try:
        config = replace(config, structure_sha256=config.structure_digest())
        config.save(folder)
    except TypeError as exc:  # a split option or tap that JSON cannot store
        raise ValueError(f"cannot store the SideNet's config as JSON: {exc}") from exc
    return config


def _write_cascade(staging: Path, model: AdaptiveModel, first: SideNetConfig, mainnet: nn.Module | None) -> None:
    """The later SideNets of a cascade, each saved as one SideNet in ``cascade/tap-K``, and
    ``cascade.json`` listing them with the checksums of their configs and of the first SideNet."""
    stages = []
    for k in range(1, model.num_taps):
        name = f"{CASCADE_FOLDER}/tap-{k}"
        part = staging / name
        part.mkdir(parents=True)
        _write_part(part, model.configs[k], model.sidenets[k], None, mainnet, {})
        stages.append({"folder": name, "config_sha256": file_sha256((part / CONFIG_NAME).read_bytes())})
    listing = {"format_version": 1, "first_weights_sha256": first.weights_sha256, "stages": stages}
    (staging / CASCADE_NAME).write_text(json.dumps(listing, indent=2, sort_keys=True))


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
        return example_from_shape(config.input_shape, config.input_dtype, device, dtype)
    dummy = split.dummy_input()
    return None if dummy is None else to_placement(dummy, device, dtype)


def _read_config(folder: Path) -> tuple[SideNetConfig, dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """The folder's config, SideNet weights and reference confidences (None: not saved), all checked
    against the config's checksums."""
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
    return config, tensors, reference


def _check_mainnet(
    mainnet: nn.Module | MainNetSplit,
    split: MainNetSplit,
    config: SideNetConfig,
    folder: Path,
    check_fingerprint: bool,
    saved_dtype: torch.dtype | None = None,
) -> None:
    """Refuse a split or MainNet other than the one the SideNet in ``folder`` was saved with.
    ``saved_dtype``, the dtype of the saved SideNet's weights (that of the MainNet it was saved on),
    only words the refusal of a MainNet cast to another dtype."""
    device, dtype = mainnet_placement(split, "load_sidenet")
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
            # The fingerprint covers dtypes and values, so a cast MainNet (trained in float32, served in
            # bfloat16) is another MainNet to it; say so, and how to load onto the cast one anyway.
            cast = (
                f" The SideNet was saved with a {str(saved_dtype).removeprefix('torch.')} MainNet and this one is "
                f"{str(dtype).removeprefix('torch.')}: a cast changes the fingerprint. If it is the same MainNet "
                "cast, load with check_fingerprint=False (the SideNet is cast likewise)."
                if saved_dtype is not None and saved_dtype != dtype
                else ""
            )
            raise MainNetMismatchError(
                f"the SideNet in {folder} was trained on a different MainNet "
                f"({config.mainnet_class}, fingerprint {config.mainnet_fingerprint[:12]}…) than the one given "
                f"({type(base).__name__}, fingerprint {found[:12]}…).{cast}"
            )
    example = _load_example(split, config, device, dtype)
    if example is None:
        return
    if not isinstance(mainnet, MainNetSplit) and base is not None:
        check_split(split, example)
    found_shape = feature_shape(split, example)
    if found_shape != list(config.feature_shape):
        raise CheckpointError(
            f"the MainNet given has feature shape {tuple(found_shape)} at tap {config.tap!r}, but the SideNet "
            f"in {folder} was built for {config.feature_shape} (its config's feature_shape): a different "
            "MainNet, or a config edited by hand"
        )


def load_sidenet(
    mainnet: nn.Module | MainNetSplit, folder: str | Path, *, check_fingerprint: bool = True
) -> AdaptiveModel:
    """Rebuild the adaptive model from a saved SideNet folder and the MainNet it was trained on.

    The SideNet is placed on the MainNet's device and in its floating dtype; the model's config is the
    saved one (its metadata in ``model.config.metadata``, the training history in ``model.history_``).
    Checked before use: the config (every key, its types, its structural checksum), the weight files'
    checksums, the MainNet's fingerprint (unless ``check_fingerprint=False``), the split against the
    MainNet's own forward (skipped for a ready :class:`MainNetSplit`), and the feature shape at the tap.

    Raises:
        CheckpointError: the folder, config or weights are missing, corrupt or edited.
        MainNetMismatchError: ``mainnet`` is not the MainNet the SideNet was trained on.
        SplitMismatchError: the MainNet's forward does something its splitter does not reproduce.
    """
    folder = Path(folder)
    split, sidenet, config, reference = _load_part(mainnet, folder, check_fingerprint)
    history = config.metadata.get("history", [])
    if not isinstance(history, list):
        raise CheckpointError(f"{folder / CONFIG_NAME}: metadata['history'] must be a list, got {history!r}")
    # The history lives on the model (fit replaces it), the rest of the metadata in its config.
    metadata = {key: value for key, value in config.metadata.items() if key != "history"}
    parts = [(split, sidenet, replace(config, metadata=metadata))]
    for part in _cascade_folders(folder, config):
        if isinstance(mainnet, MainNetSplit):
            raise CheckpointError(f"{folder} holds a cascade of SideNets: load it onto the MainNet, not onto a split")
        later_split, later_sidenet, later_config, _ = _load_part(mainnet, part, check_fingerprint)
        parts.append((later_split, later_sidenet, later_config))
    splits, sidenets, configs = ([part[i] for part in parts] for i in range(3))
    if len(parts) == 1:
        model = AdaptiveModel(splits[0], sidenets[0], config=configs[0])
    else:
        model = AdaptiveModel(splits, sidenets, config=configs)
    if reference is not None:
        try:
            model.set_reference(reference["confidence"])
        except (KeyError, ValueError) as exc:
            raise CheckpointError(f"{folder / REFERENCE_NAME} is corrupt: {exc}") from exc
    model.history_ = history
    model.eval()
    return model


def _load_part(
    mainnet: nn.Module | MainNetSplit, folder: Path, check_fingerprint: bool
) -> tuple[MainNetSplit, SideNet, SideNetConfig, dict[str, torch.Tensor] | None]:
    """One saved SideNet of ``folder``, checked against ``mainnet``: its split, the SideNet on the
    MainNet's device and dtype, its config and its reference confidences (None when not saved)."""
    config, tensors, reference = _read_config(folder)
    split = split_mainnet(mainnet, config.tap, **config.split_options).eval()
    saved_dtype = next((t.dtype for t in tensors.values() if t.is_floating_point()), None)
    _check_mainnet(mainnet, split, config, folder, check_fingerprint, saved_dtype)
    try:
        sidenet = SideNet(config.feature_shape, config.num_classes, config.hidden, config.pool_size)
        sidenet.load_state_dict(tensors)
    except (RuntimeError, ValueError) as exc:
        raise CheckpointError(f"{folder / WEIGHTS_NAME} does not match its config: {exc}") from exc
    device, dtype = placement(split)
    return split, sidenet.to(device=device, dtype=dtype), config, reference


def _cascade_folders(folder: Path, first: SideNetConfig) -> list[Path]:
    """The folders of a saved cascade's later SideNets, from ``cascade.json`` (none for one SideNet),
    checked against the checksums it records."""
    listing_path = folder / CASCADE_NAME
    if not listing_path.is_file():
        return []
    try:
        listing = json.loads(listing_path.read_text())
        stages = listing["stages"]
        recorded = listing["first_weights_sha256"]
        named = [(str(stage["folder"]), str(stage["config_sha256"])) for stage in stages]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{listing_path} is corrupt: {exc}") from exc
    if recorded != first.weights_sha256:
        raise CheckpointError(f"{listing_path} belongs to another save than the SideNet in {folder}")
    folders = []
    for name, digest in named:
        part = (folder / name).resolve()
        if folder.resolve() not in part.parents:
            raise CheckpointError(f"{listing_path} names a folder outside {folder}: {name!r}")
        config_path = part / CONFIG_NAME
        if not config_path.is_file() or file_sha256(config_path.read_bytes()) != digest:
            raise CheckpointError(
                f"{config_path} is missing or was changed after saving (checksum mismatch); a cascade's later "
                "SideNets are not edited by hand: load it, set model.thresholds and save it again"
            )
        folders.append(part)
    return folders
