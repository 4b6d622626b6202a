"""The ``sidenet`` command line: pretrain, fit, sweep, predict, report, demo.

Every command checks its arguments before it loads data or a MainNet: a bad option is refused in well under
a second, not after the MainNet was trained or the SideNet fitted. (serve and classify: ``cli_serve``.)"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import torch
import typer

from sidenet.cli_fit import fit_and_save
from sidenet.cli_options import (
    DEFAULT_OUT,
    ChannelsLastOption,
    DataOption,
    DeviceOption,
    DtypeOption,
    FitSettings,
    QuietOption,
    check_device_dtype,
    check_positive,
    check_writable,
    fail,
    load_saved,
    plot_path,
    saved_task,
)
from sidenet.cli_report import register as register_report_command
from sidenet.cli_serve import register as register_serve_commands
from sidenet.curve import TradeoffCurve, sweep
from sidenet.part_costs import PartSeconds
from sidenet.policy import POLICIES, format_threshold, validate_threshold
from sidenet.tasks import TASKS, get_task
from sidenet.training import to_mainnet

app = typer.Typer(
    help="Adaptive compute for pretrained classifiers: attach a SideNet to your MainNet.",
    epilog=(
        "Every command keeps the CPU memory a batch frees for the next batch (sidenet.host_memory); "
        "SIDENET_CPU_MEMORY=system keeps the C library's defaults."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

TaskOption = Annotated[str, typer.Option(help=f"Workload: {', '.join(TASKS)}.")]


def _print_version(value: bool) -> None:
    if value:
        from sidenet import __version__

        typer.echo(f"sidenet {__version__} (torch {torch.__version__})")
        raise typer.Exit()


@app.callback()
def _app_options(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print the versions and exit."),
    ] = False,
) -> None:
    # App-wide options (help: typer.Typer's above). Inductor's import without a GPU logs "No CUDA runtime": noise.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


@app.command()
def pretrain(
    task: TaskOption = "fmnist",
    data: DataOption = None,
    epochs: Annotated[float | None, typer.Option(help="Training epochs (default: fmnist 10, sst2 1).")] = None,
    force: Annotated[bool, typer.Option(help="Retrain even if a cached MainNet exists.")] = False,
    quiet: QuietOption = False,
) -> None:
    """Train the task's MainNet (cached under the user's cache folder)."""
    try:
        if epochs is not None and not epochs > 0:  # NaN too
            raise ValueError(f"--epochs must be positive, got {epochs}")
        summary = get_task(task).pretrain(data, epochs=epochs, force=force, progress=not quiet)
    except ValueError as exc:
        fail(str(exc))
    typer.echo(summary)


@app.command()
def fit(
    task: TaskOption = "fmnist",
    tap: Annotated[str | None, typer.Option(help="Where to attach the SideNet (default: the task's).")] = None,
    taps: Annotated[
        str | None,
        typer.Option(
            help="A cascade instead: 'auto' (every tap the MainNet's splitter offers) or candidate taps, "
            "comma-separated; a SideNet is fitted at each and the taps and thresholds with the least "
            "validation compute within --max-drop are kept."
        ),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Folder to save the SideNet in.")] = None,
    data: DataOption = None,
    hidden: Annotated[int, typer.Option(help="Hidden width of the SideNet.")] = FitSettings.hidden,
    pool: Annotated[int, typer.Option(help="Pooling grid side for convolutional features.")] = FitSettings.pool,
    epochs: Annotated[int, typer.Option(help="SideNet training epochs (on cached features).")] = FitSettings.epochs,
    distill: Annotated[
        float, typer.Option(help="Weight of distillation toward the MainNet, 0..1.")
    ] = FitSettings.distill,
    max_drop: Annotated[
        float, typer.Option(help="Accuracy drop allowed when choosing the threshold.")
    ] = FitSettings.max_drop,
    features: Annotated[
        str | None, typer.Option(help="Text MainNets: what the SideNet reads, first, mean or both tokens.")
    ] = None,
    policy: Annotated[str, typer.Option(help=f"Exit rule: {', '.join(POLICIES)}.")] = FitSettings.policy,
    temperature_scaling: Annotated[
        bool, typer.Option(help="Fit the SideNet's softmax temperature on the validation data first.")
    ] = FitSettings.temperature_scaling,
    confidence: Annotated[
        float | None,
        typer.Option(
            help="Choose the threshold so that the drop stays within --max-drop with this probability "
            "on new data like the validation data (e.g. 0.9); default: on the validation data only."
        ),
    ] = None,
    max_train_samples: Annotated[
        int | None, typer.Option(help="Train on the first N training samples only (quick trials).", min=1)
    ] = None,
    max_val_samples: Annotated[
        int | None,
        typer.Option(
            help="Validate, calibrate and choose the threshold on the first N validation samples only.", min=1
        ),
    ] = None,
    cost: Annotated[
        str,
        typer.Option(
            help="With --taps: what the choice of taps minimises, flops or time (each part of the MainNet "
            "timed on a validation batch on --device, and on fewer rows: early layers often cost more time than "
            "their FLOPs, and a routed batch's later parts run on few rows; taps compared by a forecast of routed "
            "batches)."
        ),
    ] = FitSettings.cost,
    serve_batch: Annotated[
        int | None,
        typer.Option(
            help="With --cost time: the batch you serve at, which the parts are timed and routed batches "
            "forecast at (default: the task's validation batch, fmnist 256, sst2 32).",
            min=1,
        ),
    ] = None,
    seed: int = FitSettings.seed,
    device: DeviceOption = None,
    dtype: DtypeOption = None,
    channels_last: ChannelsLastOption = None,
    quiet: QuietOption = False,
) -> None:
    """Train a SideNet at a tap of the frozen MainNet; choose its threshold on the validation data."""
    try:
        if taps is not None and tap is not None:
            raise ValueError("give --tap (one SideNet) or --taps (a cascade), not both")
        tap = get_task(task).default_tap if tap is None else tap  # an empty --tap is refused, not defaulted
        cascade = None if taps is None else tuple(part.strip() for part in taps.split(","))
        settings = FitSettings(
            task=task,
            tap=tap,
            taps=cascade,
            out=out or DEFAULT_OUT / (f"{task}-{tap}" if cascade is None else f"{task}-cascade"),
            data=data,
            hidden=hidden,
            pool=pool,
            epochs=epochs,
            distill=distill,
            max_drop=max_drop,
            seed=seed,
            features=features,
            policy=policy,
            temperature_scaling=temperature_scaling,
            confidence=confidence,
            max_train_samples=max_train_samples,
            max_val_samples=max_val_samples,
            device=device,
            dtype=dtype,
            channels_last=channels_last,
            cost=cost,
            serve_batch=serve_batch,
        )
        folder, choice = fit_and_save(settings, progress=not quiet)
    except (ValueError, OSError) as exc:  # OSError: the folder written at the end, e.g. a full disk
        fail(str(exc))
    if choice["validation_samples"] < FEW_VALIDATION_SAMPLES:
        typer.echo(
            f"WARNING: chosen on only {choice['validation_samples']} validation samples: the accuracy drop on new "
            "data may be far from the one seen here; choose on more (--max-val-samples), or give --confidence",
            err=True,
        )
    if "taps" in choice:
        typer.echo(
            f"Cascade saved to {folder}: taps {', '.join(choice['taps'])} of {', '.join(choice['candidate_taps'])}, "
            f"thresholds {', '.join(format_threshold(t) for t in choice['thresholds'])} (validation: exit rate "
            f"{choice['exit_rate']:.3f}, accuracy drop {100 * choice['accuracy_drop']:.2f} points, "
            f"{'time priced per sample' if choice['cost'] == 'time' else 'compute'} "
            f"{choice['relative_compute']:.3f} of the MainNet's"
            + (f", FLOPs {choice['flops_fraction']:.3f}" if "flops_fraction" in choice else "")
            + ")"
        )
        if "part_seconds" in choice:  # --cost time: what the choice was priced by
            typer.echo(PartSeconds.from_dict(choice["part_seconds"]).describe())
        if "time_forecast" in choice:
            forecast = choice["time_forecast"]
            typer.echo(
                f"Forecast per routed batch of {forecast['batch_size']}, by which the taps were compared (each part "
                f"and routing step timed on 1 to {forecast['batch_size']} rows, charged on the rows that reach it): "
                f"{forecast['time_fraction']:.3f} of the MainNet's time ({1 / forecast['time_fraction']:.2f}x); "
                "measure it with sidenet report"
            )
        return
    typer.echo(
        f"SideNet saved to {folder}; policy {choice['policy']}, temperature {choice['temperature']:.3f}, "
        f"threshold {format_threshold(choice['threshold'])} (validation: exit rate "
        f"{choice['exit_rate']:.3f}, accuracy drop {100 * choice['accuracy_drop']:.2f} points, compute "
        f"{choice['relative_compute']:.3f} of the MainNet)"
    )


# Below this many validation samples a chosen threshold's accuracy drop is a guess (one sample in 200 is 0.5 pt).
FEW_VALIDATION_SAMPLES = 200


@app.command("sweep")
def sweep_command(
    sidenet: Annotated[Path, typer.Option("--sidenet", help="Folder of a saved SideNet or cascade.")] = DEFAULT_OUT
    / "fmnist-layer1.0",
    split: Annotated[str, typer.Option(help="Data partition (train/val/test) to sweep.")] = "test",
    data: DataOption = None,
    plot: Annotated[Path | None, typer.Option(help="PNG path (default: beside the SideNet).")] = None,
    rows: Annotated[int, typer.Option(help="Rows of the printed table.")] = 12,
    device: DeviceOption = None,
    dtype: DtypeOption = None,
    quiet: QuietOption = False,
) -> None:
    """Print the compute-accuracy curve of a saved SideNet and save it as a PNG plot."""
    try:
        check_positive(rows=rows)
        check_device_dtype(device, dtype)
        task = saved_task(sidenet)
        task.check_split(split)
        plot = plot_path(plot or sidenet / f"curve_{split}.png")
        check_writable(plot, "--plot", folder=False)
        model, task = load_saved(sidenet, data, not quiet, task, device, dtype)
        loaders = task.loaders(data)
        if split not in loaders:
            fail(f"--split must be one of {sorted(loaders)}, got {split!r}")
        curve = sweep(model, loaders[split], progress=not quiet)
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    # A cascade's curve runs along a path of threshold vectors: its marks are vectors too.
    marks = {"saved threshold": model.threshold} if model.num_taps == 1 else {"saved thresholds": model.thresholds}
    typer.echo(curve.table(rows, marks=marks))
    where = f"tap {model.tap}" if model.num_taps == 1 else f"taps {' -> '.join(map(str, model.taps))}"
    try:
        path = curve.plot(plot, marks=marks, title=f"{task.name}, {where}, {split} data")
        curve.save_json(path.with_suffix(".json"))
    except OSError as exc:
        fail(f"--plot {plot}: {exc}")
    typer.echo(f"Plot written to {path}")


@app.command()
def predict(
    inputs: Annotated[
        list[str] | None, typer.Argument(help="Inputs: image files for fmnist, sentences for sst2.")
    ] = None,
    file: Annotated[Path | None, typer.Option("--file", help="A text file with one input per line.")] = None,
    sidenet: Annotated[Path, typer.Option("--sidenet", help="Folder of a saved SideNet or cascade.")] = DEFAULT_OUT
    / "fmnist-layer1.0",
    threshold: Annotated[
        float | None, typer.Option(help="Override the saved threshold (a cascade: every SideNet's).")
    ] = None,
    data: DataOption = None,
    device: DeviceOption = None,
    dtype: DtypeOption = None,
) -> None:
    """Label, confidence and exit decision for each input."""
    try:
        check_device_dtype(device, dtype)
    except ValueError as exc:
        fail(str(exc))
    if threshold is not None:
        try:
            validate_threshold(threshold)
        except ValueError as exc:
            fail(f"--threshold: {exc}")
    inputs = list(inputs or [])
    if file is not None:
        try:
            inputs += [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            fail(f"cannot read --file {file}: {exc}")
    if not inputs:
        fail("give inputs on the command line or with --file")
    try:
        model, task = load_saved(sidenet, data, False, None, device, dtype)
        if threshold is not None:
            model.thresholds = threshold  # a cascade: the same threshold for every SideNet
        batch = to_mainnet(model.split, task.read_inputs(inputs))
        with torch.no_grad():
            output = model(batch)
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    probabilities = torch.softmax(output.logits.float(), dim=1)
    for item, label, prob, stage, conf, flops in zip(
        inputs,
        output.predictions.tolist(),
        probabilities.max(1).values.tolist(),
        output.exit_stage.tolist(),
        output.confidence.tolist(),
        output.flops.tolist(),
        strict=True,
    ):
        name = task.class_names[label] if task.class_names else str(label)
        side = "SideNet" if model.num_taps == 1 else f"SideNet at tap {model.taps[min(stage, model.num_taps - 1)]}"
        # Two numbers, each named: the answer's softmax probability, the score the rule held to the threshold.
        where = (
            f"{side} (exit score {conf:.3f})" if stage < model.num_taps else f"MainNet ({side} exit score {conf:.3f})"
        )
        typer.echo(f"{item}\t{name}\tprobability {prob:.3f}\tanswered by {where}\t{flops / 1e6:.2f} MFLOPs")


register_report_command(app)  # report (here, to be listed after predict): sidenet/cli_report.py


@app.command()
def demo(
    data: DataOption = None,
    out: Annotated[Path, typer.Option(help="Where the SideNet, plot and results go.")] = DEFAULT_OUT,
    tap: Annotated[str, typer.Option(help="Tap of the demo SideNet.")] = "layer1.0",
    pool: Annotated[int, typer.Option(help="Pooling grid side of the demo SideNet.")] = 7,
    max_drop: Annotated[
        float, typer.Option(help="Accuracy drop allowed when choosing the threshold.")
    ] = FitSettings.max_drop,
    device: DeviceOption = None,
    dtype: DtypeOption = None,
    quiet: QuietOption = False,
) -> None:
    """The whole method on Fashion-MNIST: MainNet, SideNet, threshold on validation, curve on test."""
    progress = not quiet
    try:
        settings = FitSettings(
            task="fmnist",
            tap=tap,
            out=out / f"fmnist-{tap}",
            data=data,
            pool=pool,
            max_drop=max_drop,
            device=device,
            dtype=dtype,
        )
        folder, choice = fit_and_save(settings, progress)
        model, task = load_saved(folder, data, progress, None, device, dtype)
        curve: TradeoffCurve = sweep(model, task.loaders(data)["test"], progress=progress)
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    marks = {f"chosen on val (<= {100 * max_drop:.1f} pt)": model.threshold}
    typer.echo("\nCompute-accuracy trade-off on the 10,000 Fashion-MNIST test images:")
    typer.echo(curve.table(12, marks=marks))
    point = curve.at(model.threshold)
    typer.echo(
        f"\nAt threshold {format_threshold(model.threshold)} (chosen on the validation data): accuracy "
        f"{point['accuracy']:.4f} vs MainNet {curve.mainnet_accuracy:.4f}, {point['exit_rate']:.1%} of images "
        f"exit at the SideNet, {point['relative_compute']:.1%} of the MainNet's FLOPs."
    )
    plot_path = curve.plot(out / "fmnist_curve.png", marks=marks, title=f"Fashion-MNIST test, ResNet-20, tap {tap}")
    summary = {"tap": tap, "threshold_choice": choice, "test": point, "mainnet_accuracy": curve.mainnet_accuracy}
    (out / "fmnist_demo.json").write_text(json.dumps(summary, indent=2))
    typer.echo(f"Plot written to {plot_path}; SideNet saved in {folder}")


register_serve_commands(app)  # serve and classify (Ray Serve, Ray Data): sidenet/cli_serve.py


def main() -> None:
    """Entry point of the ``sidenet`` script: CPU memory freed by a batch is kept for the next one
    (:mod:`sidenet.host_memory`; ``SIDENET_CPU_MEMORY=system`` keeps the C library's defaults), then
    the command runs."""
    from sidenet.host_memory import retain_unless_switched_off

    try:
        retain_unless_switched_off()
    except ValueError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise SystemExit(2) from None
    app()


if __name__ == "__main__":
    main()
