"""Calibration, exit policies, guaranteed thresholds, the oracle and the shift check on both workloads,
through the command line a user runs: ``sidenet fit`` then ``sidenet report``.

- fmnist: SideNet at ``layer1.0`` (7x7 pooling, the Fashion-MNIST benchmark's tap); temperature and
  thresholds from the validation split (held out of train), reported on the 10,000 test images.
- sst2: SideNet after encoder layer 3; temperature and thresholds from the validation split (phrases
  held out of SST-2 train), reported on SST-2 dev (sentences): the shift check should fire.
- sst2 (dev halves): the same SideNet with ``--halves``: calibrated on a random half of dev, reported
  on the other half: the same distribution, so the shift check should stay quiet and the guarantee apply.

Run: ``python -m benchmarks.calibration_report [--quick]`` (or every step: ``python -m benchmarks run``).
Needs no other step (MainNets are trained first if not cached). Writes ``calibration.json`` and each
report's Markdown, JSON and PNGs under ``reports/`` in the results folder (the self-contained HTML too,
not committed), and the SideNets that serving, stacking, text_pruning, distillation and
resnet_compression load (see :func:`benchmarks.harness.sidenet_dir`).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from typing import Any

from benchmarks.harness import (
    SIDENETS,
    benchmark_parser,
    command,
    link,
    machine,
    parse_options,
    run_and_write,
    shown,
    sidenet_dir,
)

NAME = "calibration"


def runs(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The ``sidenet fit`` and ``sidenet report`` arguments of each run."""
    sst2_data = ["--data", str(args.sst2_data)]
    quick = ["--max-train-samples", "2000", "--max-val-samples", "1000", "--epochs", "3"] if args.quick else []
    # Quick runs skip the throughput column of the reports' threshold tables (most of a report's time) and
    # look at the first 1,000 samples of each split.
    no_timing = ["--no-timing", "--max-samples", "1000"] if args.quick else []
    runs = [
        {
            "name": "fmnist",
            "fit": ["fit", "--task", "fmnist", "--tap", "layer1.0", "--pool", "7", *quick],
            "report": ["--max-drop", "0.005", *no_timing],
            "sidenet": SIDENETS["fmnist"],
        },
        {
            "name": "sst2",
            "fit": ["fit", "--task", "sst2", "--tap", "3", *sst2_data, *quick],
            "report": ["--max-drop", "0.01", *sst2_data, *no_timing],
            "sidenet": SIDENETS["sst2"],
        },
        {
            "name": "sst2_dev_halves",
            "fit": None,  # the sst2 SideNet
            # Same SideNet and sentences as the sst2 report, whose table already has their throughput.
            "report": ["--max-drop", "0.01", "--halves", *sst2_data, "--no-timing"],
            "sidenet": SIDENETS["sst2"],
        },
    ]
    # Quick runs leave out the dev-halves report: the same code as the sst2 report with --halves, which the
    # tests run (tests/test_report.py).
    return [run for run in runs if not (args.quick and run["name"] == "sst2_dev_halves")]


def sidenet_cli(arguments: list[str]) -> float:
    """Run ``sidenet ARGUMENTS`` in this process (the command code a user runs, without paying the
    import of torch and transformers once per command); returns the seconds it took."""
    from sidenet.cli import app

    print("$ sidenet " + " ".join(arguments), flush=True)
    started = time.perf_counter()
    code = app(arguments, prog_name="sidenet", standalone_mode=False)
    if code:
        raise SystemExit(f"sidenet {arguments[0]} failed with exit code {code}")
    return time.perf_counter() - started


def options(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """This step's options from ``argv`` (the command line when None). ``--quick``: SideNets on 2,000
    training and 1,000 validation samples for 3 epochs, reports on 1,000 samples without timing, and no
    dev-halves report."""
    parser = benchmark_parser(__doc__)
    parser.add_argument("--only", nargs="+", default=None, help="run only these (fmnist, sst2, sst2_dev_halves)")
    parser.add_argument("--skip-fit", action="store_true", help="reuse SideNets fitted by an earlier run")
    return parse_options(parser, argv, {})


def run(args: argparse.Namespace) -> dict[str, Any]:
    """``sidenet fit`` and ``sidenet report`` per run; the result, merged into the runs of an earlier
    calibration.json in the results folder that this one leaves out (``--only``)."""
    path = args.results_dir / f"{NAME}.json"
    results: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    for spec in runs(args):
        if args.only and spec["name"] not in args.only:
            continue
        folder = sidenet_dir(args.results_dir) / spec["sidenet"]
        out = args.results_dir / "reports" / spec["name"]
        seconds: dict[str, float] = {}
        fit_command = None
        if spec["fit"] is not None:
            fit_command = [*spec["fit"], "--out", str(folder), "-q"]
            if not args.skip_fit:
                seconds["fit"] = sidenet_cli(fit_command)
        report_command = ["report", "--sidenet", str(folder), "--out", str(out), *spec["report"], "-q"]
        seconds["report"] = sidenet_cli(report_command)
        report = json.loads((out / "report.json").read_text())
        config = json.loads((folder / "sidenet_config.json").read_text())
        results[spec["name"]] = {
            "commands": [" ".join(["sidenet", *map(_shown, c)]) for c in (fit_command, report_command) if c],
            "seconds": seconds,
            "machine": machine(),
            "sidenet_config": {k: config[k] for k in ("tap", "hidden", "pool_size", "temperature", "policy")},
            "report_markdown": link(out / "report.md", args.results_dir),
            "report": report,
        }
    results["command"] = command("calibration_report", args)
    results["quick"] = bool(args.quick)
    return results


def _shown(argument: str) -> str:
    """A path argument relative to the repository (``../shared/data/sst2``), anything else as it is."""
    return shown(argument) if argument.startswith("/") else argument


def main(argv: Sequence[str] | None = None) -> None:
    run_and_write(NAME, run, options(argv))


if __name__ == "__main__":
    main()
