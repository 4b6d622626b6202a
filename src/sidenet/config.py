"""``SideNetConfig``: every setting of an attached SideNet, saved as JSON beside its weights, and the
fingerprint that ties a saved SideNet to the exact MainNet it was trained on."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sidenet.policy import validate_policy, validate_threshold

__all__ = ["SideNetConfig", "mainnet_fingerprint", "CONFIG_NAME", "WEIGHTS_NAME", "REFERENCE_NAME", "FORMAT_VERSION"]

CONFIG_NAME = "sidenet_config.json"
WEIGHTS_NAME = "sidenet.safetensors"
REFERENCE_NAME = "reference.safetensors"  # calibration confidences for the shift check (optional)
FORMAT_VERSION = 1


def mainnet_fingerprint(mainnet: nn.Module) -> str:
    """SHA-256 over the MainNet's state dict (names, dtypes, shapes and values), as hex."""
    digest = hashlib.sha256()
    for name, tensor in sorted(mainnet.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


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
        metadata: free-form extras (training history, data, ...).
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
    format_version: int = FORMAT_VERSION
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        data = asdict(self)
        # JSON has no infinity; "never exit" is stored as null.
        data["threshold"] = None if math.isinf(self.threshold) else self.threshold
        return json.dumps(data, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str = "config") -> SideNetConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{source} is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ValueError(f"{source} must hold a JSON object")
        known = {f.name for f in fields(cls)}
        missing = {"tap", "feature_shape", "num_classes"} - set(data)
        if missing:
            raise ValueError(f"{source} lacks the keys {sorted(missing)}")
        if data.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
            raise ValueError(f"{source} was written by a newer sidenet (format {data['format_version']})")
        data = {k: v for k, v in data.items() if k in known}
        if data.get("threshold", 0.9) is None:
            data["threshold"] = math.inf
        config = cls(**data)
        validate_threshold(config.threshold)
        validate_policy(config.policy)
        return config

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / CONFIG_NAME
        path.write_text(self.to_json())
        return path

    @classmethod
    def load(cls, folder: str | Path) -> SideNetConfig:
        path = Path(folder) / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"no {CONFIG_NAME} in {folder}: not a saved SideNet folder")
        return cls.from_json(path.read_text(), source=str(path))
