"""Probing a split with an example input, as attaching and loading a SideNet do: where the MainNet
lives (device, floating dtype), example inputs built or moved there, the feature shape at the tap, and
the check that ``rest(trunk(x))`` computes what the MainNet's own ``forward`` computes."""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from sidenet.errors import SplitMismatchError
from sidenet.splits.base import MainNetSplit

__all__ = ["placement", "to_placement", "example_from_shape", "checked_input_shape", "feature_shape", "check_split"]


def placement(split: MainNetSplit) -> tuple[torch.device, torch.dtype]:
    """Device and floating dtype of the MainNet: those of its first floating parameter (or buffer).
    A MainNet without one (dynamically quantised, or a split with no module) takes CPU default floats."""
    module = split.mainnet if split.mainnet is not None else split
    tensors = [*module.parameters(), *module.buffers()]
    reference = next((t for t in tensors if t.is_floating_point()), None)
    if reference is None:
        return (tensors[0].device if tensors else torch.device("cpu")), torch.get_default_dtype()
    return reference.device, reference.dtype


def to_placement(x: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """``x`` with every tensor on ``device`` and every floating tensor in ``dtype``; integer tensors
    (token ids, masks) keep their dtype. Mappings become dicts (a tokenizer's BatchEncoding too)."""
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=dtype) if x.is_floating_point() else x.to(device)
    if isinstance(x, Mapping):
        return {key: to_placement(value, device, dtype) for key, value in x.items()}
    if type(x) in (list, tuple):
        return type(x)(to_placement(value, device, dtype) for value in x)
    return x


def example_from_shape(shape: Sequence[int], dtype_name: str | None, device: torch.device, dtype: torch.dtype) -> Any:
    """A batch of one sample of ``shape``: uniform noise for float inputs (varied values, so that the
    split check can see a forward that rescales its input, as zeros might not), zeros for integer
    inputs (index 0 is valid for every embedding). Seeded: the global RNG is left alone."""
    kind = getattr(torch, dtype_name) if dtype_name else torch.float32
    if not kind.is_floating_point:
        return torch.zeros(1, *shape, dtype=kind, device=device)
    noise = torch.rand(1, *shape, generator=torch.Generator().manual_seed(0))
    return noise.to(device=device, dtype=dtype)


def checked_input_shape(input_shape: Any) -> list[int]:
    """``input_shape`` as a list of positive ints, or ``ValueError`` naming ``input_shape``."""
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


def feature_shape(split: MainNetSplit, example: Any) -> list[int]:
    """The shape of one sample's tap features (what the SideNet reads) on ``example``."""
    with torch.no_grad():
        features = split.features(split.trunk(example))
    return list(features.shape[1:])


def check_split(split: MainNetSplit, example: Any) -> None:
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
