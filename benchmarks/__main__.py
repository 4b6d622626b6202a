"""One runner for every benchmark: ``python -m benchmarks run [--quick] [--only NAME ...]``.

Runs, in order, in this process (each script's ``main`` with its own command line; one import of
torch and transformers instead of one per step): ``fmnist`` (benchmarks/fmnist_resnet.py), ``sst2``
(benchmarks/sst2_minilm.py), ``calibration`` (benchmarks/calibration_report.py: ``sidenet fit`` and
``sidenet report`` on both workloads), ``serving`` (benchmarks/serving.py: MainNet, per-sample
routing, batch-level exit, ideal), ``stacking`` (benchmarks/stacking.py: int8 quantisation with and
without a SideNet, SST-2), ``text_pruning`` (benchmarks/text_pruning.py: feed-forward pruning at two
sparsities with and without a SideNet, SST-2), ``distillation`` (benchmarks/distillation.py: a 3-layer student with and
without a SideNet, SST-2) and ``resnet_compression`` (benchmarks/resnet_compression.py: channel-pruned and
int8 ResNets with and without a SideNet, Fashion-MNIST); each writes its JSON under ``benchmarks/results/`` and
BENCHMARKS.md is regenerated from all of them.

``--quick`` runs reduced versions (one tap, few training samples and epochs, few timing repeats) for
a smoke check in a few minutes once the MainNets are cached. Its results go to
``benchmarks/results/quick/`` (not committed), with their own BENCHMARKS.md, never over the real ones.
MainNets are trained or fine-tuned first when not cached (Fashion-MNIST about 10 minutes, SST-2 about
12 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import importlib
import os
import shlex
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
STEPS: dict[str, tuple[str, list[str], list[str], str | None]] = {
    # name: (script, arguments of a full run, of a quick run, the script's flag for SST-2's folder)
    "fmnist": (
        "fmnist_resnet.py",
        [],
        shlex.split("--taps layer1.0 --pools 7 --train-limit 5000 --sidenet-epochs 5 --repeats 1 --batch1-images 50"),
        None,
    ),
    "sst2": (
        "sst2_minilm.py",
        [],
        shlex.split(
            "--taps 3 --features mean --train-limit 2000 --sidenet-epochs 5 --repeats 1 --batch1-repeats 1 "
            "--batch1-sentences 64 --dev-limit 300"
        ),
        "--data",
    ),
    "calibration": ("calibration_report.py", [], ["--quick"], "--sst2-data"),
    "serving": ("serving.py", [], ["--quick"], "--sst2-data"),
    "stacking": (
        "stacking.py",
        [],
        shlex.split("--max-train-samples 2000 --dev-limit 300 --epochs 3 --repeats 1 --batch1-samples 32"),
        "--data",
    ),
    "text_pruning": (
        "text_pruning.py",
        [],
        shlex.split(
            "--sparsities 0.5 --finetune-epochs 0.02 --max-train-samples 2000 --dev-limit 300 --epochs 3 "
            "--repeats 1 --batch1-samples 32"
        ),
        "--data",
    ),
    "distillation": (
        "distillation.py",
        [],
        shlex.split(
            "--distil-epochs 0.02 --max-train-samples 2000 --dev-limit 300 --epochs 3 --repeats 1 --batch1-samples 32"
        ),
        "--data",
    ),
    "resnet_compression": (
        "resnet_compression.py",
        [],
        shlex.split(
            "--sparsities 0.5 --finetune-epochs 0.05 --max-train-samples 2000 --epochs 3 --repeats 1 "
            "--batch1-samples 50"
        ),
        None,
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the benchmarks and regenerate BENCHMARKS.md")
    run.add_argument("--quick", action="store_true", help="reduced versions, results in benchmarks/results/quick")
    run.add_argument("--only", nargs="+", choices=list(STEPS), default=list(STEPS))
    run.add_argument("--sst2-data", type=Path, default=None, help="folder of SST-2's train.tsv and dev.tsv")
    sub.add_parser("report", help="only regenerate BENCHMARKS.md from the JSON results")
    args = parser.parse_args()

    if args.command == "run" and args.quick:
        # Read by benchmarks.common when first imported, below: quick results never overwrite the real ones.
        os.environ["SIDENET_BENCH_RESULTS"] = str(HERE / "results" / "quick")
    if args.command == "report":
        print(f"wrote {_write_report()}")
        return
    started = time.perf_counter()
    for name in args.only:
        script, full, quick, data_flag = STEPS[name]
        extra = quick if args.quick else full
        if args.sst2_data is not None and data_flag is not None:
            extra = [*extra, data_flag, str(args.sst2_data)]
        print(f"== {name}: {script} {' '.join(extra)}", flush=True)
        step = time.perf_counter()
        run_script(script, extra)
        print(f"== {name} took {(time.perf_counter() - step) / 60:.1f} min", flush=True)
    print(f"wrote {_write_report()}")
    print(f"all done in {(time.perf_counter() - started) / 60:.1f} min")


def run_script(script: str, arguments: list[str]) -> None:
    """Run ``benchmarks/SCRIPT ARGUMENTS`` in this process: its ``main`` under that command line."""
    module = importlib.import_module(f"benchmarks.{script.removesuffix('.py')}")
    saved = sys.argv
    sys.argv = [str(HERE / script), *arguments]
    try:
        module.main()
    finally:
        sys.argv = saved


def _write_report() -> Path:
    from benchmarks.report import main as write_benchmarks_md

    return write_benchmarks_md()


if __name__ == "__main__":
    main()
