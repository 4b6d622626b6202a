"""``SideNetConfig``: every setting of an attached SideNet, saved as JSON beside its weights, and the
fingerprint that ties a saved SideNet to the exact MainNet it was trained on.

A saved config is trusted only as far as it can be checked: every key is required (only the free-form
``metadata`` may be left out), every value is type-checked, and ``structure_sha256`` covers the fields
that decide which layer the SideNet reads and how its weights are laid out (:data:`STRUCTURAL_FIELDS`),
together with the checksums of the weight files. The exit rule (``threshold``, ``temperature``,
``policy``), ``mainnet_class`` and ``metadata`` stay out of it on purpose, so that they may be tuned
by hand. The checksums catch corruption and accidental edits; they are not a signature (anyone can
recompute them).

A save writes a complete folder beside the old one and swaps it in with renames
(:func:`replace_folder`), so that a failing save never leaves new weights beside an old config.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sidenet.policy import validate_policy, validate_threshold

__all__ = [
    "SideNetConfig", "CheckpointError", "mainnet_fingerprint", "file_sha256", "CONFIG_NAME", "WEIGHTS_NAME",
    "REFERENCE_NAME", "FORMAT_VERSION", "REQUIRED_KEYS", "STRUCTURAL_FIELDS", "SAVED_FILES", "replace_folder",
]  # fmt: skip

CONFIG_NAME = "sidenet_config.json"
WEIGHTS_NAME = "sidenet.safetensors"
REFERENCE_NAME = "reference.safetensors"  # calibration confidences for the shift check (optional)
# 2: checksums, the input sample's shape and dtype, and every key required. Format 1 (sidenet 0.1.0)
# folders still load, without those checks, but every key format 1 wrote is required.
FORMAT_VERSION = 2

_V1_KEYS = (
    "tap", "split_options", "feature_shape", "num_classes", "hidden", "pool_size", "threshold", "temperature",
    "policy", "mainnet_fingerprint", "mainnet_class", "format_version",
)  # fmt: skip
REQUIRED_KEYS: dict[int, tuple[str, ...]] = {
    1: _V1_KEYS,
    2: (*_V1_KEYS, "input_shape", "input_dtype", "weights_sha256", "reference_sha256", "structure_sha256"),
}
# What ``structure_sha256`` covers: editing any of these by hand makes the folder fail to load.
STRUCTURAL_FIELDS = (
    "tap", "split_options", "feature_shape", "num_classes", "hidden", "pool_size", "mainnet_fingerprint",
    "input_shape", "input_dtype", "weights_sha256", "reference_sha256",
)  # fmt: skip


# The files a save writes; anything else in the folder (the CLI's plots and reports) is the user's.
SAVED_FILES = (CONFIG_NAME, WEIGHTS_NAME, REFERENCE_NAME)


class CheckpointError(ValueError, FileNotFoundError):
    """A saved SideNet folder is missing, incomplete or corrupt."""


def mainnet_fingerprint(mainnet: nn.Module) -> str:
    """SHA-256 over the MainNet's state dict (names, dtypes, shapes and values), as hex."""
    digest = hashlib.sha256()
    for name, tensor in sorted(mainnet.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def file_sha256(data: bytes) -> str:
    """SHA-256 of a file's bytes, as hex (the checksums stored in the config)."""
    return hashlib.sha256(data).hexdigest()


# -- value checks: (is the JSON value acceptable?, what it must be) ----------------------------------
_HEX64 = re.compile(r"[0-9a-f]{64}")


def _is_int(value: Any, minimum: int) -> bool:
    # bool is an int in Python, but a flag where a count belongs is a mistake.
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_shape(value: Any) -> bool:
    return isinstance(value, list) and all(_is_int(d, 1) for d in value)


def _is_digest(value: Any) -> bool:
    return isinstance(value, str) and _HEX64.fullmatch(value) is not None


def _is_dtype(value: Any) -> bool:
    return isinstance(value, str) and isinstance(getattr(torch, value, None), torch.dtype)


def _is_threshold(value: Any) -> bool:
    if value is None:  # JSON has no infinity: "never exit" is null
        return True
    try:
        return _is_number(value) and validate_threshold(value) is not None
    except ValueError:
        return False


def _is_policy(value: Any) -> bool:
    try:
        return isinstance(value, str) and validate_policy(value) == value
    except ValueError:
        return False


_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "tap": (lambda v: isinstance(v, str) or _is_int(v, -(2**63)), "a layer name (string) or an integer"),
    "split_options": (lambda v: isinstance(v, dict), "an object of split settings"),
    "feature_shape": (lambda v: _is_shape(v) and len(v) in (1, 3), "a list of 1 (D) or 3 (C, H, W) positive integers"),
    "num_classes": (lambda v: _is_int(v, 2), "an integer >= 2"),
    "hidden": (lambda v: _is_int(v, 1), "a positive integer"),
    "pool_size": (lambda v: _is_int(v, 1), "a positive integer"),
    "threshold": (_is_threshold, "a number in [0, 1], or null for never exit"),
    "temperature": (lambda v: _is_number(v) and math.isfinite(v) and v > 0, "a positive finite number"),
    "policy": (_is_policy, "the name of an exit rule (max_softmax, entropy or margin)"),
    "mainnet_fingerprint": (lambda v: v == "" or _is_digest(v), 'a 64-digit hex SHA-256, or "" when unknown'),
    "mainnet_class": (lambda v: isinstance(v, str), "a string"),
    "format_version": (lambda v: _is_int(v, 1), "a positive integer"),
    "metadata": (lambda v: isinstance(v, dict), "an object"),
    "input_shape": (lambda v: v is None or _is_shape(v), "a list of positive integers, or null"),
    "input_dtype": (lambda v: v is None or _is_dtype(v), "the name of a torch dtype (float32, int64, ...), or null"),
    "weights_sha256": (lambda v: v is None or _is_digest(v), "a 64-digit lowercase hex SHA-256"),
    "reference_sha256": (lambda v: v is None or _is_digest(v), "a 64-digit lowercase hex SHA-256, or null"),
    "structure_sha256": (lambda v: v is None or _is_digest(v), "a 64-digit lowercase hex SHA-256"),
}


@dataclass
class SideNetConfig:
    """Settings of a SideNet attached to a MainNet.

    Attributes:
        tap: where the MainNet is cut (a stage name, or an integer for ``nn.Sequential`` and text encoders).
        split_options: the split's settings beyond the tap (text encoders: ``{"features": "both"}``).
        feature_shape: shape of one sample's tap features.
        num_classes: classes of SideNet and MainNet.
        hidden: hidden width of the SideNet.
        pool_size: pooling grid side for convolutional features.
        threshold: exit threshold of the policy (inf means never exit).
        temperature: softmax temperature of the policy (fitted by temperature scaling, or 1).
        policy: name of the exit rule (``max_softmax``, ``entropy``, ``margin``).
        mainnet_fingerprint: :func:`mainnet_fingerprint` of the MainNet trained on ("" if unknown).
        mainnet_class: the MainNet's class name, for error messages.
        input_shape: shape of one input sample when inputs are tensors (None otherwise, e.g. text), so
            that loading can rebuild an example input to check the MainNet and the tap features.
        input_dtype: the example input's dtype name; only float versus integer matters on loading
            (float examples take the MainNet's dtype).
        weights_sha256, reference_sha256: :func:`file_sha256` of the weight files (None: no reference).
        structure_sha256: :meth:`structure_digest` at saving, checked on reading.
        format_version: the layout of the saved folder (see :data:`FORMAT_VERSION`).
        metadata: free-form extras (training history, data, ...); the only key that may be missing.
    """

    tap: str | int
    feature_shape: list[int]
    num_classes: int
    split_options: dict[str, Any] = field(default_factory=dict)
    hidden: int = 256
    pool_size: int = 4
    threshold: float = 0.9
    temperature: float = 1.0
    policy: str = "max_softmax"
    mainnet_fingerprint: str = ""
    mainnet_class: str = ""
    input_shape: list[int] | None = None
    input_dtype: str | None = None
    weights_sha256: str | None = None
    reference_sha256: str | None = None
    structure_sha256: str | None = None
    format_version: int = FORMAT_VERSION
    metadata: dict[str, Any] = field(default_factory=dict)

    def structure_digest(self) -> str:
        """SHA-256 over a canonical JSON of the :data:`STRUCTURAL_FIELDS`."""
        values = {name: getattr(self, name) for name in STRUCTURAL_FIELDS}
        values["feature_shape"] = list(values["feature_shape"])
        if values["input_shape"] is not None:
            values["input_shape"] = list(values["input_shape"])
        text = json.dumps(values, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def to_json(self) -> str:
        data = asdict(self)
        # JSON has no infinity; "never exit" is stored as null.
        data["threshold"] = None if math.isinf(self.threshold) else self.threshold
        return json.dumps(data, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str = "config") -> SideNetConfig:
        """Parse and check a saved config; raises :class:`CheckpointError` naming the first bad key."""
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as exc:  # RecursionError: absurdly deep nesting
            raise CheckpointError(f"{source} is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise CheckpointError(f"{source} must hold a JSON object")
        version = data.get("format_version", FORMAT_VERSION)
        if "format_version" in data and not _RULES["format_version"][0](version):
            raise CheckpointError(f"{source}: 'format_version' must be a positive integer, got {version!r}")
        if version > FORMAT_VERSION:
            raise CheckpointError(f"{source} was written by a newer sidenet (format {version}); upgrade sidenet")
        missing = [key for key in REQUIRED_KEYS[version] if key not in data]
        if missing:
            raise CheckpointError(f"{source} lacks the keys {missing} (format {version} needs all of them)")
        known = {f.name for f in fields(cls)}
        data = {key: value for key, value in data.items() if key in known}
        for key, value in data.items():
            accepts, expected = _RULES[key]
            if not accepts(value):
                shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
                raise CheckpointError(f"{source}: {key!r} must be {expected}, got {shown}")
        if data["threshold"] is None:
            data["threshold"] = math.inf
        config = cls(**data)
        if config.structure_sha256 is not None and config.structure_sha256 != config.structure_digest():
            raise CheckpointError(
                f"{source} was edited or corrupted after it was saved: its structural fields "
                f"({', '.join(STRUCTURAL_FIELDS)}) no longer match its structure_sha256. Only threshold, "
                "temperature, policy, mainnet_class and metadata may be edited by hand; save the SideNet "
                "again to change the rest."
            )
        return config

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / CONFIG_NAME
        path.write_text(self.to_json())
        return path

    @classmethod
    def load(cls, folder: str | Path) -> SideNetConfig:
        path = Path(folder) / CONFIG_NAME
        if not path.is_file():
            raise CheckpointError(f"no {CONFIG_NAME} in {folder}: not a saved SideNet folder")
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"cannot read {path}: {exc}") from exc
        return cls.from_json(text, source=str(path))


# -- the saved folder: replaced whole, so that a failing save leaves the old one as it was -----------
def _link_or_copy(source: str, target: str) -> None:
    # A hard link costs nothing and leaves the original untouched; copy where links are not allowed.
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _carry_user_files(folder: Path, staging: Path) -> None:
    """Link or copy into ``staging`` whatever the user keeps in ``folder`` beside the SideNet (the
    CLI's plots and reports), so that swapping the folders loses none of it."""
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        if entry.name in SAVED_FILES:
            continue
        target = staging / entry.name
        if entry.is_symlink():
            os.symlink(os.readlink(entry), target)
        elif entry.is_dir():
            shutil.copytree(entry, target, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(str(entry), str(target))


def _swap_in(staging: Path, folder: Path) -> None:
    """Put the complete ``staging`` folder at ``folder`` with renames: the old folder moves aside, the
    new one moves in (the old one comes back if that fails), then the old one is deleted. A crash
    in between leaves the old folder beside it as ``.<name>.old-*``."""
    if not folder.exists():
        os.replace(staging, folder)
        return
    old = folder.with_name(f".{folder.name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(folder, old)
    try:
        os.replace(staging, folder)
    except BaseException:
        os.replace(old, folder)
        raise
    shutil.rmtree(old, ignore_errors=True)


def replace_folder(staging: Path, folder: Path) -> None:
    """Make the complete saved folder ``staging`` the SideNet folder ``folder``, keeping the user's own
    files from the old ``folder`` (see :func:`_swap_in` for what a crash leaves)."""
    _carry_user_files(folder, staging)
    _swap_in(staging, folder)
