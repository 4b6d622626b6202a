"""The ``sidenet`` command line: pretrain, fit, sweep, predict, report, demo.

Every command checks its arguments before it loads data or a MainNet, so that a bad option is refused
in well under a second, not after the MainNet was trained or the SideNet fitted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import torch
import typer

from sidenet.attach import load_sidenet
from sidenet.cli_fit import fit_and_save
from sidenet.cli_options import FitSettings, check_positive, check_range
from sidenet.cli_serve import register as register_serve_commands
from sidenet.config import CASCADE_NAME, SideNetConfig
from sidenet.curve import TradeoffCurve, sweep
from sidenet.loaders import prefix_loader, split_loader
from sidenet.policy import POLICIES, format_threshold, validate_threshold
from sidenet.tasks import TASKS, Task, get_task

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
DataOption = Annotated[
    Path | None, typer.Option("--data", help="Dataset folder (default: looked up; SST-2: also $SIDENET_SST2_DIR).")
]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
DEFAULT_OUT = Path("sidenet-output")


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


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
        _fail(str(exc))
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
    seed: int = FitSettings.seed,
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
        )
        folder, choice = fit_and_save(settings, progress=not quiet)
    except (ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
    if "taps" in choice:
        typer.echo(
            f"Cascade saved to {folder}: taps {', '.join(choice['taps'])} of {', '.join(choice['candidate_taps'])}, "
            f"thresholds {', '.join(format_threshold(t) for t in choice['thresholds'])} (validation: exit rate "
            f"{choice['exit_rate']:.3f}, accuracy drop {100 * choice['accuracy_drop']:.2f} points, compute "
            f"{choice['relative_compute']:.3f} of the MainNet)"
        )
        return
    typer.echo(
        f"SideNet saved to {folder}; policy {choice['policy']}, temperature {choice['temperature']:.3f}, "
        f"threshold {format_threshold(choice['threshold'])} (validation: exit rate "
        f"{choice['exit_rate']:.3f}, accuracy drop {100 * choice['accuracy_drop']:.2f} points, compute "
        f"{choice['relative_compute']:.3f} of the MainNet)"
    )


def _saved_task(folder: Path) -> Task:
    """The task a saved SideNet was fitted on, read from its config alone (no MainNet loaded)."""
    return get_task(SideNetConfig.load(folder).metadata.get("task", "fmnist"))


def _load(folder: Path, data: Path | None, progress: bool, task: Task | None = None):
    task = task or _saved_task(folder)
    return load_sidenet(task.mainnet(data, progress=progress), folder), task


@app.command("sweep")
def sweep_command(
    sidenet: Annotated[Path, typer.Option("--sidenet", help="Folder of a saved SideNet.")] = DEFAULT_OUT
    / "fmnist-layer1.0",
    split: Annotated[str, typer.Option(help="Data partition (train/val/test) to sweep.")] = "test",
    data: DataOption = None,
    plot: Annotated[Path | None, typer.Option(help="PNG path (default: beside the SideNet).")] = None,
    rows: Annotated[int, typer.Option(help="Rows of the printed table.")] = 12,
    quiet: QuietOption = False,
) -> None:
    """Print the compute-accuracy curve of a saved SideNet and save it as a PNG plot."""
    try:
        check_positive(rows=rows)
        task = _saved_task(sidenet)
        task.check_split(split)
        model, task = _load(sidenet, data, not quiet, task)
        loaders = task.loaders(data)
        if split not in loaders:
            _fail(f"--split must be one of {sorted(loaders)}, got {split!r}")
        curve = sweep(model, loaders[split], progress=not quiet)
    except (ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
    # A cascade's curve runs along a path of threshold vectors: its marks are vectors too.
    marks = {"saved threshold": model.threshold if model.num_taps == 1 else model.thresholds}
    typer.echo(curve.table(rows, marks=marks))
    where = f"tap {model.tap}" if model.num_taps == 1 else f"taps {' -> '.join(map(str, model.taps))}"
    path = curve.plot(plot or sidenet / f"curve_{split}.png", marks=marks, title=f"{task.name}, {where}, {split} data")
    curve.save_json(path.with_suffix(".json"))
    typer.echo(f"Plot written to {path}")


@app.command()
def predict(
    inputs: Annotated[
        list[str] | None, typer.Argument(help="Inputs: image files for fmnist, sentences for sst2.")
    ] = None,
    file: Annotated[Path | None, typer.Option("--file", help="A text file with one input per line.")] = None,
    sidenet: Annotated[Path, typer.Option("--sidenet", help="Folder of a saved SideNet.")] = DEFAULT_OUT
    / "fmnist-layer1.0",
    threshold: Annotated[float | None, typer.Option(help="Override the saved threshold.")] = None,
    data: DataOption = None,
) -> None:
    """Label, confidence and exit decision for each input."""
    if threshold is not None:
        try:
            validate_threshold(threshold)
        except ValueError as exc:
            _fail(f"--threshold: {exc}")
    inputs = list(inputs or [])
    if file is not None:
        try:
            inputs += [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            _fail(f"cannot read --file {file}: {exc}")
    if not inputs:
        _fail("give inputs on the command line or with --file")
    try:
        model, task = _load(sidenet, data, progress=False)
        if threshold is not None:
            model.thresholds = threshold  # a cascade: the same threshold for every SideNet
        batch = task.read_inputs(inputs)
        with torch.no_grad():
            output = model(batch)
    except (ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
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
        where = (
            f"{side} (confidence {conf:.3f})" if stage < model.num_taps else f"MainNet ({side} confidence {conf:.3f})"
        )
        typer.echo(f"{item}\t{name}\tp={prob:.3f}\tanswered by {where}\t{flops / 1e6:.2f} MFLOPs")


@app.command()
def report(
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
    max_samples: Annotated[
        int | None, typer.Option(help="Use the first N samples of each data partition only (quick looks).", min=1)
    ] = None,
    audit: Annotated[
        Path | None, typer.Option(help="Logged live-audit counts to show: /metrics answers of the deployment.")
    ] = None,
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
        task = _saved_task(sidenet)
        cascade = (sidenet / CASCADE_NAME).is_file()
        from sidenet.audit import audit_from_log  # read first: a bad file fails before the long work

        audited = None if audit is None else audit_from_log(audit).to_dict()
        for name in (calibration_split, split):
            task.check_split(name)
        model, task = _load(sidenet, data, not quiet, task)
        loaders = task.loaders(data)
        for name in (calibration_split, split):
            if name not in loaders:
                _fail(f"splits are {sorted(loaders)}, got {name!r}")
        settings = ReportSettings(max_accuracy_drop=max_drop, confidence=confidence, bins=bins, timing=timing)
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
        _fail(str(exc))
    for line in md_path.read_text().splitlines():
        if line.startswith("> "):
            typer.echo(line[2:])
    typer.echo(f"Report written to {html_path} (and {md_path.name}, report.json, PNGs beside it)")


@app.command()
def demo(
    data: DataOption = None,
    out: Annotated[Path, typer.Option(help="Where the SideNet, plot and results go.")] = DEFAULT_OUT,
    tap: Annotated[str, typer.Option(help="Tap of the demo SideNet.")] = "layer1.0",
    pool: Annotated[int, typer.Option(help="Pooling grid side of the demo SideNet.")] = 7,
    max_drop: Annotated[
        float, typer.Option(help="Accuracy drop allowed when choosing the threshold.")
    ] = FitSettings.max_drop,
    quiet: QuietOption = False,
) -> None:
    """The whole method on Fashion-MNIST: MainNet, SideNet, threshold on validation, curve on test."""
    progress = not quiet
    try:
        settings = FitSettings(
            task="fmnist", tap=tap, out=out / f"fmnist-{tap}", data=data, pool=pool, max_drop=max_drop
        )
        folder, choice = fit_and_save(settings, progress)
        model, task = _load(folder, data, progress)
        curve: TradeoffCurve = sweep(model, task.loaders(data)["test"], progress=progress)
    except (ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
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
