"""Where and in what precision a routed model runs, for the command line and the serving integrations.

The Python API takes a MainNet wherever the user put it (``attach`` and ``load_sidenet`` place the
SideNet beside it). The commands build their MainNet themselves, in float32 on the CPU, so they need
to be told: :func:`check_placement` refuses a bad ``--device``/``--dtype`` before anything loads,
:func:`placed` moves and casts a loaded model, and :func:`load_placed` loads a saved SideNet onto a
MainNet cast first to the dtype it was fitted in (a fingerprint covers dtypes: a SideNet fitted on a
bfloat16 MainNet is checked against that MainNet cast the same way), then places both.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import nn

from sidenet.checkpoint import load_sidenet
from sidenet.config import WEIGHTS_NAME

if TYPE_CHECKING:
    from sidenet.routing import AdaptiveModel

__all__ = ["DTYPES", "check_placement", "placed", "placement_of", "fitted_dtype", "load_placed"]

ModuleT = TypeVar("ModuleT", bound=nn.Module)

# The floating dtypes a model may run in (confidences and the exit rule stay float32 in any).
DTYPES = ("float32", "bfloat16", "float16")


def check_placement(device: str | None, dtype: str | None, *, here: bool = False) -> None:
    """Raise ``ValueError`` for a device string torch cannot parse or a dtype not in :data:`DTYPES`;
    with ``here``, also for a CUDA or MPS device this machine does not have (a Ray actor's device is
    checked where the actor runs, not here)."""
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if device is None:
        return
    try:
        where = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device {device!r} is not a torch device ({exc})") from None
    if not here:
        return
    if where.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {device!r}: no CUDA device on this machine")
        if where.index is not None and where.index >= count:
            raise ValueError(f"device {device!r}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}")
    elif where.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r}: MPS is not available on this machine")


def placed(model: ModuleT, device: str | None, dtype: str | None, channels_last: bool | None = False) -> ModuleT:
    """``model`` (an :class:`~sidenet.AdaptiveModel`: the SideNet with its MainNet; or a MainNet) moved to
    ``device`` and cast to ``dtype``, in place as ``nn.Module.to``; None keeps where and how it was
    loaded. Batches follow it (``to_mainnet``).

    ``channels_last`` lays the convolution weights out channels-last (NHWC), the layout tensor cores run
    half-precision convolutions in; activations follow (cuDNN picks it from the weights) and routing keeps
    it. ``None``: where the model ends up on a CUDA device and has convolutions (on an H200 it made the
    eager ResNet-50 1.5x faster at batch 256 in bfloat16 and removed most of the compiled serving mode's split
    cost: BENCHMARKS.md, GPU section). ``True`` raises ``ValueError`` for a model without convolutions (a
    text MainNet)."""
    check_placement(device, dtype)
    convolutional = any(p.dim() == 4 for p in model.parameters())
    if channels_last and not convolutional:
        raise ValueError("channels_last lays out convolutions: this model has none (a text MainNet?)")
    if device is not None or dtype is not None:
        model = model.to(device=device, dtype=None if dtype is None else getattr(torch, dtype))
    if channels_last is None:
        first = next(model.parameters(), None)
        channels_last = convolutional and first is not None and first.device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def placement_of(model: nn.Module) -> dict[str, Any]:
    """Where and in what floating dtype ``model`` runs (its first floating parameter's), and whether its
    convolutions are laid out channels-last (what a server's health check reports); {} for a model
    without floating parameters."""
    first = next((p for p in model.parameters() if p.is_floating_point()), None)
    if first is None:
        return {}
    convolutions = [p for p in model.parameters() if p.dim() == 4]
    # A 1x1 convolution's weight is contiguous in both layouts: the others tell.
    channels_last = all(p.is_contiguous(memory_format=torch.channels_last) for p in convolutions) and any(
        not p.is_contiguous() for p in convolutions
    )
    return {
        "device": str(first.device),
        "dtype": str(first.dtype).removeprefix("torch."),
        "channels_last": channels_last,
    }


def fitted_dtype(folder: str | Path) -> torch.dtype | None:
    """The floating dtype of the SideNet saved in ``folder``: that of the MainNet it was fitted and
    saved on. None when the folder has no readable weights (``load_sidenet`` then says what is wrong)."""
    from safetensors import SafetensorError, safe_open

    path = Path(folder) / WEIGHTS_NAME
    try:
        with safe_open(str(path), framework="pt") as weights:
            # Only the header is read: names and dtypes, no tensor data.
            names = list(weights.keys())  # a safe_open handle is not iterable
            dtypes = [weights.get_slice(name).get_dtype() for name in names]
    except (OSError, SafetensorError):
        return None
    floating = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}
    return next((floating[name] for name in dtypes if name in floating), None)


def _floating_dtype(module: nn.Module) -> torch.dtype | None:
    tensors = [*module.parameters(), *module.buffers()]
    return next((t.dtype for t in tensors if t.is_floating_point()), None)


def load_placed(
    mainnet: nn.Module,
    folder: str | Path,
    device: str | None = None,
    dtype: str | None = None,
    channels_last: bool | None = False,
) -> AdaptiveModel:
    """The SideNet saved in ``folder`` loaded onto ``mainnet``, then moved to ``device`` and cast to
    ``dtype`` (None: where ``mainnet`` is, in the dtype the SideNet was fitted in).

    ``mainnet`` is the MainNet as trained (float32, say); when the SideNet was fitted on it cast to
    another dtype, it is cast the same way first (in place) so that its fingerprint is the one saved.
    ``channels_last``: see :func:`placed`. Raises what :func:`~sidenet.load_sidenet` raises, and
    ``ValueError`` for a bad device or dtype."""
    check_placement(device, dtype)
    fitted = fitted_dtype(folder)
    current = _floating_dtype(mainnet)
    if fitted is not None and current is not None and fitted != current:
        mainnet = mainnet.to(dtype=fitted)
    return placed(load_sidenet(mainnet, folder), device, dtype, channels_last)
