"""Calibration, exit policies, guaranteed thresholds, the oracle and the shift check on both workloads,
through the command line a user runs: ``sidenet fit`` then ``sidenet report``.

- fmnist: SideNet at ``layer1.0`` (7x7 pooling, the Fashion-MNIST benchmark's tap); temperature and
  thresholds from the validation split (held out of train), reported on the 10,000 test images.
- sst2: SideNet after encoder layer 3; temperature and thresholds from the validation split (phrases
  held out of SST-2 train), reported on SST-2 dev (sentences): the shift check should fire.
- sst2 (dev halves): the same SideNet with ``--halves``: calibrated on a random half of dev, reported
  on the other half: the same distribution, so the shift check should stay quiet and the guarantee apply.

Run: ``python benchmarks/calibration_report.py`` (MainNets are trained first if not cached). Writes
``benchmarks/results/calibration.json`` and each report's Markdown, JSON and PNGs under
``benchmarks/results/reports/`` (the self-contained HTML too, not committed), then regenerates BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS, ROOT, SIDENETS, link, machine, write_result
from benchmarks.report import main as write_benchmarks_md

REPORTS = RESULTS / "reports"


def runs(args: argparse.Namespace) -> list[dict[str, Any]]:
    sst2_data = ["--data", str(args.sst2_data)] if args.sst2_data else []
    quick = ["--max-train-samples", "2000", "--max-val-samples", "1000", "--epochs", "3"] if args.quick else []
    # Quick runs skip the throughput column of the reports' threshold tables (most of a report's time) and
    # look at the first 1,000 samples of each split.
    no_timing = ["--no-timing", "--max-samples", "1000"] if args.quick else []
    runs = [
        {
            "name": "fmnist",
            "fit": ["fit", "--task", "fmnist", "--tap", "layer1.0", "--pool", "7", *quick],
            "report": ["--max-drop", "0.005", *no_timing],
            "sidenet": "fmnist-layer1.0",
        },
        {
            "name": "sst2",
            "fit": ["fit", "--task", "sst2", "--tap", "3", *sst2_data, *quick],
            "report": ["--max-drop", "0.01", *sst2_data, *no_timing],
            "sidenet": "sst2-3",
        },
        {
            "name": "sst2_dev_halves",
            "fit": None,  # the sst2 SideNet
            # Same SideNet and sentences as the sst2 report, whose table already has their throughput.
            "report": ["--max-drop", "0.01", "--halves", *sst2_data, "--no-timing"],
            "sidenet": "sst2-3",
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", default=None, help="run only these (fmnist, sst2, sst2_dev_halves)")
    parser.add_argument("--skip-fit", action="store_true", help="reuse SideNets fitted by an earlier run")
    parser.add_argument("--sst2-data", type=Path, default=None, help="folder of SST-2's train.tsv and dev.tsv")
    parser.add_argument(
        "--quick", action="store_true", help="2,000 training and 1,000 other samples, 3 epochs; no timing or halves"
    )
    args = parser.parse_args()
    path = RESULTS / "calibration.json"
    results: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    for run in runs(args):
        if args.only and run["name"] not in args.only:
            continue
        folder = SIDENETS / run["sidenet"]
        out = REPORTS / run["name"]
        seconds: dict[str, float] = {}
        fit_command = None
        if run["fit"] is not None:
            fit_command = [*run["fit"], "--out", str(folder), "-q"]
            if not args.skip_fit:
                seconds["fit"] = sidenet_cli(fit_command)
        report_command = ["report", "--sidenet", str(folder), "--out", str(out), *run["report"], "-q"]
        seconds["report"] = sidenet_cli(report_command)
        report = json.loads((out / "report.json").read_text())
        config = json.loads((folder / "sidenet_config.json").read_text())
        results[run["name"]] = {
            "commands": [
                " ".join(["sidenet", *c]).replace(str(ROOT) + "/", "")
                for c in (fit_command, report_command)
                if c is not None
            ],  # fmt: skip
            "seconds": seconds,
            "machine": machine(),
            "sidenet_config": {k: config[k] for k in ("tap", "hidden", "pool_size", "temperature", "policy")},
            "report_markdown": link(out / "report.md"),
            "report": report,
        }
    results["command"] = "python benchmarks/calibration_report.py" + (" --quick" if args.quick else "")
    results["quick"] = bool(args.quick)
    print(f"wrote {write_result('calibration', results)} and {write_benchmarks_md()}")


if __name__ == "__main__":
    main()
