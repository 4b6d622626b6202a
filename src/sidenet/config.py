"""``SideNetConfig``: every setting of an attached SideNet, saved as JSON beside its weights, and the
fingerprint that ties a saved SideNet to the exact MainNet it was trained on.

A saved config is trusted only as far as it can be checked: every key is required (only the free-form
``metadata`` may be left out), every value is type-checked, and ``structure_sha256`` covers the fields
that decide which layer the SideNet reads and how its weights are laid out (:data:`STRUCTURAL_FIELDS`),
together with the checksums of the weight files. The exit rule (``threshold``, ``temperature``,
``policy``), ``mainnet_class`` and ``metadata`` stay out of it on purpose, so that they may be tuned
by hand. The checksums catch corruption and accidental edits; they are not a signature (anyone can
recompute them).

The config is the one list of a SideNet's settings (as peft's ``PeftConfig``): ``attach`` takes its
settings (:data:`SETTINGS`) as keywords or as a config, the model keeps it (``model.config``), saving
writes it with the live exit rule and the checksums, loading builds the model from it. Each field says
who sets it (``field(metadata={"role": ...})``): the user (:data:`SETTING`), attaching (:data:`MEASURED`,
read off the MainNet and the example input) or saving (:data:`SAVED`).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from sidenet.errors import CheckpointError
from sidenet.policy import ExitPolicy, validate_policy, validate_threshold

if TYPE_CHECKING:
    from sidenet.head import SideNet
    from sidenet.splits import MainNetSplit

__all__ = [
    "SideNetConfig",
    "mainnet_fingerprint",
    "file_sha256",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "REFERENCE_NAME",
    "FORMAT_VERSION",
    "REQUIRED_KEYS",
    "STRUCTURAL_FIELDS",
    "SAVED_FILES",
    "SETTINGS",
    "SETTING",
    "MEASURED",
    "SAVED",
    "config_for_parts",
]

CONFIG_NAME = "sidenet_config.json"
WEIGHTS_NAME = "sidenet.safetensors"
REFERENCE_NAME = "reference.safetensors"  # calibration confidences for the shift check (optional)
# 2: checksums, the input sample's shape and dtype, and every key required. Format 1 (sidenet 0.1.0)
# folders still load, without those checks, but every key format 1 wrote is required.
FORMAT_VERSION = 2

_V1_KEYS = (
    "tap",
    "split_options",
    "feature_shape",
    "num_classes",
    "hidden",
    "pool_size",
    "threshold",
    "temperature",
    "policy",
    "mainnet_fingerprint",
    "mainnet_class",
    "format_version",
)
REQUIRED_KEYS: dict[int, tuple[str, ...]] = {
    1: _V1_KEYS,
    2: (*_V1_KEYS, "input_shape", "input_dtype", "weights_sha256", "reference_sha256", "structure_sha256"),
}
# What ``structure_sha256`` covers: editing any of these by hand makes the folder fail to load.
STRUCTURAL_FIELDS = (
    "tap",
    "split_options",
    "feature_shape",
    "num_classes",
    "hidden",
    "pool_size",
    "mainnet_fingerprint",
    "input_shape",
    "input_dtype",
    "weights_sha256",
    "reference_sha256",
)


CASCADE_NAME = "cascade.json"  # a cascade's later SideNets: their folders and checksums
CASCADE_FOLDER = "cascade"  # where those folders are

# The files a save writes; anything else in the folder (the CLI's plots and reports) is the user's.
SAVED_FILES = (CONFIG_NAME, WEIGHTS_NAME, REFERENCE_NAME, CASCADE_NAME, CASCADE_FOLDER)


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


# Who sets a field (its ``metadata["role"]``): the user, when attaching (:data:`SETTINGS`);
# attaching, from the MainNet and the example input; saving, from the files it writes.
SETTING, MEASURED, SAVED = "setting", "measured", "saved"


def _setting(default: Any = None, factory: Callable[[], Any] | None = None, role: str = SETTING) -> Any:
    if factory is not None:
        return field(default_factory=factory, metadata={"role": role})
    return field(default=default, metadata={"role": role})


@dataclass(frozen=True)
class SideNetConfig:
    """Settings of a SideNet attached to a MainNet; frozen (build a changed one with ``dataclasses.replace``).

    Attributes:
        tap: where the MainNet is cut (a stage name, or an integer for ``nn.Sequential`` and text encoders).
        feature_shape: shape of one sample's tap features (measured by ``attach``; None until then).
        num_classes: classes of SideNet and MainNet (None: read from the MainNet when attaching).
        split_options: the split's settings beyond the tap (text encoders: ``{"features": "both"}``).
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

    tap: str | int = field(metadata={"role": SETTING})
    feature_shape: list[int] | None = _setting(role=MEASURED)
    num_classes: int | None = _setting()
    split_options: dict[str, Any] = _setting(factory=dict)
    hidden: int = _setting(256)
    pool_size: int = _setting(7)
    threshold: float = _setting(0.9)
    temperature: float = _setting(1.0)
    policy: str = _setting("max_softmax")
    mainnet_fingerprint: str = _setting("", role=SAVED)
    mainnet_class: str = _setting("", role=MEASURED)
    input_shape: list[int] | None = _setting(role=MEASURED)
    input_dtype: str | None = _setting(role=MEASURED)
    weights_sha256: str | None = _setting(role=SAVED)
    reference_sha256: str | None = _setting(role=SAVED)
    structure_sha256: str | None = _setting(role=SAVED)
    format_version: int = _setting(FORMAT_VERSION, role=SAVED)
    metadata: dict[str, Any] = _setting(factory=dict)

    def __post_init__(self) -> None:
        # The JSON types, whatever the caller passed: lists for shapes, dicts for objects (None: empty).
        for name in ("feature_shape", "input_shape"):
            if isinstance(getattr(self, name), tuple):
                object.__setattr__(self, name, list(getattr(self, name)))
        for name in ("split_options", "metadata"):
            value = getattr(self, name)
            if value is None or (isinstance(value, Mapping) and not isinstance(value, dict)):
                object.__setattr__(self, name, dict(value or {}))

    def exit_rule(self) -> ExitPolicy:
        """The exit rule these settings describe (validated: a bad threshold raises ``ValueError``)."""
        return ExitPolicy(self.threshold, self.temperature, self.policy)

    def with_exit_rule(self, rule: ExitPolicy) -> SideNetConfig:
        """This config with the exit-rule fields of ``rule`` (the live rule of a model)."""
        return replace(self, threshold=rule.threshold, temperature=rule.temperature, policy=rule.kind)

    def unsaved(self) -> SideNetConfig:
        """This config less what only a saved folder has (:data:`SAVED` fields back to their defaults):
        the checksums and fingerprint describe files, not a model in memory."""
        return replace(self, **{f.name: f.default for f in fields(self) if f.metadata.get("role") == SAVED})

    def structure_digest(self) -> str:
        """SHA-256 over a canonical JSON of the :data:`STRUCTURAL_FIELDS`."""
        values = {name: getattr(self, name) for name in STRUCTURAL_FIELDS}
        values["feature_shape"] = list(values["feature_shape"])
        if values["input_shape"] is not None:
            values["input_shape"] = list(values["input_shape"])
        text = json.dumps(values, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def to_json(self) -> str:
        """The config as the JSON of ``sidenet_config.json`` (sorted keys; never-exit as null)."""
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
            raise CheckpointError(
                f"{source} was written by a newer sidenet ('format_version' {version}, this one reads up to "
                f"{FORMAT_VERSION}); upgrade sidenet"
            )
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
        """Write :meth:`to_json` to ``folder/sidenet_config.json``."""
        path = Path(folder) / CONFIG_NAME
        path.write_text(self.to_json())
        return path

    @classmethod
    def load(cls, folder: str | Path) -> SideNetConfig:
        """Read and check ``folder/sidenet_config.json`` (see :meth:`from_json`)."""
        path = Path(folder) / CONFIG_NAME
        if not path.is_file():
            raise CheckpointError(f"no {CONFIG_NAME} in {folder}: not a saved SideNet folder")
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"cannot read {path}: {exc}") from exc
        return cls.from_json(text, source=str(path))


# The settings a user chooses (attach's keywords), as opposed to what attaching measures or saving records.
SETTINGS = tuple(f.name for f in fields(SideNetConfig) if f.metadata["role"] == SETTING and f.name != "tap")


def config_for_parts(split: MainNetSplit, sidenet: SideNet, config: SideNetConfig | None = None) -> SideNetConfig:
    """``config`` (or a default one) completed with what the split and the SideNet say about
    themselves, less what only a saved folder has (:meth:`SideNetConfig.unsaved`): the config an
    :class:`~sidenet.AdaptiveModel` of these parts keeps. Raises ``ValueError`` when ``config``
    contradicts the parts: a model must never save a config its weights do not fit."""
    parts = {
        "tap": split.tap,
        "feature_shape": list(sidenet.feature_shape),
        "num_classes": sidenet.num_classes,
        "hidden": sidenet.hidden,
        "pool_size": sidenet.pool_size,
    }
    if config is None:
        config = SideNetConfig(tap=split.tap)
    else:
        for name, actual in parts.items():
            given = getattr(config, name)
            # Taps compare as text: the CLI's "2" is the nn.Sequential splitter's 2.
            same = str(given) == str(actual) if name == "tap" else given == actual
            if given is not None and not same:
                raise ValueError(f"the config's {name} is {given!r} but the split and SideNet have {actual!r}")
    mainnet = split.mainnet
    return replace(
        config.unsaved(),
        **parts,
        # The split's own options, defaults included ({"features": "both"} where none were given).
        split_options=split.options(),
        mainnet_class=type(mainnet).__name__ if mainnet is not None else "",
    )
