"""The command line's options, checked before any work: :func:`check_range`, :func:`check_positive`
and :func:`check_device_dtype` name the option they refuse, and :class:`FitSettings` gathers what
``sidenet fit`` and ``sidenet demo`` train, checked once when made. A bad option is refused in well
under a second, not after the MainNet was trained or the SideNet fitted. :func:`saved_task` and
:func:`load_saved` find and load the saved SideNet that ``--sidenet`` names. The commands themselves
are in :mod:`sidenet.cli`, :mod:`sidenet.cli_report` and :mod:`sidenet.cli_serve`.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

from sidenet.config import SideNetConfig
from sidenet.placement import check_placement, load_placed
from sidenet.policy import validate_policy
from sidenet.splits import TapError
from sidenet.tasks import Task, get_task

if TYPE_CHECKING:
    from sidenet.routing import AdaptiveModel

__all__ = [
    "FitSettings",
    "check_range",
    "check_positive",
    "check_device_dtype",
    "check_channels_last",
    "check_compile_backend",
    "saved_task",
    "load_saved",
    "plot_path",
    "fail",
    "CompileOption",
    "DataOption",
    "DeviceOption",
    "DtypeOption",
    "ChannelsLastOption",
    "QuietOption",
    "DEFAULT_OUT",
]

DEFAULT_OUT = Path("sidenet-output")
DataOption = Annotated[
    Path | None, typer.Option("--data", help="Dataset folder (default: looked up; SST-2: also $SIDENET_SST2_DIR).")
]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
CompileOption = Annotated[
    str | None,
    typer.Option(
        "--compile",
        help="Route through compiled stages (sidenet.compile_for_serving): auto (torch.compile's kernels in "
        "CUDA graphs on a GPU, torch.compile on the CPU), eager, inductor, cuda_graph or inductor_cuda_graph. "
        "Default: eager routing.",
    ),
]

DeviceOption = Annotated[
    str | None,
    typer.Option(help="Where the MainNet and SideNet run: cpu, cuda, cuda:1, mps (default: the CPU)."),
]
DtypeOption = Annotated[
    str | None,
    typer.Option(
        help="Run the model in this floating dtype: float32, bfloat16 or float16 (bfloat16 on a GPU: its fast "
        "path). Confidences and the exit rule stay float32. Default: the dtype the SideNet was fitted in "
        "(sidenet fit: float32)."
    ),
]

ChannelsLastOption = Annotated[
    bool | None,
    typer.Option(
        "--channels-last/--no-channels-last",
        help="Lay the MainNet's convolutions out channels-last (NHWC; images only): on a GPU the layout its "
        "tensor cores run bfloat16 and float16 convolutions in. Default: on with a CUDA device for an image "
        "MainNet.",
        show_default=False,
    ),
]


def fail(message: str) -> NoReturn:
    """Print ``error: message`` in red on stderr and leave with status 2 (a refused command)."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def check_range(option: str, value: float, low: float, high: float, *, open_interval: bool = False) -> None:
    """Raise ``ValueError`` naming ``option`` unless ``value`` lies in [low, high] (or (low, high))."""
    inside = low < value < high if open_interval else low <= value <= high
    if not inside:  # NaN lies in no interval
        interval = f"({low:g}, {high:g})" if open_interval else f"[{low:g}, {high:g}]"
        raise ValueError(f"{option} must lie in {interval}, got {value}")


def check_positive(**options: int) -> None:
    """Raise ``ValueError`` naming the first option below 1 (keyword ``max_rows`` names ``--max-rows``)."""
    for name, value in options.items():
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")


def check_writable(path: Path, option: str, folder: bool = True) -> None:
    """Raise ``ValueError`` naming ``option`` when ``path`` (a folder, or a file to write where ``folder``
    is False) cannot be written, before any long work: a file or folder of the other kind in its place or
    above it, or a nearest existing folder that refuses a file (probed with a temporary one, deleted)."""
    path = Path(path)
    if path.exists() and path.is_dir() != folder:
        raise ValueError(
            f"{option} {path} is a {'file' if folder else 'folder'}, not a {'folder' if folder else 'file'}"
        )
    above = next(p for p in path.parents if p.exists())  # the nearest existing folder (or file) above
    if not above.is_dir():
        raise ValueError(f"{option} {path}: {above} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=above):
            pass
    except OSError as exc:
        raise ValueError(f"{option} {path}: cannot write in {above} ({exc.strerror or exc})") from exc


def check_device_dtype(device: str | None, dtype: str | None) -> None:
    """Raise ``ValueError`` naming ``--device`` or ``--dtype`` for a device torch cannot parse or this
    machine does not have, or a dtype sidenet does not run in."""
    try:
        check_placement(None, dtype)
    except ValueError as exc:
        raise ValueError(f"--dtype: {exc}") from None
    try:
        check_placement(device, None, here=True)
    except ValueError as exc:
        raise ValueError(f"--device: {exc}") from None


def check_channels_last(channels_last: bool | None, convolutional: bool, mainnet: str) -> None:
    """Raise ``ValueError`` for ``--channels-last`` asked of a MainNet without convolutions (``mainnet``
    names it); the default (None) lays out only MainNets that have them."""
    if channels_last and not convolutional:
        raise ValueError(f"--channels-last lays out convolutions: the {mainnet} MainNet has none")


def check_compile_backend(backend: str | None) -> None:
    """Raise ``ValueError`` naming ``--compile`` for a backend ``sidenet.compile_for_serving`` does not have."""
    from sidenet.integrations.options import COMPILE_BACKENDS  # the serving layer's, loaded on demand

    if backend not in COMPILE_BACKENDS:
        raise ValueError(f"--compile must be one of {', '.join(b for b in COMPILE_BACKENDS if b)}, got {backend!r}")


def saved_task(folder: Path) -> Task:
    """The task a saved SideNet was fitted on, read from its config alone (no MainNet loaded)."""
    return get_task(SideNetConfig.load(folder).metadata.get("task", "fmnist"))


def load_saved(
    folder: Path,
    data: Path | None,
    progress: bool,
    task: Task | None = None,
    device: str | None = None,
    dtype: str | None = None,
    channels_last: bool | None = None,
) -> tuple[AdaptiveModel, Task]:
    """The SideNet in ``folder`` loaded onto its task's MainNet (``task``, default the one it was fitted
    on), on ``device`` in ``dtype`` (None: the CPU, the dtype it was fitted in), its convolutions
    channels-last if asked; and that task."""
    task = task or saved_task(folder)
    mainnet = task.mainnet(data, progress=progress)
    return load_placed(mainnet, folder, device, dtype, channels_last), task


@dataclass(frozen=True)
class FitSettings:
    """What ``sidenet fit`` (and ``sidenet demo``) trains, and the rule that chooses its threshold on
    ``val``; the defaults are ``sidenet fit``'s. Checked once, when made: a bad option raises
    ``ValueError`` naming it (a :class:`sidenet.TapError` listing the valid taps for the tap) before any
    MainNet is trained or loaded and any data read. ``data`` None: the dataset is looked up;
    ``features``: what a text SideNet reads; ``max_*_samples``: use the first N samples only;
    ``device``, ``dtype``: where and in what precision the MainNet runs while the SideNet is fitted
    (None: the CPU, float32); the SideNet is saved in that dtype. ``channels_last``: its convolutions
    laid out channels-last meanwhile (None: on a CUDA device; the saved SideNet does not depend on it).
    ``cost``: what a cascade's choice of taps minimises: FLOPs, or time (each part of the MainNet timed on
    a validation batch where it runs: :func:`sidenet.measure_part_seconds`), on a batch of ``serve_batch``
    validation samples where given (the batch served at).
    """

    task: str
    tap: str
    out: Path
    data: Path | None = None
    hidden: int = 256
    pool: int = 7
    epochs: int = 30
    distill: float = 0.5
    max_drop: float = 0.005
    seed: int = 0
    features: str | None = None
    policy: str = "max_softmax"
    temperature_scaling: bool = True
    confidence: float | None = None
    max_train_samples: int | None = None
    max_val_samples: int | None = None
    # A cascade: ("auto",) for every tap the splitter offers, or the candidate taps; None: one SideNet at tap.
    taps: tuple[str, ...] | None = None
    device: str | None = None
    dtype: str | None = None
    channels_last: bool | None = None
    # What a cascade's choice of taps minimises: "flops", or "time" (each part timed where the MainNet runs).
    cost: str = "flops"
    # With cost "time": the batch the parts are timed and routed batches forecast at (None: val's batch).
    serve_batch: int | None = None

    def __post_init__(self) -> None:
        task = get_task(self.task)
        check_device_dtype(self.device, self.dtype)
        check_channels_last(self.channels_last, task.convolutional, task.name)
        check_positive(hidden=self.hidden, pool=self.pool, epochs=self.epochs)
        limits = {"max_train_samples": self.max_train_samples, "max_val_samples": self.max_val_samples}
        check_positive(**{name: limit for name, limit in limits.items() if limit is not None})
        check_range("--distill", self.distill, 0.0, 1.0)
        check_range("--max-drop", self.max_drop, 0.0, 1.0)
        if self.confidence is not None:
            check_range("--confidence", self.confidence, 0.0, 1.0, open_interval=True)
        try:
            validate_policy(self.policy)
        except ValueError as exc:
            raise ValueError(f"--policy: {exc}") from exc
        if self.taps is not None:
            if not self.taps or any(not tap.strip() for tap in self.taps):
                raise ValueError("--taps takes 'auto' or a comma-separated list of taps, e.g. --taps 1,3,5")
            if "auto" in self.taps and len(self.taps) > 1:
                raise ValueError("--taps auto stands alone: it takes every tap the MainNet's splitter offers")
            if len(set(self.taps)) != len(self.taps):
                raise ValueError(f"--taps names a tap twice: {','.join(self.taps)}")
        check_writable(self.out, "--out")
        if self.cost not in ("flops", "time"):
            raise ValueError(f"--cost must be 'flops' or 'time', got {self.cost!r}")
        if self.cost == "time" and self.taps is None:
            # One tap's threshold is the same whichever way compute is counted: the least that keeps the drop.
            raise ValueError("--cost time prices the choice of a cascade's taps: give --taps")
        if self.serve_batch is not None:
            check_positive(serve_batch=self.serve_batch)
            if self.cost != "time":
                raise ValueError("--serve-batch is the batch --cost time times the parts at: give --cost time")
        for tap in (self.tap,) if self.taps is None or self.taps == ("auto",) else self.taps:
            self._check_tap(task, tap)

    def _check_tap(self, task: Any, tap: str) -> None:
        try:
            task.check_tap(tap, self.split_options)
        except TapError:
            raise  # names the tap and lists the valid ones
        except ValueError as exc:
            if self.features is None:
                raise
            raise ValueError(f"--features {self.features}: {exc}") from exc

    @property
    def split_options(self) -> dict[str, str] | None:
        """Options of the MainNet's splitter (None: its defaults)."""
        return None if self.features is None else {"features": self.features}


def plot_path(plot: Path) -> Path:
    """``plot`` with a format matplotlib writes (none given: ``.png``, the name the plot is saved under), checked
    before a sweep runs rather than after it."""
    from matplotlib.backend_bases import FigureCanvasBase

    if plot.is_dir():  # refused as such by check_writable
        return plot
    if not plot.suffix:
        return plot.with_suffix(".png")
    formats = FigureCanvasBase.get_supported_filetypes()
    if plot.suffix[1:].lower() not in formats:
        raise ValueError(f"--plot {plot}: not an image format matplotlib writes ({', '.join(sorted(formats))})")
    return plot
