"""The ``sidenet report`` command (registered into :mod:`sidenet.cli`'s app): a saved SideNet's or
cascade's curves, calibration, guaranteed thresholds, shift check, throughput and live audit, written
as an HTML page and a Markdown summary by :mod:`sidenet.report_page` (or the cascade's pages)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sidenet.cli_options import (
    DEFAULT_OUT,
    ChannelsLastOption,
    DataOption,
    DeviceOption,
    DtypeOption,
    QuietOption,
    check_channels_last,
    check_compile_backend,
    check_device_dtype,
    check_positive,
    check_range,
    check_writable,
    fail,
    load_saved,
    saved_task,
)
from sidenet.config import CASCADE_NAME
from sidenet.loaders import prefix_loader, split_loader

__all__ = ["report_command", "register"]


def report_command(
    sidenet: Annotated[Path, typer.Option("--sidenet", help="Folder of a saved SideNet or cascade.")] = DEFAULT_OUT
    / "fmnist-layer1.0",
    out: Annotated[Path | None, typer.Option(help="Folder for report.html, report.md and the plots.")] = None,
    calibration_split: Annotated[
        str, typer.Option(help="Data partition (train/val/test) that fits temperatures and picks thresholds.")
    ] = "val",
    split: Annotated[str, typer.Option(help="Data partition (train/val/test) the report evaluates on.")] = "test",
    data: DataOption = None,
    max_drop: Annotated[float, typer.Option(help="Accuracy drop tolerated at the chosen points (fraction).")] = 0.005,
    confidence: Annotated[float, typer.Option(help="Probability that the guarantee holds.")] = 0.9,
    bins: Annotated[int, typer.Option(help="Calibration bins.")] = 15,
    timing: Annotated[bool, typer.Option(help="Measure throughput at each threshold of the table.")] = True,
    halves: Annotated[
        bool,
        typer.Option(
            help="Calibrate on a random half of --split and evaluate on the other half (for when no "
            "other data partition is distributed like it); --calibration-split is then ignored."
        ),
    ] = False,
    batch_size: Annotated[
        int | None,
        typer.Option(
            help="Samples per batch in every pass and in the timing: the batch you serve at "
            "(default: the task's, fmnist 256, sst2 32).",
            min=1,
        ),
    ] = None,
    max_samples: Annotated[
        int | None, typer.Option(help="Use the first N samples of each data partition only (quick looks).", min=1)
    ] = None,
    audit: Annotated[
        Path | None, typer.Option(help="Logged live-audit counts to show: /metrics answers of the deployment.")
    ] = None,
    compile_backend: Annotated[
        str | None,
        typer.Option(
            "--compile",
            help="Time the model as served through compiled stages (sidenet.compile_for_serving: auto, eager, "
            "inductor, cuda_graph, inductor_cuda_graph), over the best MainNet alone (the faster of eager and "
            "torch.compile). Default: eager routing over the eager MainNet.",
        ),
    ] = None,
    device: DeviceOption = None,
    dtype: DtypeOption = None,
    channels_last: ChannelsLastOption = None,
    quiet: QuietOption = False,
) -> None:
    """Write an HTML page and a Markdown summary: curves of every exit policy with the MainNet and the
    oracle, calibration before and after temperature scaling, guaranteed thresholds, shift check,
    per-class exits, measured throughput and, given logged traffic, its live audit. A cascade's report:
    each SideNet's FLOPs and calibration, the trade-off along a path of threshold vectors with the saved
    ones and the oracle, thresholds with and without a guarantee, the shift check, throughput and the
    live audit (which runs the whole cascade on its drawn samples)."""
    from sidenet.report import ReportSettings, build_report
    from sidenet.report_page import write_report

    try:
        check_range("--max-drop", max_drop, 0.0, 1.0)
        check_range("--confidence", confidence, 0.0, 1.0, open_interval=True)
        check_positive(bins=bins)
        check_device_dtype(device, dtype)
        check_compile_backend(compile_backend)
        check_writable(out or sidenet / "report", "--out")
        if compile_backend is not None and not timing:
            raise ValueError("--compile says how to time the model: it needs timing (drop --no-timing)")
        task = saved_task(sidenet)
        check_channels_last(channels_last, task.convolutional, task.name)
        cascade = (sidenet / CASCADE_NAME).is_file()
        from sidenet.audit import audit_from_log  # read first: a bad file fails before the long work

        try:
            audited = None if audit is None else audit_from_log(audit).to_dict()
        except OSError as exc:
            raise ValueError(f"--audit {audit}: {exc.strerror or exc}") from exc
        for name in (calibration_split, split):
            task.check_split(name)
        if calibration_split == split and not halves:
            raise ValueError(
                f"--calibration-split and --split are both {split!r}: thresholds chosen on the data they are "
                "judged on promise nothing; give another --calibration-split, or --halves to split it in two"
            )
        model, task = load_saved(sidenet, data, not quiet, task, device, dtype, channels_last)
        loaders = task.loaders(data) if batch_size is None else task.loaders(data, batch_size=batch_size)
        for name in (calibration_split, split):
            if name not in loaders:
                fail(f"splits are {sorted(loaders)}, got {name!r}")
        settings = ReportSettings(
            max_accuracy_drop=max_drop,
            confidence=confidence,
            bins=bins,
            timing=timing,
            compile_backend=compile_backend,
        )
        if compile_backend is not None and timing and quiet:  # no bar: say why the coming minutes are silent
            said = f"Compiling for --compile {compile_backend} before timing (on a CPU, minutes the first time)"
            typer.echo(said, err=True)
        loaders = {name: prefix_loader(loader, max_samples) for name, loader in loaders.items()}
        if halves:
            calibration_loader, evaluation_loader = split_loader(loaders[split])
            where = f"one half of {split}, evaluated on the other"
        else:
            calibration_loader, evaluation_loader = loaders[calibration_split], loaders[split]
            where = f"{calibration_split}, evaluated on {split}"
        report_folder = out or sidenet / "report"
        if cascade:
            from sidenet.report_cascade_page import cascade_report_files

            title = f"sidenet report: {task.name}, taps {' -> '.join(map(str, model.taps))} (thresholds from {where})"
            pair = (calibration_loader, evaluation_loader)
            html_path, md_path = cascade_report_files(
                model, pair, settings, report_folder, title, not quiet, audit=audited
            )
        else:
            built = build_report(model, calibration_loader, evaluation_loader, settings, task.class_names, not quiet)
            built.audit = audited
            title = f"sidenet report: {task.name}, tap {model.tap} (thresholds from {where})"
            html_path, md_path = write_report(built, report_folder, title)
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    for line in md_path.read_text().splitlines():
        if line.startswith("> "):
            typer.echo(line[2:])
    typer.echo(f"Report written to {html_path} (and {md_path.name}, report.json, PNGs beside it)")


def register(app: typer.Typer) -> None:
    """Add ``report`` to the ``sidenet`` app."""
    # The docstring's first lines wrap badly in the command list: a one-line summary there.
    short = "Write an HTML and Markdown report: curves, calibration, guaranteed thresholds, shift, throughput."
    app.command("report", short_help=short)(report_command)
